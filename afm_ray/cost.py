"""What a trial, a sweep or a teacher costs, estimated before anything runs: FLOPs from operation
counts, seconds from assumed device throughputs (one table of datasets, one of devices). The
accounting is clusters/README.md's ("What a trial costs"):

- forward FLOPs F_S (student) and F_T (teacher) per image are counted exactly, by running each
  architecture once on a meta-device image (no memory, no compute) under FlopCounterMode;
- a backward to the input costs ~1 F, a backward with weight gradients ~2 F, so per training
  image and epoch, with K attack steps:
  teacher in the attack loop (AdvFunMatch, AdaAD): K x 2 (F_T + F_S) + F_T + 3 F_S;
  student-only attack (RSLAD): F_T + K x 2 F_S + 2 x 3 F_S; ARD and AKD train on the
  adversarial view only (at their default weights): F_T + K x 2 F_S + 3 F_S;
  PGD-AT: K x 2 F_S + 3 F_S;  TRADES: K x 2 F_S + F_S + 2 x 3 F_S;  FunMatch (no attack):
  F_T + 3 F_S. tests/test_dry_run.py checks each against FlopCounterMode on a real step;
- the final evaluation per test image: clean 1 F_S; PGD-20 and CW 20 x 2 F_S + 1 F_S each;
  AutoAttack standard: APGD-CE 100 x 2 F_S on the clean-correct images, then APGD-T
  (9 targets x 100 x 2 F_S), FAB-T (9 targets x 100 x 3 F_S) and Square (5000 queries x F_S) on
  the images still robust; 85% clean and 50% robust accuracy assumed (clusters/README.md);
- per-epoch validation: clean + PGD-10 on eval.val_samples images;
- a teacher ensemble of K checkpoints (teacher.checkpoint "a,b,...") counts F_T K times: every
  forward and backward through the teacher runs through each member (members of teacher.arch at
  teacher.width assumed: the dry run reads no checkpoint);
- student.average swa adds one clean forward of the student per training image in each averaged
  epoch (the batch-norm statistics recomputed); ema and best_pgd cost no FLOPs worth counting;
- a teacher (PGD-AT or TRADES, trained by afm_ray.teacher.training) costs its method's training
  FLOPs per image on the images the training loop trains on.

The hours are those counts over an assumed effective throughput: an estimate to within a factor
of about two; measure one epoch and rescale for real numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from afm_ray.config import ExperimentConfig
from afm_ray.display import duration_text, gpu_hours_text
from afm_ray.names import TEACHER_METHODS

# Images per dataset as afm_ray.data loads them: (channels, side, train images, test images,
# classes); None = the split of the whole set by data.test_fraction. Parquet is unknown until read.
DATASET_FACTS: dict[str, tuple[int, int, int, int | None, int]] = {
    "digits": (1, 8, 1797, None, 10),
    "mnist5k": (1, 28, 5000, None, 10),
    "cifar10": (3, 32, 50000, 10000, 10),
    "cifar100": (3, 32, 50000, 10000, 100),
}
ATTACK_THROUGH_TEACHER = ("advfunmatch", "adaad")  # the attack differentiates teacher and student
STUDENT_ONLY_ATTACK = ("rslad", "ard", "akd")  # the teacher sees the clean image once
ADVERSARIAL_VIEW_ONLY = ("ard", "akd")  # the student trains on x' alone
# Assumed accuracies that size AutoAttack's later attacks (clusters/README.md).
ASSUMED_CLEAN, ASSUMED_ROBUST = 0.85, 0.5


@dataclass(frozen=True)
class Device:
    """A GPU of the shipped clusters: its effective training throughput (TFLOP/s, bf16 with the data
    on the GPU: a small fraction of the card's dense peak) and its price per hour on one-GPU
    instances (clusters/README.md: spot, on-demand; spot moves daily on AWS, monthly on GCP)."""

    name: str
    instance: str
    train_tflops: float
    usd_per_hour: tuple[float, float]  # (spot, on-demand)


DEVICES = (
    Device("A10G", "AWS g5.xlarge", 8.0, (0.45, 1.006)),
    Device("L4", "GCP g2-standard-4", 6.0, (0.28, 0.707)),
    Device("A100-40GB", "GCP a2-highgpu-1g", 20.0, (1.25, 3.67)),
)
REFERENCE_GPU = DEVICES[0]  # what a single GPU figure (a teacher's cost) is quoted on
# The fp32 evaluation runs at this fraction of the training throughput.
EVAL_RATE_FRACTION = 0.6
# The 2-core CPU machine of the search benchmark (benchmarks/data/search_table_mnist5k.parquet):
# FLOPs above over the recorded seconds, median over trials, one core per trial; and the
# median per-trial start-up (Ray's worker start and tear-down plus data and model set-up).
CPU_GFLOPS_TRAIN = 70.0
CPU_GFLOPS_EVAL = 37.0
CPU_TRIAL_OVERHEAD_S = 22.0


@dataclass(frozen=True)
class Shapes:
    channels: int
    side: int
    train_images: int
    test_images: int
    classes: int


def dataset_shapes(cfg: ExperimentConfig) -> Shapes | None:
    """The shapes a run's data has, from what the dataset is (no file is read); None for parquet."""
    facts = DATASET_FACTS.get(cfg.data.name)
    if facts is None:
        return None
    channels, side, train, test, classes = facts
    if test is None:
        test = int(round(train * cfg.data.test_fraction))
        train -= test
    val = min(cfg.eval.val_samples, train // 5)
    return Shapes(channels, cfg.data.image_size or side, train - val, test, classes)


def forward_flops(arch: str, width: int, depth: int, shapes: Shapes) -> float:
    """FLOPs of one forward pass of one image, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from afm_ray.models import build_model

    kwargs: dict[str, Any] = dict(
        num_classes=shapes.classes,
        in_channels=shapes.channels,
        mean=(0.5,) * shapes.channels,
        std=(0.5,) * shapes.channels,
    )
    if width:
        kwargs["width"] = width
    if depth:
        kwargs["depth"] = depth
    with torch.device("meta"):
        model = build_model(arch, **kwargs).eval()
        x = torch.empty(1, shapes.channels, shapes.side, shapes.side)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def train_flops_per_image(method: str, steps: float, f_student: float, f_teacher: float) -> float:
    """One training image, one epoch (the module docstring's accounting)."""
    if method in ATTACK_THROUGH_TEACHER:
        return steps * 2 * (f_teacher + f_student) + f_teacher + 3 * f_student
    if method in STUDENT_ONLY_ATTACK:
        views = 1 if method in ADVERSARIAL_VIEW_ONLY else 2
        return f_teacher + steps * 2 * f_student + views * 3 * f_student
    if method == "pgd_at":  # the attack, then one training forward and backward on x'
        return steps * 2 * f_student + 3 * f_student
    if method == "trades":  # the attack's KL target is one more clean forward
        return steps * 2 * f_student + f_student + 2 * 3 * f_student
    return f_teacher + 3 * f_student  # funmatch


def eval_flops_per_image(attacks: Iterable[str], f_student: float) -> float:
    """One test image of the final evaluation (the module docstring's accounting)."""
    per = {
        "clean": 1.0,
        "pgd20": 20 * 2 + 1.0,
        "pgd10": 10 * 2 + 1.0,
        "cw": 20 * 2 + 1.0,
        "aa": ASSUMED_CLEAN * 100 * 2 + ASSUMED_ROBUST * (9 * 100 * 2 + 9 * 100 * 3 + 5000),
    }
    return sum(per[a] for a in attacks) * f_student


def val_flops_per_epoch(cfg: ExperimentConfig, shapes: Shapes, f_student: float) -> float:
    return min(cfg.eval.val_samples, shapes.train_images) * (1 + 10 * 2 + 1) * f_student


def trial_flops(
    cfg: ExperimentConfig, methods: Mapping[str, float], steps: float, epochs: float | None = None
) -> dict[str, float] | None:
    """Training, validation and final-evaluation FLOPs of one trial of ``cfg``, averaged over
    ``methods`` (name -> probability) at ``steps`` attack steps; None if the data's shapes are
    unknown before reading it (parquet)."""
    shapes = dataset_shapes(cfg)
    if shapes is None:
        return None
    f_s = forward_flops(cfg.student.arch, cfg.student.width, cfg.student.depth, shapes)
    needs_teacher = any(m not in TEACHER_METHODS for m in methods)
    teachers = teacher_count(cfg) if needs_teacher else 0
    f_t = teachers * forward_flops(cfg.teacher.arch, cfg.teacher.width, cfg.teacher.depth, shapes) if teachers else 0.0
    epochs = cfg.optim.epochs if epochs is None else epochs
    per_image = sum(p * train_flops_per_image(m, steps, f_s, f_t) for m, p in methods.items())
    if cfg.student.average == "swa":  # the batch-norm pass of each averaged epoch, spread over all epochs
        per_image += f_s * (epochs - math.floor(cfg.student.swa_start * epochs)) / max(epochs, 1)
    n_eval = min(cfg.eval.samples or shapes.test_images, shapes.test_images)
    return {
        "student_forward_flops": f_s,
        "teacher_forward_flops": f_t,  # the whole ensemble's: teachers x one member's
        "teachers": float(teachers),
        "train_flops_per_epoch": per_image * shapes.train_images,
        "val_flops_per_epoch": val_flops_per_epoch(cfg, shapes, f_s),
        "eval_flops": n_eval * eval_flops_per_image(cfg.eval_attacks, f_s),
        "eval_flops_without_aa": n_eval * eval_flops_per_image([a for a in cfg.eval_attacks if a != "aa"], f_s),
        "epochs": float(epochs),
        "train_images": float(shapes.train_images),
        "eval_images": float(n_eval),
    }


def teacher_count(cfg: ExperimentConfig) -> int:
    """How many teachers each step runs: the members of teacher.checkpoint (one when trained here)."""
    return 1 if cfg.teacher.trained_here else len(cfg.teacher.members)


@dataclass(frozen=True)
class TeacherCost:
    """What training a config's teacher costs: total FLOPs, and what they take where trials run."""

    arch: str
    method: str
    epochs: int
    images: int
    forward_flops: float  # one image, one forward pass
    total_flops: float
    on_gpu: bool
    assumed_images: bool  # True when the image count or shape is a guess (Parquet)

    @property
    def hours(self) -> float:
        rate = REFERENCE_GPU.train_tflops * 1e12 if self.on_gpu else CPU_GFLOPS_TRAIN * 1e9
        return self.total_flops / rate / 3600

    def __str__(self) -> str:
        spot, on_demand = REFERENCE_GPU.usd_per_hour
        where = (
            f"~{gpu_hours_text(self.hours)} on one {REFERENCE_GPU.name} ({REFERENCE_GPU.instance}) at "
            f"{REFERENCE_GPU.train_tflops:g} TFLOP/s effective, ~${self.hours * spot:.2f} spot / "
            f"${self.hours * on_demand:.2f} on-demand"
            if self.on_gpu
            else f"~{duration_text(self.hours * 3600)} on a CPU core at {CPU_GFLOPS_TRAIN:g} GFLOP/s"
        )
        guess = " (image count and shape assumed)" if self.assumed_images else ""
        return (
            f"{self.arch} by {self.method}, {self.epochs} epochs on {self.images} images{guess}: "
            f"{_flops(self.total_flops)} ({where})"
        )


# Assumed for a dataset whose shapes are known only once read (Parquet): a CIFAR-sized set.
_ASSUMED_SHAPES = Shapes(channels=3, side=32, train_images=50000, test_images=10000, classes=10)


def teacher_cost(cfg: ExperimentConfig, teacher_cfg: ExperimentConfig, *, on_gpu: bool) -> TeacherCost:
    """Estimate of training ``cfg``'s teacher, whose training run is ``teacher_cfg``
    (afm_ray.teacher.training.teacher_training_config): its student is the teacher."""
    shapes = dataset_shapes(teacher_cfg) or _ASSUMED_SHAPES
    model = teacher_cfg.student
    per_forward = forward_flops(model.arch, model.width, model.depth, shapes)
    per_image = train_flops_per_image(teacher_cfg.method.name, teacher_cfg.attack.steps, per_forward, 0.0)
    return TeacherCost(
        arch=model.arch,
        method=teacher_cfg.method.name,
        epochs=teacher_cfg.optim.epochs,
        images=shapes.train_images,
        forward_flops=per_forward,
        total_flops=per_image * shapes.train_images * teacher_cfg.optim.epochs,
        on_gpu=on_gpu,
        assumed_images=dataset_shapes(teacher_cfg) is None,
    )


def _flops(value: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"
