"""Ray glue: the Train worker entry point and the Tune function that launches one Train run.

Ray's current Train-in-Tune pattern: each Tune trial runs `train_driver_fn`, which builds a
`TorchTrainer` whose workers run `train_fn_per_worker` (afm_ray.train) through a reporter
that forwards to `ray.train.report`. Train's run name comes from the Tune trial id, so a
restored sweep finds each trial's checkpoints again.
"""

from __future__ import annotations

import functools
import tempfile
from typing import Any

import torch

from afm_ray.sweep.front_registry import registry_gate
from afm_ray.train import train_fn_per_worker


class RayTrainReporter:
    """`Reporter` for Ray Train workers: metrics and checkpoints go to `ray.train.report`; with a
    sweep's front registry (eval.aa_policy: candidates), `aa_gate` asks it before AutoAttack."""

    def __init__(self, front_registry: str | None = None) -> None:
        import ray.train.torch

        self.device: torch.device = ray.train.torch.get_device()
        if front_registry:
            self.aa_gate = registry_gate(front_registry)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def resume_checkpoint_dir(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        # A local copy: the checkpoint may live on S3/GCS.
        return checkpoint.to_directory(tempfile.mkdtemp(prefix="afm_ray_resume_"))


def ray_train_worker(config: dict[str, Any], front_registry: str | None = None) -> None:
    """`train_loop_per_worker` of the TorchTrainer (bound to the sweep's registry name, if any)."""
    train_fn_per_worker(config, RayTrainReporter(front_registry))


def train_driver_fn(config: dict[str, Any], runtime: dict[str, Any]) -> None:
    """The Tune function of one trial: run its distillation as a Ray Train run.

    `config` is the trial's flat experiment config; `runtime` (bound with
    `tune.with_parameters`) says where and how it runs: workers, resources, storage.
    """
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    use_gpu = runtime["gpus_per_worker"] > 0
    resources = {"CPU": runtime["cpus_per_worker"]}
    if use_gpu:
        resources["GPU"] = runtime["gpus_per_worker"]
    trainer = TorchTrainer(
        functools.partial(ray_train_worker, front_registry=runtime.get("front_registry")),
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=runtime["num_workers"], use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=runtime["storage_path"],
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=runtime["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
