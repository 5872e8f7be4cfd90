"""Students as files that load without unpickling: safetensors + a JSON spec in an MLflow model,
against a real MLflow (SQLite), and refused when changed after logging."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import mlflow_store

from afm_ray.errors import ArtifactError
from afm_ray.models import build_model
from afm_ray.tracking.student_model import (
    DATA_DIR,
    SPEC_FILE,
    WEIGHTS_FILE,
    fetch_student,
    load_student,
    log_student,
    save_student,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def _student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("small_cnn", num_classes=10, in_channels=1, mean=[0.13], std=[0.31], width=4)
    with torch.no_grad():  # running statistics of a trained model, so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return mlflow_store(tmp_path_factory.mktemp("mlflow"), "students")


@pytest.fixture
def logged(store):
    """A run with a freshly logged student (each test may tamper with its own files)."""
    client = store["client"]
    run_id = client.create_run(store["exp"]).info.run_id
    model = _student()
    model_id = log_student(client, run_id, model, input_shape=(1, 8, 8))
    files = store["root"] / "artifacts" / "models" / model_id / "artifacts"
    return {"client": client, "run_id": run_id, "model": model, "files": files, "uri": store["uri"]}


def test_round_trip_is_exact_and_keeps_the_normalisation(tmp_path):
    model = _student()
    save_student(model, tmp_path, input_shape=(1, 8, 8))
    again, spec = load_student(tmp_path)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(again(x), model(x)) and not again.training
    assert spec["model"]["arch"] == "small_cnn" and spec["input_shape"] == [1, 8, 8]
    assert spec["model"]["mean"] == pytest.approx([0.13]) and spec["model"]["num_classes"] == 10


def test_logged_student_holds_no_pickle_and_loads_with_pickle_forbidden(logged, monkeypatch):
    # Every file of the logged model is text (MLmodel, YAML, JSON, requirements) or safetensors.
    names = sorted(str(p.relative_to(logged["files"])) for p in logged["files"].rglob("*") if p.is_file())
    assert names == sorted(
        [
            "MLmodel",
            "conda.yaml",
            "python_env.yaml",
            "requirements.txt",
            "input_example.json",
            "serving_input_example.json",
            f"data/{DATA_DIR}/{SPEC_FILE}",
            f"data/{DATA_DIR}/{WEIGHTS_FILE}",
        ]
    )
    mlmodel = (logged["files"] / "MLmodel").read_text()
    assert "loader_module: afm_ray.tracking.student_model" in mlmodel and "signature:" in mlmodel
    assert "cloudpickle" not in mlmodel and "pickle" not in mlmodel

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    import mlflow.pyfunc

    model, spec = fetch_student(logged["client"], f"runs:/{logged['run_id']}")
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model(x), logged["model"](x))
    # MLflow's own loader goes through afm_ray.tracking.student_model too, so it needs no pickle either
    local = mlflow.artifacts.download_artifacts(str(logged["files"]), tracking_uri=logged["uri"])
    logits = mlflow.pyfunc.load_model(local).predict(x.numpy())
    assert torch.equal(torch.as_tensor(logits), logged["model"](x).detach())
    assert spec["run_id"] == logged["run_id"]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the last tensor's data: the file stays valid safetensors, only a weight changes
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper", ["weights", "spec", "both consistently"])
def test_a_changed_artifact_is_refused_in_one_line(logged, tamper):
    data = logged["files"] / "data" / DATA_DIR
    weights, spec_file = data / WEIGHTS_FILE, data / SPEC_FILE
    if tamper in ("weights", "both consistently"):
        _flip_a_byte(weights)
    if tamper in ("spec", "both consistently"):
        spec = json.loads(spec_file.read_text())
        spec["model"]["std"] = [1.0]  # a different normalisation: same shapes, wrong model
        if tamper == "both consistently":  # an attacker who rewrites the spec's own hash too
            import hashlib

            spec["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        spec_file.write_text(json.dumps(spec))
    with pytest.raises(ArtifactError) as err:
        fetch_student(logged["client"], f"runs:/{logged['run_id']}")
    message = str(err.value)
    assert "\n" not in message and "refusing to load" in message
    assert ("weights" if tamper == "weights" else "spec") in message


def test_cli_refuses_a_tampered_student_with_one_line_and_status_2(logged, tmp_path):
    _flip_a_byte(logged["files"] / "data" / DATA_DIR / WEIGHTS_FILE)
    proc = subprocess.run(
        [sys.executable, "-m", "afm_ray.export", "--model", f"runs:/{logged['run_id']}", "--format", "onnx"]
        + ["--out", str(tmp_path / "out"), "--tracking-uri", logged["uri"]],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: student weights") and "changed" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


def test_malformed_files_are_one_line_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no spec.json"):
        load_student(tmp_path)
    save_student(_student(), tmp_path, input_shape=(1, 8, 8))
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    spec["model"]["arch"] = "no_such_arch"
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="does not rebuild: unknown arch 'no_such_arch'"):
        load_student(tmp_path)
    # a pickle where the weights belong: never unpickled; it fails the hash first, and as safetensors after
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buffer)
    (tmp_path / WEIGHTS_FILE).write_bytes(buffer.getvalue())
    with pytest.raises(ArtifactError, match="changed after they were logged"):
        load_student(tmp_path)
