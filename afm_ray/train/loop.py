"""One distillation run: `train_fn_per_worker`, a plain training loop.

The same function runs in a plain process (`python -m afm_ray.train`, afm_ray.cli) and, unchanged,
as a Ray Train worker: everything Ray-specific is behind the small `Reporter` hook (metrics +
checkpoints out, a checkpoint to resume from in). Under DDP only the student is wrapped;
the frozen teacher is a plain module on every worker.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from afm_ray import attacks, checkpoints
from afm_ray.augment import BatchAugment
from afm_ray.config import ExperimentConfig, from_flat, to_flat
from afm_ray.data import (
    DeviceBatchLoader,
    ImageDataset,
    load_run_data,
    split_validation,
    to_unit,
)
from afm_ray.devices import WorkerContext, all_reduce_sum, amp_dtype_for, worker_context
from afm_ray.errors import ConfigError
from afm_ray.eval_batch import resolve_eval_batch_size
from afm_ray.evaluate.protocol import final_evaluation
from afm_ray.methods import AttackSpec, build_method
from afm_ray.models import build_model, model_kwargs, unwrap
from afm_ray.names import HPARAM_NAMES
from afm_ray.student_weights import StudentWeights
from afm_ray.teacher.members import load_teachers


class Reporter(Protocol):
    """Where a run's metrics and checkpoints go, and where a resumed run starts from.

    A reporter may also carry `device`: the accelerator its framework assigned this worker, and
    `aa_gate`: a sweep's staged-evaluation check (see afm_ray.evaluate.protocol.final_evaluation).
    """

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...

    def resume_checkpoint_dir(self) -> str | None: ...


class LocalReporter:
    """Plain-process reporting: one line per epoch, checkpoints kept under `output_dir` (the newest only,
    or with `keep_all` every epoch's: a teacher keeps them for teacher.select)."""

    def __init__(
        self,
        output_dir: str | Path,
        resume_from: str = "",
        log: Callable[[str], None] = print,
        *,
        keep_all: bool = False,
    ):
        self.output_dir = Path(output_dir)
        self.resume_from = resume_from
        self.log = log
        self.keep_all = keep_all
        self.latest_checkpoint: Path | None = None
        self.checkpoints: dict[int, Path] = {}  # epoch -> its checkpoint folder (all of them with keep_all)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.log(format_metrics(metrics))
        if checkpoint_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        epoch = int(metrics.get("epoch", 0))
        target = self.output_dir / f"checkpoint_epoch{epoch:04d}"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(checkpoint_dir, target)
        # Keep the newest checkpoint only, unless asked for all: each holds the full training state.
        if (
            not self.keep_all
            and self.latest_checkpoint is not None
            and self.latest_checkpoint != target
            and self.latest_checkpoint.exists()
        ):
            shutil.rmtree(self.latest_checkpoint)
            self.checkpoints = {}
        self.latest_checkpoint = target
        self.checkpoints[epoch] = target

    def resume_checkpoint_dir(self) -> str | None:
        return self.resume_from or None


def format_metrics(metrics: Mapping[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}")
    return "  ".join(parts)


def lr_lambda(cfg: ExperimentConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-iteration multiplier: linear warm-up, then cosine, step (x0.1 at 50%/75%) or constant."""
    total = cfg.optim.epochs * steps_per_epoch
    warmup = cfg.optim.warmup_epochs * steps_per_epoch

    def factor(it: int) -> float:
        if it < warmup:
            return (it + 1) / warmup
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = (it - warmup) / max(1, total - warmup)
        if cfg.optim.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 0.01 if progress >= 0.75 else 0.1 if progress >= 0.5 else 1.0

    return factor


@dataclass
class TrainStep:
    """One optimisation step of a distillation method; the training loop and benchmarks/bench.py both
    call it, so the benchmark times exactly what training runs.

    The batch is augmented once and that one view goes to teacher and student alike (consistent
    teaching); the method's attack and loss run under bf16 autocast when `amp_dtype` is set.
    Returns the method's loss parts, detached and still on the device (no host sync).
    """

    method: Any  # a afm_ray.methods method
    model: nn.Module  # the student as trained: maybe DDP-wrapped or compiled
    teacher: nn.Module | None
    augment: BatchAugment
    attack: AttackSpec
    optimizer: torch.optim.Optimizer
    num_classes: int
    scheduler: Any = None  # stepped per iteration when given
    channels_last: bool = False
    amp_dtype: torch.dtype | None = None
    after_step: Callable[[], None] | None = None  # e.g. the EMA update of afm_ray.student_weights

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = F.one_hot(y, self.num_classes).float() if self.method.uses_labels else None
        x_aug, y_aug = self.augment(x, targets)
        autocast = (
            torch.autocast(x.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            parts = self.method(self.model, self.teacher, x_aug, y_aug, self.attack)
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.after_step is not None:
            self.after_step()
        return {key: value.detach() for key, value in parts.items()}


def train_fn_per_worker(config: Mapping[str, Any], reporter: Reporter | None = None) -> dict[str, float]:
    """Train one student with the configured method; returns the final metrics.

    `config` is the flat dotted dict (see afm_ray.config). Per epoch it reports
    `train/<loss part>`, `val/clean_acc`, `val/pgd10_acc` (PGD-10 on a fixed held-out subset)
    and a checkpoint; at the end, `clean_acc`, `pgd20_acc`, `cw_acc`, `aa_acc` on the test
    split (as configured in `eval.*`), the student's parameter count and latency.
    """
    worker_started = time.perf_counter()
    cfg = config if isinstance(config, ExperimentConfig) else from_flat(config)
    ctx = worker_context(cfg.run.device, getattr(reporter, "device", None))
    reporter = reporter or LocalReporter(cfg.run.output_dir, cfg.run.resume_from)
    log = (lambda msg: print(msg, flush=True)) if ctx.rank == 0 else (lambda msg: None)

    torch.manual_seed(cfg.run.seed)  # identical initial student on every rank
    data = load_run_data(cfg)
    x_train, y_train, x_val, y_val = split_validation(data, cfg.eval.val_samples, cfg.data.seed)
    loader = DeviceBatchLoader(
        x_train,
        y_train,
        cfg.optim.batch_size,
        device=ctx.device,
        shuffle=True,
        drop_last=True,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=cfg.run.seed,
    )
    if len(loader) == 0:
        raise ConfigError(
            f"optim.batch_size: {cfg.optim.batch_size} x {ctx.world_size} workers exceeds the "
            f"{len(y_train)} training images; use a smaller batch"
        )

    method = build_method(cfg.method.name, **method_hparams(cfg))
    teacher = None
    if method.needs_teacher:
        if cfg.teacher.trained_here:
            raise ConfigError(
                f"method {cfg.method.name!r} needs a teacher but teacher.checkpoint is {cfg.teacher.checkpoint!r}; "
                "train one with `python -m afm_ray.teacher` or run through afm_ray.train/afm_ray.sweep"
            )
        # One teacher, or an ensemble read at the method's temperature (afm_ray.ensemble).
        teacher = load_teachers(cfg, data, device=ctx.device, tau=getattr(method, "tau", 1.0))
        if cfg.run.channels_last:  # the frozen teacher is most of a step's compute
            teacher = teacher.to(memory_format=torch.channels_last)

    student = build_model(cfg.student.arch, **model_kwargs(cfg.student, data)).to(ctx.device)
    if cfg.run.channels_last:
        student = student.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        student.parameters(),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(loader)))

    weights = StudentWeights(
        student,
        select=cfg.student.select,
        average=cfg.student.average,
        epochs=cfg.optim.epochs,
        ema_decay=cfg.student.ema_decay,
        swa_start=cfg.student.swa_start,
        bn_images=loader.x,  # SWA's batch-norm statistics: the whole training split, the same on every rank
        bn_batch_size=cfg.optim.batch_size,
        channels_last=cfg.run.channels_last,
        world_size=ctx.world_size,
    )
    start_epoch = 0
    resume_dir = reporter.resume_checkpoint_dir()
    if resume_dir:
        start_epoch = checkpoints.load_resume_state(resume_dir, unwrap(student), optimizer, scheduler, weights)
        log(f"resumed from {resume_dir} at epoch {start_epoch}")

    model = student
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
    if cfg.run.compile:
        model = torch.compile(model)

    n_final = min(cfg.eval.samples or len(data.y_test), len(data.y_test))
    eval_batch_size = resolve_eval_batch_size(
        cfg.eval.batch_size,
        student,
        data.image_shape,
        ctx.device,
        channels_last=cfg.run.channels_last,
        n_images=max(len(y_val), math.ceil(n_final / ctx.world_size)),
        log=log,
    )
    step = TrainStep(
        method=method,
        model=model,
        teacher=teacher,
        optimizer=optimizer,
        scheduler=scheduler,
        augment=BatchAugment(cfg.augment.policy, image_shape=data.image_shape, num_classes=data.num_classes),
        attack=AttackSpec(
            eps=cfg.train_eps,
            step_size=cfg.train_step_size,
            steps=cfg.attack.steps,
            norm=cfg.attack.norm,
            random_start=cfg.attack.random_start,
        ),
        num_classes=data.num_classes,
        channels_last=cfg.run.channels_last,
        amp_dtype=amp_dtype_for(cfg.run.amp, ctx.device),
        after_step=weights.after_step,
    )
    x_val_dev, y_val_dev = to_unit(x_val, ctx.device), y_val.to(ctx.device)
    metrics: dict[str, float] = {}

    for epoch in range(start_epoch, cfg.optim.epochs):
        torch.manual_seed(cfg.run.seed * 1000 + epoch * 10 + ctx.rank)  # augmentation/attack noise per rank
        loader.set_epoch(epoch)
        model.train()
        sums: dict[str, torch.Tensor] = {}
        started = time.perf_counter()
        for x, y in loader:
            for key, value in step(x, y).items():  # accumulate on device: no host sync per step
                sums[key] = sums.get(key, 0) + value.float()
        n_batches = len(loader)
        epoch_time = time.perf_counter() - started
        # run/start_epoch > 0 shows a run that resumed from a checkpoint (e.g. after a worker died).
        metrics = {"epoch": epoch + 1, "run/start_epoch": start_epoch, "run/world_size": ctx.world_size}
        for key, value in sums.items():
            metrics[f"train/{key}"] = (
                all_reduce_sum(value.clone(), ctx.world_size) / (n_batches * ctx.world_size)
            ).item()
        metrics["train/images_per_s"] = n_batches * cfg.optim.batch_size * ctx.world_size / epoch_time
        metrics["train/lr"] = scheduler.get_last_lr()[0]
        # Every worker validates the same small subset (cheaper than gathering), scoring the weights
        # that may become the student: averaged if student.average says so (afm_ray.student_weights).
        val_model = weights.end_epoch(epoch + 1)
        for name, key in (("clean", "val/clean_acc"), ("pgd10", "val/pgd10_acc")):
            correct = attacks.robust_predictions(
                val_model,
                x_val_dev,
                y_val_dev,
                attack=name,
                eps=cfg.eval_eps,
                norm=cfg.attack.norm,
                batch_size=eval_batch_size,
            )
            metrics[key] = correct.float().mean().item()
        weights.observe(epoch + 1, metrics["val/pgd10_acc"])
        # Training and validation seconds of this epoch: what a scheduler that stops here spent.
        metrics["time/epoch_s"] = time.perf_counter() - started
        last = epoch + 1 == cfg.optim.epochs
        save = last or (cfg.run.checkpoint_every and (epoch + 1) % cfg.run.checkpoint_every == 0)
        _report_with_checkpoint(reporter, metrics, cfg, weights, optimizer, scheduler, epoch + 1, ctx, save, data)

    eval_started = time.perf_counter()
    final = final_evaluation(
        cfg, weights.student(), data, ctx, log, batch_size=eval_batch_size, aa_gate=getattr(reporter, "aa_gate", None)
    )
    final.update(weights.metrics())
    final["time/eval_s"] = time.perf_counter() - eval_started
    final["time/worker_s"] = time.perf_counter() - worker_started
    # The last epoch's metrics ride along, so a scheduler's metric is present in every result.
    final = {**final, **{k: v for k, v in metrics.items() if k not in final}}
    reporter.report(final, None)
    return final


def method_hparams(cfg: ExperimentConfig) -> dict[str, float]:
    """Only the hyperparameters the user set; the method supplies its own defaults."""
    return {k: getattr(cfg.method, k) for k in HPARAM_NAMES if getattr(cfg.method, k) is not None}


def _report_with_checkpoint(
    reporter: Reporter,
    metrics: dict[str, float],
    cfg: ExperimentConfig,
    weights: StudentWeights,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    ctx: WorkerContext,
    save: bool,
    data: ImageDataset,
) -> None:
    if not save or ctx.rank != 0:  # every rank reports; rank 0 alone writes the checkpoint
        reporter.report(metrics, None)
        return
    # `model` is the student (what is logged and exported); a resumed run also needs the training
    # weights and the average when they differ from it.
    extra: dict[str, Any] = {"student_weights": weights.state_dict()}
    if weights.tracks_selection:
        extra["train_model"] = weights.model.state_dict()
    with tempfile.TemporaryDirectory(prefix="afm_ray_ckpt_") as tmp:
        checkpoints.save_training_state(
            tmp,
            model=weights.student(),
            extra=extra,
            optimizer=optimizer,
            scheduler=scheduler,
            epoch=epoch,
            config=to_flat(cfg),
            metrics=metrics,
            data=data,  # so the student rebuilds from its checkpoint alone (no dataset on the head)
        )
        reporter.report(metrics, tmp)
