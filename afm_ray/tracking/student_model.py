"""A student as files that load without running stored code: safetensors weights and a JSON spec.

    <model dir>/MLmodel                      MLflow's description: pyfunc flavour, signature, input example
    <model dir>/data/afm_student/model.safetensors  the state dict (safetensors: tensors only, no pickle)
    <model dir>/data/afm_student/spec.json          how to rebuild it: arch, width/depth, classes,
                                                    channels, mean/std, input shape, the weights' sha256

`load_student` reads only those two files: JSON and safetensors, never pickle, and it rebuilds the
architecture from this package's own code (afm_ray.models). It refuses a changed artifact: the
weights must match the sha256 in the spec, and the spec must match the sha256 the sweep recorded
in the tracking store (run tag `afm_ray.student_sha256`, copied to registered versions), which lives
apart from the artifact store the files are in. `mlflow.pyfunc.load_model` works too (the MLmodel
names this module as its loader), but any MLflow loader trusts the MLmodel file it reads, so use
`load_student` / `fetch_student` for artifacts someone else could have written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from afm_ray import __version__
from afm_ray.errors import ArtifactError
from afm_ray.models import build_model, model_spec, unwrap
from afm_ray.names import MODEL_ERROR_TAG, STUDENT_MODEL, STUDENT_SHA_TAG
from afm_ray.tracking.mlflow_runs import quote

FORMAT = "afm-ray-student/1"
DATA_DIR = "afm_student"  # the pyfunc model's data folder
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_student(model: nn.Module, directory: str | Path, *, input_shape: tuple[int, ...]) -> str:
    """Write ``model`` (a `build_model` model) as safetensors + spec.json; returns the spec's sha256."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    # contiguous CPU copies: safetensors stores plain buffers (channels_last weights are strided)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights = save_safetensors(state, metadata={"format": FORMAT})
    spec = {
        "format": FORMAT,
        "model": model_spec(model),
        "input_shape": [int(d) for d in input_shape],
        "weights_sha256": sha256(weights),
        "torch": torch.__version__.split("+")[0],
        "afm_ray": __version__,
    }
    text = json.dumps(spec, indent=1, sort_keys=True).encode()
    (directory / WEIGHTS_FILE).write_bytes(weights)
    (directory / SPEC_FILE).write_bytes(text)
    return sha256(text)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"student {what} {path} cannot be read ({exc.strerror or exc})") from None


def read_spec(directory: str | Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """The student's spec.json, checked: an afm-ray spec, and (if given) the sha256 the tracking store holds."""
    directory = Path(directory)
    # a student folder, or an MLflow model folder with the student in its data folder
    for inner in (Path("data") / DATA_DIR, Path(DATA_DIR)):
        if not (directory / SPEC_FILE).is_file() and (directory / inner / SPEC_FILE).is_file():
            directory = directory / inner
    if not (directory / SPEC_FILE).is_file():
        raise ArtifactError(
            f"no {SPEC_FILE} in {directory}: expected a student saved by afm_ray.tracking.student_model "
            f"({WEIGHTS_FILE} + {SPEC_FILE})"
        )
    text = _read(directory / SPEC_FILE, "spec")
    if expected_sha256 and sha256(text) != expected_sha256:
        raise ArtifactError(
            f"student spec {directory / SPEC_FILE} was changed after it was logged: sha256 {sha256(text)[:12]}..., "
            f"the tracking store recorded {expected_sha256[:12]}...; refusing to load it"
        )
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(f"student spec {directory / SPEC_FILE} is not JSON ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or not isinstance(spec.get("model"), dict):
        raise ArtifactError(f"student spec {directory / SPEC_FILE}: expected format {FORMAT!r} with a 'model' entry")
    spec["_dir"] = str(directory)
    return spec


def load_student(
    directory: str | Path, *, expected_sha256: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, spec) from a student folder or MLflow model folder; JSON and safetensors only.

    An ArtifactError (one line) if a file is missing or malformed, the weights do not match the
    spec's sha256, or the spec does not match ``expected_sha256`` (the tracking store's record).
    """
    spec = read_spec(directory, expected_sha256)
    path = Path(spec.pop("_dir")) / WEIGHTS_FILE
    weights = _read(path, "weights")
    if sha256(weights) != spec.get("weights_sha256"):
        raise ArtifactError(
            f"student weights {path} were changed after they were logged: sha256 {sha256(weights)[:12]}... "
            f"does not match its spec's {str(spec.get('weights_sha256'))[:12]}...; refusing to load them"
        )
    try:
        state = load_safetensors(weights)
        model = build_model(**spec["model"])
        model.load_state_dict(state)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise ArtifactError(f"student {path} does not rebuild: {' '.join(str(exc).split())[:300]}") from None
    return model.to(device).eval(), spec


# --------------------------------------------------------------------------------------------
# MLflow: the pyfunc model (loader_module = this module), logged through a client


class StudentPyfunc:
    """What `mlflow.pyfunc.load_model` returns: predict(images (N, C, H, W) in [0, 1]) -> logits."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


def _load_pyfunc(data_path: str) -> StudentPyfunc:
    """MLflow's loader_module entry point: the student from the model's data folder."""
    return StudentPyfunc(load_student(data_path)[0])


def save_mlflow_model(model: nn.Module, path: str | Path, *, input_shape: tuple[int, ...]) -> str:
    """An MLflow pyfunc model folder at ``path`` (no pickle anywhere); returns the spec's sha256."""
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import save_model
    from mlflow.types import Schema, TensorSpec

    with tempfile.TemporaryDirectory(prefix="afm_ray_student_") as tmp:
        data = Path(tmp) / DATA_DIR
        digest = save_student(model, data, input_shape=input_shape)
        classes = model_spec(model)["num_classes"]
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]),
        )
        save_model(
            str(path),
            loader_module=__name__,
            data_path=str(data),
            signature=signature,
            input_example=np.full((1, *input_shape), 0.5, dtype=np.float32),  # a mid-grey image
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"afm-ray=={__version__}", "safetensors"],
        )
    return digest


def log_student(
    client: MlflowClient, run_id: str, model: nn.Module, *, input_shape: tuple[int, ...], name: str = STUDENT_MODEL
) -> str:
    """Log ``model`` as the run's MLflow logged model ``name`` and record its sha256 on the run; returns the id."""
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="afm_ray_mlmodel_") as tmp:
            digest = save_mlflow_model(model, Path(tmp) / "model", input_shape=input_shape)
            client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
        client.set_logged_model_tags(logged.model_id, {STUDENT_SHA_TAG: digest})
        client.set_tag(run_id, STUDENT_SHA_TAG, digest)
    except Exception:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id


def student_source(client: MlflowClient, run_id: str, name: str = STUDENT_MODEL) -> tuple[str, str | None]:
    """(artifact location, logged model id) of run ``run_id``'s student: the newest READY logged model
    ``name``. An ArtifactError says what the run has."""
    # Not models:/<id>: MLflow's SQL registry resolves such a source through a client on the
    # process-wide tracking URI, which need not be ours.
    run = client.get_run(run_id)
    exp_id, by_run = run.info.experiment_id, f"source_run_id = {quote(run_id)}"
    found = client.search_logged_models([exp_id], filter_string=f"{by_run} AND name = {quote(name)}")
    found = [lm for lm in found if str(lm.status) != "FAILED"]
    if found:
        latest = max(found, key=lambda lm: lm.creation_timestamp or 0)
        return latest.artifact_location, latest.model_id
    logged = ", ".join(sorted({lm.name for lm in client.search_logged_models([exp_id], filter_string=by_run)}))
    why = run.data.tags.get(MODEL_ERROR_TAG)  # the sweep keeps a trial whose student failed to log
    raise ArtifactError(
        f"run {run_id} has no logged model named {name!r} (its logged models: {logged or 'none'}"
        + (f"; {MODEL_ERROR_TAG}: {why}" if why else "")
        + f"); the sweep logs it with afm_ray.tracking.student_model.log_student(..., name={name!r})"
    )


def resolve_uri(client: MlflowClient, uri: str) -> tuple[str, str | None, str]:
    """(artifact location, expected spec sha256, run id) of ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``
    or ``runs:/RUN_ID`` (that run's student); the sha256 comes from the tracking store."""
    if uri.startswith("models:/"):
        name, _, ref = uri.removeprefix("models:/").rstrip("/").partition("@")
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.rpartition("/")
            if not (name and number.isdigit()):
                raise ArtifactError(f"model URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
            version = client.get_model_version(name, number)
        expected = version.tags.get(STUDENT_SHA_TAG) or client.get_run(version.run_id).data.tags.get(STUDENT_SHA_TAG)
        return client.get_model_version_download_uri(name, version.version), expected, version.run_id
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/", 1)[0]
        location, _ = student_source(client, run_id)
        return location, client.get_run(run_id).data.tags.get(STUDENT_SHA_TAG), run_id
    raise ArtifactError(f"model URI {uri!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID")


def fetch_student(client: MlflowClient, uri: str, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Download and `load_student` a student named by an MLflow URI (see `resolve_uri`), through ``client``
    only: the process-wide MLflow URIs belong to the caller. A student logged without the tracking
    store's sha256 (by hand) loads on its spec's own check; the spec's ``run_id`` says where it came from."""
    try:
        location, expected, run_id = resolve_uri(client, uri)
    except (MlflowException, ValueError) as exc:  # an unknown name, alias, version or run
        why = " ".join(str(getattr(exc, "message", None) or exc).split())
        raise ArtifactError(f"{uri}: {why}{_what_exists(client, uri)}") from None
    with tempfile.TemporaryDirectory(prefix="afm_ray_fetch_") as tmp:
        model, spec = load_student(_download(client, location, tmp), expected_sha256=expected, device=device)
    return model, {**spec, "run_id": run_id, "uri": uri}


def _what_exists(client: MlflowClient, uri: str) -> str:
    """For an error about ``uri``: the aliases and versions its registered model has, or the registered
    models there are (a name, alias or version that does not exist is a typo to fix, so list the real ones)."""
    if not uri.startswith("models:/"):
        return ""
    name = uri.removeprefix("models:/").rstrip("/").partition("@")[0]
    name = name.rpartition("/")[0] if "@" not in uri and "/" in name else name
    try:
        found = client.search_registered_models(filter_string=f"name = {quote(name)}")
        if found:
            model = found[0]
            aliases = ", ".join(f"@{a}" for a in sorted(model.aliases)) or "none"
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = {quote(name)}"))
            return f"; model {name!r} has aliases {aliases} and versions {', '.join(map(str, versions)) or 'none'}"
        known = sorted(m.name for m in client.search_registered_models(max_results=100))
        return f"; registered models there: {', '.join(known) or 'none'}"
    except MlflowException:  # the store itself fails: the error above says enough
        return ""


def _download(client: MlflowClient, location: str, dst: str) -> str:
    """The student's two files (not the whole MLflow model), quietly; what is missing, `load_student` names."""
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one bar per file otherwise
    try:
        with contextlib.suppress(MlflowException, OSError):
            download_artifacts(
                f"{location.rstrip('/')}/data/{DATA_DIR}", dst_path=dst, tracking_uri=client.tracking_uri
            )
        return dst
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous
