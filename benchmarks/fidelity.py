"""Does the fast path train as well as fp32? `python benchmarks/fidelity.py`, from the repository root.

The loss-level guard is a test (tests/test_fast_path.py: every method's loss and attack on
fixed inputs within a stated tolerance of fp32). This is the run-level guard, a benchmark
because it trains: the same short run (the embedded default, or any --config/--set) with the
fast path off (fp32, contiguous, eager) and on (by default bf16 autocast + channels_last),
for several seeds each, all distilling from the same cached teacher and all scored with the
same fp32 evaluation on the same fixed test images. It reports each seed's accuracies and
training speed, the mean and seed-to-seed spread per path, and whether the difference of the
means is within noise: |mean_fast - mean_ref| <= 2 standard errors of that difference.

The record for this machine kind lives in docs/fidelity_<machine>.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from afm_ray.cli import load_config
from afm_ray.config import ExperimentConfig, from_flat, parse_overrides, to_flat
from afm_ray.devices import resolve_device
from afm_ray.errors import ConfigError
from afm_ray.methods import build_method
from afm_ray.names import TRAIN_TEACHER
from afm_ray.teacher.training import ensure_teacher
from afm_ray.train.loop import LocalReporter, method_hparams, train_fn_per_worker

# The sibling modules import as top-level names: Python puts a script's own folder on sys.path, an importer may not.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_measure import machine_info  # one description of the machine for both records

REFERENCE = {"run.amp": "off", "run.channels_last": False, "run.compile": False}
DEFAULT_FAST = ("run.amp=bf16", "run.channels_last=true")


@dataclass(frozen=True)
class RunResult:
    path: str  # "fp32" or "fast"
    seed: int
    metrics: dict[str, float]
    train_images_per_s: float
    seconds: float


def paths(fast_overrides: Sequence[str]) -> dict[str, dict[str, object]]:
    """The two configurations compared, as flat overrides on top of the base config."""
    # Compared as parsed config values: YAML reads "off" as false, the config reads it back as "off".
    reference = to_flat(from_flat(REFERENCE))
    fast = to_flat(from_flat({**REFERENCE, **parse_overrides(list(fast_overrides))}))
    changed = {k: v for k, v in fast.items() if v != reference[k]}
    if not changed:
        raise ConfigError(f"--fast {' '.join(fast_overrides)!r} turns nothing on; e.g. --fast run.amp=bf16")
    return {"fp32": dict(REFERENCE), "fast": {**REFERENCE, **changed}}


def run_one(base: ExperimentConfig, overrides: dict[str, object], seed: int, path: str) -> RunResult:
    flat = {**to_flat(base), **overrides, "run.seed": seed}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="afm_ray_fidelity_") as out:
        final = train_fn_per_worker(
            from_flat({**flat, "run.output_dir": out}), LocalReporter(out, log=lambda line: None)
        )
    return RunResult(
        path,
        seed,
        {k: final[k] for k in final if k.endswith("_acc") and "/" not in k},
        final["train/images_per_s"],
        time.perf_counter() - started,
    )


def summarize(results: Sequence[RunResult], metric: str) -> dict[str, float]:
    """Means, seed-to-seed standard deviations, the difference and its standard error."""
    out: dict[str, float] = {}
    for path in ("fp32", "fast"):
        values = [r.metrics[metric] for r in results if r.path == path]
        out[f"{path}_mean"] = statistics.fmean(values)
        out[f"{path}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        out[f"{path}_n"] = len(values)
    out["diff"] = out["fast_mean"] - out["fp32_mean"]
    out["diff_se"] = math.sqrt(out["fp32_std"] ** 2 / out["fp32_n"] + out["fast_std"] ** 2 / out["fast_n"])
    return out


def within_noise(summary: dict[str, float]) -> bool:
    return abs(summary["diff"]) <= 2 * summary["diff_se"]


def to_markdown(
    results: Sequence[RunResult], base: ExperimentConfig, fast: dict[str, object], command: str, metrics: Sequence[str]
) -> str:
    m = machine_info(resolve_device(base.run.device))
    changed = ", ".join(f"{k}={v}" for k, v in fast.items() if REFERENCE.get(k) != v)
    lines = [
        "# afm-ray fast-path fidelity record",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m.name}, {m.cores} cores, {m.threads} torch threads, torch {m.torch_version}, {m.date}.",
        "",
        f"Run: {base.method.name}, student {base.student.arch}-w{base.student.width}, teacher {base.teacher.arch}-"
        f"w{base.teacher.width} ({base.teacher.method}, {base.teacher.epochs} epochs), data {base.data.name}"
        f"{f' at {base.data.image_size}px' if base.data.image_size else ''}, {base.optim.epochs} epochs, batch "
        f"{base.optim.batch_size}, PGD-{base.attack.steps} at eps {base.train_eps:.4g}, augment {base.augment.policy}. "
        f"Evaluation (fp32 on both paths): {', '.join(metrics)} on {base.eval.samples or 'all'} fixed test images "
        f"at eps {base.eval_eps:.4g}.",
        "",
        f"fp32 path: run.amp=off, run.channels_last=false, run.compile=false. Fast path: {changed}.",
        "",
        "| path | seed | " + " | ".join(f"{m} %" for m in metrics) + " | train img/s | wall s |",
        "|---|---:|" + "---:|" * len(metrics) + "---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (r.path != "fp32", r.seed)):
        cells = " | ".join(f"{100 * r.metrics[m]:.2f}" for m in metrics)
        lines.append(f"| {r.path} | {r.seed} | {cells} | {r.train_images_per_s:.0f} | {r.seconds:.0f} |")
    lines += [
        "",
        "| metric | fp32 mean ± std | fast mean ± std | fast − fp32 | 2 SE of the difference | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for m in metrics:
        s = summarize(results, m)
        verdict = "within noise" if within_noise(s) else "DIFFERENT"
        lines.append(
            f"| {m} | {100 * s['fp32_mean']:.2f} ± {100 * s['fp32_std']:.2f} | "
            f"{100 * s['fast_mean']:.2f} ± {100 * s['fast_std']:.2f} | {100 * s['diff']:+.2f} | "
            f"{200 * s['diff_se']:.2f} | {verdict} |"
        )
    speed = {p: statistics.fmean(r.train_images_per_s for r in results if r.path == p) for p in ("fp32", "fast")}
    lines += [
        "",
        f"Training speed, fast / fp32 (mean train/images_per_s over seeds, attack included): "
        f"{speed['fast'] / speed['fp32']:.2f}x.",
        "",
        "Within noise: |fast − fp32| <= 2 standard errors of the difference of the means "
        "(the seed-to-seed spread of each path; seeds change the student's initialisation, the batch "
        "order, the augmentation and the attack's random starts).",
    ]
    return "\n".join(lines) + "\n"


def _default_out() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower().replace("nvidia", "").strip().replace(" ", "_")
        return f"docs/fidelity_{name}.md"
    return "docs/fidelity_cpu.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/fidelity.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML with config sections (default: the embedded default)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key of the base run (repeatable)",
    )
    parser.add_argument(
        "--fast",
        nargs="+",
        default=list(DEFAULT_FAST),
        metavar="KEY=VALUE",
        help=f"the fast path's switches (default: {' '.join(DEFAULT_FAST)})",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per path (>= 2, for the spread)")
    parser.add_argument("--attacks", default="clean,pgd20", help="final evaluation attacks (default clean,pgd20)")
    parser.add_argument("--out", default=None, help="Markdown record (default docs/fidelity_<machine>.md)")
    args = parser.parse_args(argv)
    try:
        if args.seeds < 2:
            raise ConfigError(f"--seeds: got {args.seeds}, expected >= 2 (the spread needs two runs per path)")
        base = load_config(args.config, [*args.overrides, f"eval.attacks={args.attacks}"])
        compared = paths(args.fast)
        for overrides in compared.values():
            from_flat({**to_flat(base), **overrides})  # every bad value fails before anything trains
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    needs_teacher = build_method(base.method.name, **method_hparams(base)).needs_teacher
    if needs_teacher and base.teacher.checkpoint in ("", TRAIN_TEACHER):  # "train": the embedded default's
        base = from_flat({**to_flat(base), "teacher.checkpoint": str(ensure_teacher(base, log=log))})
    metrics = [f"{a}_acc" for a in base.eval_attacks]
    results = []
    for seed in range(args.seeds):
        for path, overrides in compared.items():  # interleaved, so drifting machine load hits both paths
            r = run_one(base, overrides, seed, path)
            results.append(r)
            log(
                f"{path:<5} seed {seed}: "
                + ", ".join(f"{m} {100 * r.metrics[m]:.2f}%" for m in metrics)
                + f", {r.train_images_per_s:.0f} train img/s, {r.seconds:.0f} s"
            )
    command = "python benchmarks/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = to_markdown(results, base, compared["fast"], command.strip(), metrics)
    out = args.out or _default_out()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
