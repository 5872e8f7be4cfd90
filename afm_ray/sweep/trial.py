"""Ray glue: the Train worker entry point and the Tune function that launches one Train run.

Ray's current Train-in-Tune pattern: each Tune trial runs `train_driver_fn`, which builds a
`TorchTrainer` whose workers run `train_fn_per_worker` (afm_ray.train) through a reporter
that forwards to `ray.train.report`. Train's run name comes from the Tune trial id, so a
restored sweep finds each trial's checkpoints again.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from ray.tune.integration.ray_train import TuneReportCallback

from afm_ray.names import NODE_ID_METRIC, trial_completion_path
from afm_ray.search.specs import GIB, TrialResources
from afm_ray.storage import read_bytes
from afm_ray.sweep.aa_gate import aa_gate
from afm_ray.train.loop import train_fn_per_worker

# What one running trial keeps beside its Train workers: this module's Tune function and the Train V2
# controller Ray pins to its node (with its placement-group cleaner and report queue), which only wait
# on the workers (no CPU). Measured together at 0.77 GB of PSS per trial on the simulated cluster
# (tests/test_cluster_sim.py, two trials on the head; each of the two big processes ~0.42 GB RSS, as
# both import torch); reserved as Ray `memory`, so Ray places no more drivers on a node (the head:
# it holds them while the GPU nodes come up) than its memory holds.
TRIAL_DRIVER_MEMORY = int(1 * GIB)
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}


@dataclass(frozen=True)
class TrialRuntime:
    """Where and how one distillation runs as a Ray Train run (bound to the Tune function of every trial)."""

    resources: TrialResources
    storage_path: str  # Train runs live here (the sweep's folder, or a confirmation's)
    max_failures: int  # worker failures a run survives, resuming from its last checkpoint
    aa_gate: str | None = None  # the named actor of staged evaluation (afm_ray.sweep.aa_gate), if any


class RayTrainReporter:
    """`Reporter` for Ray Train workers: metrics and checkpoints go to `ray.train.report`; with a
    sweep's actor of finished trials (eval.aa_policy: candidates), `aa_gate` asks it before AutoAttack."""

    def __init__(self, finished_trials: str | None = None) -> None:
        import ray
        import ray.train.torch

        self.device: torch.device = ray.train.torch.get_device()
        self.node_id: str = ray.get_runtime_context().get_node_id()
        if finished_trials:
            self.aa_gate = aa_gate(finished_trials)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, NODE_ID_METRIC: self.node_id}, checkpoint=checkpoint)

    def resume_checkpoint_dir(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        # A local copy: the checkpoint may live on S3/GCS.
        return checkpoint.to_directory(tempfile.mkdtemp(prefix="afm_ray_resume_"))


class NodeIdsReportCallback(TuneReportCallback):
    """TuneReportCallback forwards rank 0's metrics to Tune; this one also joins the node id every
    worker reported (`ray/node_id`), so the trial's MLflow run can name all of its nodes."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        nodes = dict.fromkeys(str(m[NODE_ID_METRIC]) for m in metrics if m.get(NODE_ID_METRIC))
        metrics = [{**metrics[0], NODE_ID_METRIC: ",".join(nodes)}, *metrics[1:]] if metrics else metrics
        super().after_report(run_context, metrics, checkpoint)


def ray_train_worker(config: dict[str, Any], finished_trials: str | None = None) -> None:
    """`train_loop_per_worker` of the TorchTrainer (bound to the sweep's gate actor name, if any)."""
    train_fn_per_worker(config, RayTrainReporter(finished_trials))


def build_trainer(
    config: dict[str, Any], runtime: TrialRuntime, *, name: str, callbacks: list[Any] | None = None
) -> Any:
    """The `TorchTrainer` of one distillation: `runtime` gives its workers, resources and storage.

    Train V2 resumes a run from its latest checkpoint when a trainer with the same `name` and
    storage starts again, so a stable name makes an interrupted run continue where it stopped.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    r = runtime.resources
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker, **r.worker_bundle()}
    return TorchTrainer(
        functools.partial(ray_train_worker, finished_trials=runtime.aa_gate),
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=runtime.storage_path,
            callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=runtime.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )


def recorded_completion(sweep_dir: str, trial_id: str) -> dict[str, Any] | None:
    """A trial's final result as the sweep's MLflow writer kept it once the trial completed
    (afm_ray.tracking.trial_tracker.record_completion); None when it has not completed (or the record cannot
    be read: the trial then runs again, from its last checkpoint)."""
    try:
        return json.loads(read_bytes(trial_completion_path(sweep_dir, trial_id)))
    except (OSError, ValueError):
        return None


def train_driver_fn(config: dict[str, Any], runtime: TrialRuntime) -> None:
    """The Tune function of one trial: run its distillation as a Ray Train run.

    `config` is the trial's flat experiment config; `runtime` (bound with
    `tune.with_parameters`) says where and how it runs: workers, resources, storage.
    """
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    recorded = recorded_completion(runtime.storage_path, trial_id)
    if recorded is not None:
        # It completed, but Tune's state was saved before it did (the sweep's driver died in between):
        # its final result again, nothing trained or evaluated again.
        ray.tune.report(recorded)
        return
    build_trainer(config, runtime, name=f"train-{trial_id}", callbacks=[NodeIdsReportCallback()]).fit()
    wait_for_reports_to_reach_tune()


def wait_for_reports_to_reach_tune(stable_s: float = 0.6, timeout_s: float = 120.0) -> None:
    """Return only once Tune's main thread has taken every report the Train run sent.

    Ray 2.60 deadlocks a trial otherwise (seen on the simulated cluster under load): when this function
    returns, Tune's thread posts its end-of-trial marker into the session's one-slot result queue; if the
    main thread is at that moment moving the Train run's last report (the final evaluation) from the
    inter-actor queue into that same slot, its `put` blocks forever and the trial never completes.
    Both queues empty for `stable_s` means the main thread has moved and consumed the last report.
    """
    from ray.train._internal.session import get_session

    session = get_session()
    inter_actor = getattr(session, "_inter_actor_queue", None)
    if session is None or inter_actor is None:  # not inside Tune, or a Ray without the inter-actor queue
        return
    deadline, stable_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if inter_actor.empty() and session.result_queue.empty():
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since >= stable_s:
                return
        else:
            stable_since = None
        time.sleep(0.1)
