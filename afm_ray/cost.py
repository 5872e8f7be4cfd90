"""What a trial costs, estimated before anything runs: FLOPs from operation counts, seconds from
assumed device throughputs. The accounting is clusters/README.md's ("What a trial costs"):

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
- per-epoch validation: clean + PGD-10 on eval.val_samples images.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from afm_ray.config import ExperimentConfig

# Images per dataset as afm_ray.data loads them: (channels, side, train images, test images,
# classes); None = the split of the whole set by data.test_fraction.
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
# Effective training throughput, TFLOP/s, bf16 with the data on the GPU (clusters/README.md);
# the fp32 evaluation runs at EVAL_RATE_FRACTION of it.
DEVICE_TFLOPS = {"A10G": 8.0, "L4": 6.0, "A100-40GB": 20.0}
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
    if method == "pgd_at":
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
    needs_teacher = any(m not in ("pgd_at", "trades") for m in methods)
    f_t = forward_flops(cfg.teacher.arch, cfg.teacher.width, cfg.teacher.depth, shapes) if needs_teacher else 0.0
    epochs = cfg.optim.epochs if epochs is None else epochs
    per_image = sum(p * train_flops_per_image(m, steps, f_s, f_t) for m, p in methods.items())
    n_eval = min(cfg.eval.samples or shapes.test_images, shapes.test_images)
    return {
        "student_forward_flops": f_s,
        "teacher_forward_flops": f_t,
        "train_flops_per_epoch": per_image * shapes.train_images,
        "val_flops_per_epoch": val_flops_per_epoch(cfg, shapes, f_s),
        "eval_flops": n_eval * eval_flops_per_image(cfg.eval_attacks, f_s),
        "eval_flops_without_aa": n_eval * eval_flops_per_image([a for a in cfg.eval_attacks if a != "aa"], f_s),
        "epochs": float(epochs),
        "train_images": float(shapes.train_images),
        "eval_images": float(n_eval),
    }
