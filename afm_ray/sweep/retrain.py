"""Train a recorded configuration again as a Ray Train run, outside any sweep: what `pareto --confirm`
(afm_ray.pareto.confirm) and the final stage (afm_ray.final) both run.

A retrain is the sweep's own `TorchTrainer` (afm_ray.sweep.trial.build_trainer: the same workers,
resources and storage rules), started from a Ray task that takes no CPU and only waits on it, so
it can be scheduled like a sweep's trial driver. Train V2 resumes a run from its latest checkpoint
when a trainer with the same name and storage starts again: a stable name makes an interrupted
retrain continue.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ray
import ray.train
from mlflow import MlflowClient

from afm_ray import names
from afm_ray.checkpoints import load_model, load_training_state
from afm_ray.config import from_flat
from afm_ray.data import load_run_data
from afm_ray.sweep.trial import TRIAL_DRIVER_MEMORY, TrialRuntime, build_trainer
from afm_ray.tracking.run_config import sweep_space
from afm_ray.tracking.student_model import SPEC_FILE, WEIGHTS_FILE, save_student


@ray.remote(num_cpus=0)
class LastReport:
    """Holds the last metrics a Train run reported (its final evaluation)."""

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}

    def put(self, metrics: dict[str, Any]) -> None:
        self.metrics = metrics

    def get(self) -> dict[str, Any]:
        return self.metrics


class KeepLastReport(ray.train.UserCallback):
    """Train V2's `Result.metrics` are those of the last report *with a checkpoint* (the last epoch);
    the final evaluation is reported without one, so it is caught here, on Train's controller."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:
            ray.get(self.sink.put.remote(dict(metrics[0])))  # rank 0's


def retrain(flat: dict[str, Any], runtime: TrialRuntime, name: str) -> tuple[dict[str, float], bytes, bytes]:
    """Train ``flat`` as the Train run ``name``: its final metrics and its student (spec.json and
    safetensors bytes, afm_ray.tracking.student_model). Run it as a Ray task (`retrain_task`)."""
    sink = LastReport.remote()
    result = build_trainer(flat, runtime, name=name, callbacks=[KeepLastReport(sink)]).fit()
    final = ray.get(sink.get.remote())
    if not final.get(names.FINAL_RESULT_FLAG):
        raise RuntimeError(f"Train run {name} ended without its final evaluation (last report: {sorted(final)})")
    with tempfile.TemporaryDirectory(prefix="afm_ray_retrain_") as tmp:
        local = result.checkpoint.to_directory(f"{tmp}/checkpoint")
        cfg = from_flat(load_training_state(local)["config"])
        data = load_run_data(cfg)
        model, _ = load_model(local, data)
        save_student(model, f"{tmp}/student", input_shape=data.image_shape)
        files = (Path(tmp) / "student" / SPEC_FILE).read_bytes(), (Path(tmp) / "student" / WEIGHTS_FILE).read_bytes()
    return {k: float(v) for k, v in final.items() if isinstance(v, (int, float))}, *files


def retrain_task() -> Any:
    """`retrain` as a Ray task: no CPU (its Train run's workers hold the resources), and the memory a
    sweep's trial driver reserves, since it keeps a Train controller beside it the same way."""
    return ray.remote(retrain).options(num_cpus=0, memory=TRIAL_DRIVER_MEMORY)


def sweep_runtime(client: MlflowClient, sweep_run: str, folder: str) -> TrialRuntime:
    """Workers, resources and storage of the sweep that ran a trial (its logged space and storage),
    with Train runs under ``<sweep storage>/<folder>``."""
    space, storage = sweep_space(client, sweep_run)
    return TrialRuntime(space.resources, storage_path=f"{storage}/{folder}", max_failures=space.max_failures)


def state_bytes(model: Any) -> bytes:
    """A model's weights as safetensors bytes (what a Ray task receives instead of a pickled module)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def next_finished(refs: Iterable[Any]) -> Any | None:
    """A finished one of ``refs``, or None after a second: short waits, so Ctrl-C is seen within a second
    (one unbounded `ray.wait` held it off for as long as a job ran)."""
    ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
    return ready[0] if ready else None


def cancel_jobs(client: MlflowClient, run_ids: Mapping[Any, str]) -> None:
    """Ctrl-C or SIGTERM: stop the jobs still running on the cluster (a retrain's Train run goes with its
    task) and mark their MLflow runs KILLED; the next call continues them."""
    for ref, run_id in run_ids.items():
        ray.cancel(ref, force=True, recursive=True)
        client.set_terminated(run_id, status="KILLED")
