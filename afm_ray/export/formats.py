"""Export a logged student as a file a deployment loads: ONNX, TorchScript or safetensors
(`python -m afm_ray.export`, afm_ray/export/__main__.py).

The student is fetched safely (`afm_ray.tracking.student_model.fetch_student`: safetensors + JSON, checked
against the sha256 the tracking store recorded). The export is then checked against that PyTorch
model on a seeded batch of images in [0, 1]: the largest absolute logit difference must stay
within ``--tolerance`` (default 1e-4). Why 1e-4: both sides compute in fp32 (unit roundoff
u = 2^-24 = 6e-8) and differ only in summation order and fusions (ONNX Runtime folds BatchNorm
into the convolutions); a dot product of K terms then differs by about sqrt(K) u relative, and a
few such layers (K <= 9 x 64 for the small CNN) compound it to ~1e-6 relative, ~1e-5 on logits of
magnitude 10. 1e-4 leaves a tenfold margin over that, while a wrong export (a missing
normalisation, BatchNorm in training mode, a swapped layer) misses by 1e-2 or more. Deeper
students (ResNet-18, WRN) accumulate over more layers: measure, then pass --tolerance.
With ONNX, the batch-1 latency under onnxruntime (CPU, ``--threads``) is measured next to
PyTorch's on the same machine. DIR gets the file and ``export.json`` (what was checked and measured, and
every file written with its sha256). A student's ONNX file is self-contained (weights inline) up to
`ONNX_INLINE_LIMIT`, under protobuf's 2 GiB; a larger one's weights go to ``student.onnx.data`` beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from afm_ray.devices import cpu_model_name
from afm_ray.errors import ArtifactError, ConfigError
from afm_ray.models import measure_latency_ms
from afm_ray.tracking.student_model import SPEC_FILE, WEIGHTS_FILE, load_student, save_student, sha256

FORMATS = {"onnx": "student.onnx", "torchscript": "student.torchscript.pt", "safetensors": WEIGHTS_FILE}
TOLERANCE = 1e-4  # max |logit difference| in fp32; see the module docstring
# ONNX keeps a model in one protobuf, which cannot exceed 2 GiB: weights up to this size go inline (one
# self-contained file); a larger student's go to `student.onnx.data` beside it (export.json names both).
ONNX_INLINE_LIMIT = 1.8 * 2**30


def export_file(
    model: nn.Module, spec: dict[str, Any], fmt: str, out: Path, *, inline_limit: float = ONNX_INLINE_LIMIT
) -> Path:
    """Write ``model`` to ``out`` in ``fmt``; returns the file a runtime opens (`written_files` lists all)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / FORMATS[fmt]
    for stale in (path, out / f"{path.name}.data"):  # a previous export's, which this one may not rewrite
        stale.unlink(missing_ok=True)
    example = torch.rand((2, *spec["input_shape"]), generator=torch.Generator().manual_seed(0))
    if fmt == "safetensors":
        save_student(model, out, input_shape=tuple(spec["input_shape"]))
    elif fmt == "torchscript":  # deprecated by PyTorch in favour of torch.export; runtimes still load it
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.trace(model, example), str(path))
    else:
        # The exporter narrates each stage on stdout and warns about its own internals (torchvision ops
        # it skips, a pytree deprecation); a dynamic batch dimension, so one file serves any batch.
        quiet = logging.getLogger("torch.onnx")
        level, quiet.level = quiet.level, logging.ERROR
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                external_data=_weight_bytes(model) > inline_limit,  # else one self-contained file
            )
        quiet.setLevel(level)
    return path


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def written_files(path: Path, fmt: str) -> list[Path]:
    """Every file an export wrote: what a deployment must copy together."""
    if fmt == "safetensors":
        return [path, path.parent / SPEC_FILE]
    data = path.parent / f"{path.name}.data"  # ONNX external weights, for a student over the inline limit
    return [path, data] if fmt == "onnx" and data.is_file() else [path]


def run_export(path: Path, fmt: str, x: torch.Tensor, threads: int = 1) -> np.ndarray:
    """Logits of the exported file on ``x``, loaded the way a deployment would."""
    if fmt == "onnx":
        return _onnx_session(path, threads).run(None, {"images": x.numpy()})[0]
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path)).eval()(x).numpy()
    model, _ = load_student(path.parent)
    with torch.no_grad():
        return model(x).numpy()


def _onnx_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_export(
    path: Path, fmt: str, model: nn.Module, input_shape: list[int], *, batch: int = 64, tolerance: float = TOLERANCE
) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) of the exported file against ``model`` on a seeded batch of
    images in [0, 1]; an ArtifactError (one line) beyond ``tolerance``."""
    x = torch.rand((batch, *input_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.eval()(x).numpy()
    diff = float(np.abs(run_export(path, fmt, x) - reference).max())
    if not diff <= tolerance:  # NaN fails too
        raise ArtifactError(
            f"{path}: logits differ from the PyTorch model by up to {diff:.3g} on a batch of {batch} "
            f"(tolerance {tolerance:g}); the export is not the model"
        )
    return diff, float(np.abs(reference).max())


def onnx_latency_ms(path: Path, input_shape: list[int], *, threads: int = 1, repeats: int = 300) -> dict[str, float]:
    """Median and 90th percentile wall time (ms) of one batch-1 onnxruntime call, after a warm-up."""
    session = _onnx_session(path, threads)
    x = np.random.default_rng(0).random((1, *input_shape), dtype=np.float32)
    for _ in range(max(10, repeats // 10)):
        session.run(None, {"images": x})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {"images": x})
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90))}


def export_student(
    model: nn.Module,
    spec: dict[str, Any],
    fmt: str,
    out: str | Path,
    *,
    batch: int = 64,
    threads: int = 1,
    tolerance: float = TOLERANCE,
    inline_limit: float = ONNX_INLINE_LIMIT,
) -> dict[str, Any]:
    """Export, verify against ``model`` on a seeded batch, measure (ONNX); returns what export.json holds:
    every file written with its size and sha256, the check, the latency. An ArtifactError when the export
    disagrees with the model by more than ``tolerance``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    model = model.eval()
    path = export_file(model, spec, fmt, out, inline_limit=inline_limit)
    diff, largest = verify_export(path, fmt, model, spec["input_shape"], batch=batch, tolerance=tolerance)
    files = [
        {"name": f.name, "bytes": f.stat().st_size, "sha256": sha256(f.read_bytes())} for f in written_files(path, fmt)
    ]
    report: dict[str, Any] = {
        "model": spec.get("uri", ""),
        "run_id": spec.get("run_id", ""),
        "trial": spec.get("trial", ""),
        "format": fmt,
        "file": path.name,  # what a runtime opens; `files`: everything to copy with it
        "files": files,
        "input_shape": spec["input_shape"],
        "verify": {"batch": batch, "max_abs_logit_diff": diff, "max_abs_logit": largest, "tolerance": tolerance},
        "machine": f"{cpu_model_name()}, {os.cpu_count()} cores",
    }
    if fmt == "onnx":
        report["latency_batch1"] = {
            "onnxruntime": {**onnx_latency_ms(path, spec["input_shape"], threads=threads), "threads": threads},
            "pytorch_median_ms": _torch_latency(model, spec["input_shape"], threads),
        }
    (out / "export.json").write_text(json.dumps(report, indent=1))
    return report


def _torch_latency(model: nn.Module, input_shape: list[int], threads: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_latency_ms(model, input_shape, repeats=300, warmup=30)
    finally:
        torch.set_num_threads(previous)


def format_report(report: dict[str, Any], out: str | Path) -> str:
    """What the command prints: the file, the check, the latency."""
    v = report["verify"]
    together = " (copy them together)" if len(report["files"]) > 1 else " (self-contained)"
    lines = [f"wrote {report['format']} to {Path(out)}{together}, listed with their sha256 in export.json:"]
    lines += [f"  {f['name']}  {_size(f['bytes'])}  sha256 {f['sha256']}" for f in report["files"]]
    lines += [
        f"verified on {v['batch']} images: max |logit difference| {v['max_abs_logit_diff']:.3g} "
        f"(logits up to {v['max_abs_logit']:.3g}; tolerance {v['tolerance']:g})",
    ]
    if "latency_batch1" in report:
        lat = report["latency_batch1"]
        ort = lat["onnxruntime"]
        lines.append(
            f"batch-1 latency: onnxruntime {ort['median_ms']:.3f} ms median ({ort['p90_ms']:.3f} ms p90, "
            f"{ort['threads']} thread(s)); PyTorch {lat['pytorch_median_ms']:.3f} ms on the same machine"
        )
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
