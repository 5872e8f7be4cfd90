"""MLflow layout of a sweep: one parent run per sweep, one child run per trial.

Child runs are written by `TrialTracker`, Ray's own `MLflowLoggerCallback` extended with
what a sweep needs: nesting (tag `mlflow.parentRunId`), the full resolved config as params,
only our metrics, a trial status tag, the student as an MLflow PyTorch model, and re-use
of a trial's run when a sweep is resumed (so no run is ever duplicated).

We never call `mlflow.set_experiment` in the driver: it exports MLFLOW_EXPERIMENT_ID,
which would override the callback's experiment.
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from ray.air.integrations.mlflow import MLflowLoggerCallback

from afm_ray.config import ConfigError, from_flat, to_flat

ROLE_TAG = "afm_ray.role"
STATUS_TAG = "afm_ray.trial_status"
TRIAL_ID_TAG = "afm_ray.trial_id"
SWEEP_TAG = "afm_ray.sweep_name"
PARENT_TAG = "mlflow.parentRunId"
FINAL_METRICS = ("clean_acc", "pgd20_acc", "cw_acc", "aa_acc", "params", "latency_ms", "eval/n_samples", "eval/eps")
EVAL_PROTOCOL = ("clean; pgd20: PGD-20 on CE, step eps/4, uniform start; cw: PGD-20 on the CW margin, step eps/4; "
                 "aa: AutoAttack standard (pyautoattack)")


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite file in the working directory (absolute URI)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before Ray starts, if the tracking backend cannot be reached."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise ConfigError(f"MLflow server {uri} answered /health with HTTP {response.status}")
        except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                              f"(mlflow server --host 127.0.0.1 --port 5000) or pass another --tracking-uri") from None
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if path is None or not path.is_absolute():
            raise ConfigError(f"tracking URI {uri!r}: use an absolute SQLite URI, e.g. sqlite:////abs/path/mlflow.db")
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise ConfigError(f"tracking URI {uri!r}: folder {path.parent} does not exist or is not writable")
    elif parsed.scheme in ("", "file"):
        raise ConfigError(f"tracking URI {uri!r}: MLflow's file store is disabled; use sqlite:///<absolute path> "
                          f"or http://host:port of an mlflow server")
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise ConfigError(f"tracking URI {uri!r} is not usable: {str(exc).splitlines()[0]}") from None


def experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name)
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) or pick another --experiment")
    return experiment.experiment_id


def start_or_resume_sweep_run(client: Any, experiment: str, sweep_name: str, params: Mapping[str, Any],
                              space_text: str, resume: bool) -> str:
    """The sweep's parent run: created once, found again by name on --resume."""
    exp_id = experiment_id(client, experiment)
    if resume:
        found = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`{ROLE_TAG}` = 'sweep'")
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id
    run = client.create_run(exp_id, run_name=sweep_name, tags={ROLE_TAG: "sweep", SWEEP_TAG: sweep_name})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    client.log_text(run.info.run_id, space_text, "search_space.yaml")
    return run.info.run_id


class TrialTracker(MLflowLoggerCallback):
    """One MLflow child run per Tune trial (see the module docstring)."""

    def __init__(self, tracking_uri: str, *, experiment_name: str, parent_run_id: str, sweep_name: str,
                 log_model: bool = True):
        super().__init__(tracking_uri, experiment_name=experiment_name,
                         tags={PARENT_TAG: parent_run_id, ROLE_TAG: "trial", SWEEP_TAG: sweep_name})
        self.parent_run_id = parent_run_id
        self.log_model = log_model
        self._last_checkpoint: dict[str, str] = {}

    def setup(self, *args: Any, **kwargs: Any) -> None:
        super().setup(*args, **kwargs)
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(self.tracking_uri)
        self._experiment_id = self.mlflow_util.experiment_id

    def _existing_run(self, trial_id: str) -> str | None:
        runs = self._client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
        )
        return runs[0].info.run_id if runs else None

    def log_trial_start(self, trial: Any) -> None:
        if trial not in self._trial_runs:
            run_id = self._existing_run(trial.trial_id)
            if run_id is None:
                tags = {**self.tags, TRIAL_ID_TAG: trial.trial_id, "trial_name": str(trial)}
                run_id = self._client.create_run(self._experiment_id, run_name=str(trial), tags=tags).info.run_id
                self._log_params(run_id, trial.config)
            else:
                self._client.update_run(run_id, status="RUNNING")
            self._trial_runs[trial] = run_id
        self._client.set_tag(self._trial_runs[trial], STATUS_TAG, "running")

    def _log_params(self, run_id: str, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        # The full resolved config, so the run can be re-run from its params alone.
        flat = to_flat(from_flat(config))
        params = [Param(k, str(v)) for k, v in flat.items()]
        params.append(Param("eval.protocol", EVAL_PROTOCOL))
        for i in range(0, len(params), 100):
            self._client.log_batch(run_id, params=params[i : i + 100])

    def log_trial_result(self, iteration: int, trial: Any, result: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        run_id = self._trial_runs[trial]
        if result.get("checkpoint_path"):
            self._last_checkpoint[trial.trial_id] = result["checkpoint_path"]
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        timestamp = int(result.get("timestamp", 0) * 1000)
        # The final result repeats the last epoch's curves (for schedulers); log them once.
        curves = () if result.get("done") else ("train/", "val/", "run/")
        metrics = [
            Metric(key, float(value), timestamp, step)
            for key, value in result.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and (key.startswith(curves + ("time/", "eval/")) or key in FINAL_METRICS)
        ]
        if metrics:
            self._client.log_batch(run_id, metrics=metrics)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        run_id = self._trial_runs[trial]
        last = trial.last_result or {}
        status = "failed" if failed else "completed" if last.get("done") else "early_stopped"
        if status == "completed" and self.log_model:
            try:
                self._log_student(run_id, trial)
            except Exception as exc:  # the metrics are recorded; a missing model must not lose them
                self._client.set_tag(run_id, "afm_ray.model_error", f"{type(exc).__name__}: {exc}"[:5000])
        self._client.set_tag(run_id, STATUS_TAG, status)
        self._client.set_terminated(run_id, status={"completed": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))

    def _log_student(self, run_id: str, trial: Any) -> None:
        import mlflow
        import torch

        from afm_ray import __version__
        from afm_ray.checkpoints import load_model, load_training_state
        from afm_ray.train import load_run_data

        path = self._last_checkpoint.get(trial.trial_id)
        if not path:
            raise FileNotFoundError(f"trial {trial.trial_id} reported no checkpoint")
        with tempfile.TemporaryDirectory(prefix="afm_ray_student_") as tmp:
            local = fetch_directory(path, tmp)
            cfg = from_flat(load_training_state(local)["config"])
            model, _ = load_model(local, load_run_data(cfg))
            model.eval()
            with _resumed(run_id), _quiet("mlflow.pytorch"):
                # Pickle, not pt2: a pt2 export freezes the train/eval mode and refuses
                # .eval(), which the evaluation attacks call.
                mlflow.pytorch.log_model(
                    model, name="student", serialization_format="pickle",
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"afm-ray=={__version__}"],
                )


class _resumed:
    """Make `run_id` MLflow's active run for fluent calls without changing its status."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def __enter__(self) -> None:
        import mlflow

        mlflow.start_run(run_id=self.run_id)

    def __exit__(self, *exc: object) -> None:
        import mlflow

        mlflow.end_run(status="RUNNING")


class _quiet:
    """Silence one logger (MLflow warns on every pickled model; the choice is deliberate)."""

    def __init__(self, name: str):
        import logging

        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(40)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


def fetch_directory(uri_or_path: str, destination: str) -> str:
    """A local copy of a checkpoint directory that may live on S3/GCS (pyarrow filesystems)."""
    if "://" not in uri_or_path and Path(uri_or_path).exists():
        return uri_or_path
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri_or_path)
    pafs.copy_files(root, destination, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return destination
