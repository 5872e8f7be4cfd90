"""python -m afm_ray.export: each format written, reloaded the way a deployment would, and checked
against the PyTorch student; a student registered in a real MLflow (SQLite) is the input.

Tolerance: 1e-4 on the logits, the documented bound of afm_ray.export (fp32, differences in
summation order and BatchNorm folding only)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import mlflow_store, trained_student

from afm_ray.errors import ArtifactError
from afm_ray.export.__main__ import main as export_main
from afm_ray.export.formats import ONNX_INLINE_LIMIT, TOLERANCE, export_file, export_student, verify_export
from afm_ray.tracking.student_model import fetch_student, load_student, log_student

pytestmark = [
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),  # the deployment's side
]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    store = mlflow_store(tmp_path_factory.mktemp("export"), "export")
    uri, client, exp = store["uri"], store["client"], store["exp"]
    tags = {"afm_ray.role": "trial", "afm_ray.trial_id": "917f2149"}  # as a sweep tags a trial's run
    run_id = client.create_run(exp, run_name="917f2149", tags=tags).info.run_id
    model = trained_student()
    model_id = log_student(client, run_id, model, input_shape=(1, 8, 8))
    client.create_registered_model("students")
    location = client.search_logged_models([exp])[0].artifact_location
    version = client.create_model_version("students", source=location, run_id=run_id, model_id=model_id)
    client.set_registered_model_alias("students", "pareto-1", version.version)
    return {"uri": uri, "client": client, "model": model, "run_id": run_id}


def _reloaded_logits(fmt: str, path, x: torch.Tensor) -> np.ndarray:
    """What a deployment does with the file: no afm_ray in the loop except for safetensors."""
    if fmt == "onnx":
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path))(x).numpy()
    model, _ = load_student(path.parent)
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_export_by_alias_agrees_with_pytorch(registered, tmp_path, capsys, fmt):
    out = tmp_path / fmt
    code = export_main(
        ["--model", "models:/students@pareto-1", "--format", fmt, "--out", str(out)]
        + ["--tracking-uri", registered["uri"], "--threads", "1"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "export.json").read_text())
    assert report["run_id"] == registered["run_id"] and report["format"] == fmt
    assert report["verify"]["max_abs_logit_diff"] <= TOLERANCE
    assert report["verify"]["max_abs_logit"] > 1.0  # a trained model's logits, not a near-zero output
    # independently: another batch, including a larger one than the export was traced with
    x = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = registered["model"](x).numpy()
    assert np.abs(_reloaded_logits(fmt, out / report["file"], x) - expected).max() <= TOLERANCE
    if fmt == "onnx":
        latency = report["latency_batch1"]
        assert latency["onnxruntime"]["median_ms"] > 0 and latency["pytorch_median_ms"] > 0
        assert "batch-1 latency: onnxruntime" in printed
    if fmt == "safetensors":  # the deployable pair is the student format itself
        assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.safetensors", "spec.json"]
    # export.json names every file written, each with its sha256; nothing else is in the folder
    listed = {f["name"]: f for f in report["files"]}
    assert set(listed) | {"export.json"} == {p.name for p in out.iterdir()}
    for name, entry in listed.items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest() in printed
        assert entry["bytes"] == (out / name).stat().st_size
    if fmt == "onnx":  # a student this small is one self-contained file: weights inline, no .data beside it
        assert list(listed) == ["student.onnx"] and "(self-contained)" in printed


def _travelled_logits(out, tmp_path, x):
    """Copy the export folder elsewhere (the original removed) and run it there with onnxruntime alone."""
    import onnxruntime as ort

    moved = tmp_path / "elsewhere" / "deploy"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    report = json.loads((moved / "export.json").read_text())
    for entry in report["files"]:  # what arrived is what was written
        assert hashlib.sha256((moved / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    session = ort.InferenceSession(str(moved / report["file"]), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0], report


@pytest.mark.parametrize("inline_limit", [ONNX_INLINE_LIMIT, 0], ids=["inline", "external-data"])
def test_the_export_folder_travels(registered, tmp_path, inline_limit):
    """Copied elsewhere, the folder runs in onnxruntime. A student under ONNX's 2 GB limit is one file; a
    larger one (forced here with a zero limit) writes its weights beside the graph, and export.json lists both."""
    model, spec = fetch_student(registered["client"], f"runs:/{registered['run_id']}")
    out = tmp_path / "export"
    export_student(model, spec, "onnx", out, inline_limit=inline_limit)
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    logits, report = _travelled_logits(out, tmp_path, x)
    names = [f["name"] for f in report["files"]]
    assert names == (["student.onnx"] if inline_limit else ["student.onnx", "student.onnx.data"])
    with torch.no_grad():
        assert np.abs(logits - model(x).numpy()).max() <= TOLERANCE


def test_export_by_the_trial_id_the_sweep_printed(registered, tmp_path, capsys):
    out = tmp_path / "by-trial"
    args = ["--trial", "917f2149", "--format", "torchscript", "--out", str(out), "--tracking-uri", registered["uri"]]
    assert export_main(args) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["run_id"] == registered["run_id"] and report["trial"] == "917f2149"
    assert export_main([*args[:1], "917f2148", *args[2:]]) == 2
    err = capsys.readouterr().err
    assert "no trial run has that trial id" in err and "the newest trials there: 917f2149" in err


def test_verification_refuses_an_export_of_another_model(registered, tmp_path):
    model, spec = fetch_student(registered["client"], f"runs:/{registered['run_id']}")
    path = export_file(trained_student(seed=1), spec, "torchscript", tmp_path)
    with pytest.raises(ArtifactError, match="the export is not the model"):
        verify_export(path, "torchscript", model, spec["input_shape"])


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--model", "models:/students@pareto-9", "--format", "onnx"],
            "models:/students@pareto-9: .*pareto-9.*; model 'students' has aliases @pareto-1 and versions 1",
        ),
        (["--model", "models:/studnets@pareto-1", "--format", "onnx"], "registered models there: students"),
        (["--model", "models:/students/7", "--format", "onnx"], "has aliases @pareto-1 and versions 1$"),
        (["--model", "students", "--format", "onnx"], "expected models:/NAME@ALIAS"),
        (["--model", "models:/students@pareto-1", "--format", "onnx", "--batch", "0"], "--batch: got 0"),
    ],
)
def test_export_errors_are_one_line(registered, tmp_path, capsys, args, expected):
    assert export_main([*args, "--out", str(tmp_path / "o"), "--tracking-uri", registered["uri"]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    import re

    assert re.search(expected, err), err
