"""MLflow layout of a sweep: one parent run per sweep, one child run per trial.

Child runs are written by `TrialTracker`, Ray's own `MLflowLoggerCallback` extended with
what a sweep needs: nesting (tag `mlflow.parentRunId`), the full resolved config as params,
only our metrics, a trial status tag, the student as an MLflow model (safetensors,
afm_ray.tracking.student_model), and re-use of a trial's run when a sweep is resumed (so no run is ever duplicated).

Tune saves its own state (which trials ended) only every ten seconds or so: a sweep resumed after its driver
died (the head lost) may start again a trial that had completed. So each completed trial's final result is also
written to the sweep's storage (`record_completion`, once MLflow holds everything of it): such a trial's
Tune function reports it again without training or evaluating (afm_ray.sweep.trial), and its MLflow run, already
complete, is left as it was. A trial that Tune started after its last save is unknown to the restored sweep:
its run, left RUNNING, is deleted, and its Optuna trial runs again under a new trial id.

We never call `mlflow.set_experiment` in the driver: it exports MLFLOW_EXPERIMENT_ID,
which would override the callback's experiment.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS, DONE, SHOULD_CHECKPOINT, TRIAL_ID

from afm_ray.checkpoints import checkpoint_data_spec, load_model
from afm_ray.config import from_flat, to_flat
from afm_ray.credentials import recall, redact_uri
from afm_ray.errors import ConfigError
from afm_ray.names import (
    AA_SKIP_REASON_KEY,
    AA_SKIPPED_TAG,
    EVAL_PROTOCOLS,
    FINAL_METRICS,
    FINAL_RESULT_FLAG,
    MODEL_ERROR_TAG,
    NODE_ID_METRIC,
    NODE_ID_TAG,
    PARENT_TAG,
    ROLE_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    TRIAL_STATUS_TAG,
    trial_completion_path,
)
from afm_ray.storage import local_directory, write_bytes
from afm_ray.tracking.mlflow_runs import tags_match
from afm_ray.tracking.student_model import log_student

# Logged as param `eval.protocol` on every trial, so a run says how its numbers were measured.
EVAL_PROTOCOL = "; ".join(f"{name}: {text}" for name, text in EVAL_PROTOCOLS.items() if name != "pgd10")


class RedactingClient(MlflowClient):
    """An MlflowClient whose params and tags pass through `redact_uri`: the backstop that keeps a
    credential out of MLflow whatever a caller logs (a URI, an exception's text)."""

    def log_param(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> Any:
        return super().log_param(run_id, key, redact_uri(str(value)), synchronous=synchronous)

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> Any:
        return super().set_tag(run_id, key, redact_uri(str(value)), synchronous=synchronous)

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Metric] = (),
        params: Sequence[Param] = (),
        tags: Sequence[RunTag] = (),
        synchronous: bool | None = None,
    ) -> Any:
        params = [Param(p.key, redact_uri(str(p.value))) for p in params]
        tags = [RunTag(t.key, redact_uri(str(t.value))) for t in tags]
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    def create_run(
        self,
        experiment_id: str,
        start_time: int | None = None,
        tags: Mapping[str, Any] | None = None,
        run_name: str | None = None,
    ) -> Any:
        tags = {k: redact_uri(str(v)) for k, v in (tags or {}).items()}
        return super().create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name)


def experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another sweep on the same store created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) "
            "or pick another --experiment"
        )
    return experiment.experiment_id


def start_or_resume_sweep_run(
    client: Any, experiment: str, sweep_name: str, params: Mapping[str, Any], space_text: str, resume: bool
) -> str:
    """The sweep's parent run: created once, found again by name on --resume."""
    exp_id = experiment_id(client, experiment)
    if resume:
        found = client.search_runs([exp_id], filter_string=tags_match({SWEEP_TAG: sweep_name, ROLE_TAG: "sweep"}))
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id
    run = client.create_run(exp_id, run_name=sweep_name, tags={ROLE_TAG: "sweep", SWEEP_TAG: sweep_name})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    client.log_text(run.info.run_id, space_text, "search_space.yaml")
    return run.info.run_id


# Tune's own keys of a result (and the config): Tune adds them to what a Tune function reports.
_TUNE_KEYS = frozenset(AUTO_RESULT_KEYS) | {DONE, TRIAL_ID, "experiment_tag", SHOULD_CHECKPOINT}


def record_completion(sweep_dir: str, trial_id: str, result: Mapping[str, Any]) -> None:
    """Keep a completed trial's final result (its values that a Tune function can report again)."""
    kept = {k: v for k, v in result.items() if k not in _TUNE_KEYS and isinstance(v, (bool, int, float, str))}
    write_bytes(trial_completion_path(sweep_dir, trial_id), json.dumps(kept).encode())


class TrialTracker(MLflowLoggerCallback):
    """One MLflow child run per Tune trial (see the module docstring). With `sweep_dir`, each completed
    trial's final result is also kept there (`record_completion`)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment_name: str,
        parent_run_id: str,
        sweep_name: str,
        log_model: bool = True,
        sweep_dir: str | None = None,
    ):
        super().__init__(
            tracking_uri,
            experiment_name=experiment_name,
            tags={PARENT_TAG: parent_run_id, ROLE_TAG: "trial", SWEEP_TAG: sweep_name},
        )
        self.parent_run_id = parent_run_id
        self.log_model = log_model
        self.sweep_dir = sweep_dir
        self._replayed: set[str] = set()  # trials whose run was complete when they started again: left alone
        self._orphans_checked = False
        self._last_checkpoint: dict[str, str] = {}
        self._node_ids: dict[str, list[str]] = {}  # per trial, every node its workers ran on, in order
        self._started: dict[str, float] = {}  # per trial, when this driver saw it start (monotonic)

    # Tune pickles its callbacks into the sweep's folder (tuner.pkl): the tracking URI goes there
    # redacted, and comes back whole in the driver that remembered it (afm_ray.credentials).
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tracking_uri": redact_uri(str(self.tracking_uri))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"sweep_dir": None, "_replayed": set(), "_orphans_checked": False})  # older pickles
        self.__dict__.update({**state, "tracking_uri": recall(state["tracking_uri"])})

    def setup(self, *args: Any, **kwargs: Any) -> None:
        super().setup(*args, **kwargs)
        self._client = RedactingClient(self.tracking_uri)
        self._experiment_id = self.mlflow_util.experiment_id
        self._orphans_checked = False

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self._orphans_checked:  # once per driver: Tune has restored every trial it saved by now
            self._orphans_checked = True
            self._drop_orphans({t.trial_id for t in trials})
        super().on_trial_start(iteration, trials, trial, **info)

    def _drop_orphans(self, known: set[str]) -> None:
        """Runs of trials that Tune started after it last saved its state, left RUNNING by a driver that died:
        Tune knows them no more, and their Optuna trials run again under new trial ids (afm_ray.sweep.driver).
        Deleted (MLflow keeps them restorable), so that each trial has one run."""
        running = f"{tags_match({PARENT_TAG: self.parent_run_id})} and attributes.status = 'RUNNING'"
        for run in self._client.search_runs([self._experiment_id], filter_string=running):
            if run.data.tags.get(ROLE_TAG) == "trial" and run.data.tags.get(TRIAL_ID_TAG) not in known:
                self._client.set_terminated(run.info.run_id, status="KILLED")
                self._client.delete_run(run.info.run_id)

    def _existing_run(self, trial_id: str) -> Any:
        runs = self._client.search_runs(
            [self._experiment_id],
            filter_string=tags_match({TRIAL_ID_TAG: trial_id, PARENT_TAG: self.parent_run_id}),
        )
        return runs[0] if runs else None

    def log_trial_start(self, trial: Any) -> None:
        if trial not in self._trial_runs:
            run = self._existing_run(trial.trial_id)
            run_id = run.info.run_id if run else None
            if run is not None and run.data.tags.get(TRIAL_STATUS_TAG) == "completed":
                # Completed before the sweep's driver died, after Tune last saved its state: it only
                # reports its recorded final result again (afm_ray.sweep.trial), which is logged already.
                self._replayed.add(trial.trial_id)
                self._trial_runs[trial] = run_id
                return
            if run_id is None:
                # One name per trial: the MLflow run is named by the trial id the sweep's lines show.
                tags = {**self.tags, TRIAL_ID_TAG: trial.trial_id, "trial_name": str(trial)}
                run_id = self._client.create_run(self._experiment_id, run_name=trial.trial_id, tags=tags).info.run_id
                self._log_params(run_id, trial.config)
            else:
                self._client.update_run(run_id, status="RUNNING")
            self._trial_runs[trial] = run_id
        self._started.setdefault(trial.trial_id, time.monotonic())
        self._client.set_tag(self._trial_runs[trial], TRIAL_STATUS_TAG, "running")

    def _log_params(self, run_id: str, config: Mapping[str, Any]) -> None:
        # The full resolved config, so the run can be re-run from its params alone.
        flat = to_flat(from_flat(config))
        params = [Param(k, redact_uri(str(v))) for k, v in flat.items()]  # no credentials in MLflow
        params.append(Param("eval.protocol", EVAL_PROTOCOL))
        for i in range(0, len(params), 100):
            self._client.log_batch(run_id, params=params[i : i + 100])

    def log_trial_result(self, iteration: int, trial: Any, result: Mapping[str, Any]) -> None:
        if trial.trial_id in self._replayed:
            return
        run_id = self._trial_runs[trial]
        if result.get("checkpoint_path"):
            self._last_checkpoint[trial.trial_id] = result["checkpoint_path"]
        nodes = self._node_ids.setdefault(trial.trial_id, [])
        if new := [n for n in str(result.get(NODE_ID_METRIC) or "").split(",") if n and n not in nodes]:
            nodes += new  # a restarted worker group may run elsewhere: the tag keeps every node
            self._client.set_tag(run_id, NODE_ID_TAG, ",".join(nodes))
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        timestamp = int(result.get("timestamp", 0) * 1000)
        # The final result repeats the last epoch's curves (for schedulers); log them once.
        curves = () if result.get(FINAL_RESULT_FLAG) else ("train/", "val/", "run/")
        metrics = [
            Metric(key, float(value), timestamp, step)
            for key, value in result.items()
            if isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (key.startswith(curves + ("time/", "eval/")) or key in FINAL_METRICS)
        ]
        if metrics:
            self._client.log_batch(run_id, metrics=metrics)
        if result.get(FINAL_RESULT_FLAG) and result.get(AA_SKIP_REASON_KEY):
            # No aa_acc: pareto leaves the trial out and says why (eval.aa_policy: candidates).
            self._client.set_tag(run_id, AA_SKIPPED_TAG, str(result[AA_SKIP_REASON_KEY])[:5000])

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial.trial_id in self._replayed:
            return
        run_id = self._trial_runs[trial]
        last = trial.last_result or {}
        status = "failed" if failed else "completed" if last.get(FINAL_RESULT_FLAG) else "early_stopped"
        if status == "completed" and self.log_model:
            try:
                self._log_student(run_id, trial)
            except Exception as exc:  # the metrics are recorded; a missing model must not lose them
                self._client.set_tag(run_id, MODEL_ERROR_TAG, f"{type(exc).__name__}: {exc}"[:5000])
        if status == "completed" and trial.trial_id in self._started:
            # The trial's wall time as the driver saw it, Ray's start-up and tear-down included: with
            # time/worker_s it says what a re-run costs on this cluster (afm_ray.pareto.estimate).
            took = time.monotonic() - self._started.pop(trial.trial_id)
            self._client.log_metric(run_id, "time/trial_s", took, step=int(last.get("epoch", 0)))
        self._client.set_tag(run_id, TRIAL_STATUS_TAG, status)
        self._client.set_terminated(run_id, status={"completed": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))
        if status == "completed" and self.sweep_dir:  # last: MLflow holds all of the trial
            record_completion(self.sweep_dir, trial.trial_id, last)

    def _log_student(self, run_id: str, trial: Any) -> None:
        path = self._last_checkpoint.get(trial.trial_id)
        if not path:
            raise FileNotFoundError(f"trial {trial.trial_id} reported no checkpoint")
        with tempfile.TemporaryDirectory(prefix="afm_ray_student_") as tmp:
            local = local_directory(path, tmp)
            # From the checkpoint's own data description: no dataset on the driver.
            model, _ = load_model(local)
            shape = checkpoint_data_spec(local).image_shape
            log_student(self._client, run_id, model.eval(), input_shape=shape)  # safetensors, no pickle
