"""python -m afm_ray.export: each format written, reloaded the way a deployment would, and checked
against the PyTorch student; a student registered in a real MLflow (SQLite) is the input.

Tolerance: 1e-4 on the logits, the documented bound of afm_ray.export (fp32, differences in
summation order and BatchNorm folding only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import mlflow_store, trained_student

from afm_ray.errors import ArtifactError
from afm_ray.export.__main__ import main as export_main
from afm_ray.export.formats import TOLERANCE, export_file, verify_export
from afm_ray.tracking.student_model import fetch_student, load_student, log_student

pytestmark = [
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),  # the deployment's side
]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    store = mlflow_store(tmp_path_factory.mktemp("export"), "export")
    uri, client, exp = store["uri"], store["client"], store["exp"]
    run_id = client.create_run(exp).info.run_id
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


def test_verification_refuses_an_export_of_another_model(registered, tmp_path):
    model, spec = fetch_student(registered["client"], f"runs:/{registered['run_id']}")
    path = export_file(trained_student(seed=1), spec, "torchscript", tmp_path)
    with pytest.raises(ArtifactError, match="the export is not the model"):
        verify_export(path, "torchscript", model, spec["input_shape"])


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "models:/students@pareto-9", "--format", "onnx"], "models:/students@pareto-9: .*pareto-9"),
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
