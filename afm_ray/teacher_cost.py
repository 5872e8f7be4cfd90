"""What training a teacher will cost, estimated before any node is requested: operation counts, not timings.

A model's forward pass is counted once on the meta device (torch.utils.flop_counter: no memory,
no compute), then multiplied out the way clusters/README.md does it: per image, K attack steps of
a forward and a backward to the input (~2 forwards each) plus a training forward and backward with
weight gradients (~3 forwards); TRADES adds the clean forward and a second loss term. The hours
are that count over an assumed effective throughput, so they are an estimate to within a factor
of about two: measure one epoch and rescale for real numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from afm_ray import cost
from afm_ray.config import ExperimentConfig
from afm_ray.cost import Shapes

# Training images and (C, H, W) of the datasets whose size is known without reading them.
KNOWN_SIZES = {
    "digits": (1437, (1, 8, 8), 10),  # 1797 images, 20% held out as test
    "mnist5k": (4000, (1, 28, 28), 10),
    "cifar10": (50000, (3, 32, 32), 10),
    "cifar100": (50000, (3, 32, 32), 100),
}
# Effective throughputs of clusters/README.md's cost table (A10G in bf16 on small-image ResNets)
# and of this project's own 2-core CPU record (docs/bench_cpu.md: 0.1-0.46 TFLOP/s achieved).
GPU_FLOPS, GPU_NAME, GPU_USD_PER_H = 8e12, "A10G (g5.xlarge)", (0.45, 1.006)  # spot, on-demand
CPU_FLOPS = 0.1e12


@dataclass(frozen=True)
class TeacherCost:
    """The estimate: total FLOPs, and what they take on the resources a trial gets."""

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
        return self.total_flops / (GPU_FLOPS if self.on_gpu else CPU_FLOPS) / 3600

    def __str__(self) -> str:
        where = (
            f"~{_hours(self.hours)} on one {GPU_NAME} at {GPU_FLOPS / 1e12:g} TFLOP/s effective, "
            f"~${self.hours * GPU_USD_PER_H[0]:.2f} spot / ${self.hours * GPU_USD_PER_H[1]:.2f} on-demand"
            if self.on_gpu
            else f"~{_hours(self.hours)} on a CPU at {CPU_FLOPS / 1e12:g} TFLOP/s"
        )
        guess = " (image count and shape assumed)" if self.assumed_images else ""
        return (
            f"{self.arch} by {self.method}, {self.epochs} epochs on {self.images} images{guess}: "
            f"{_flops(self.total_flops)} ({where})"
        )


def forward_flops(section: object, image_shape: tuple[int, int, int], num_classes: int) -> float:
    """FLOPs of one forward pass of one image through `section`'s model (arch/width/depth),
    counted by afm_ray.cost on the meta device."""
    channels, side = image_shape[0], image_shape[1]
    shapes = Shapes(channels=channels, side=side, train_images=0, test_images=0, classes=num_classes)
    return cost.forward_flops(section.arch, section.width, getattr(section, "depth", 0), shapes)


def adversarial_training_forwards(method: str, steps: int) -> float:
    """Forward-pass equivalents per training image of adversarial training with `steps` PGD steps."""
    attack = 2 * steps  # forward + backward to the input, per step
    if method == "trades":
        return attack + 1 + 2 * 3  # the clean forward the KL attack targets; clean and adversarial losses
    return attack + 3  # PGD-AT: one training forward and backward on the adversarial batch


def teacher_cost(cfg: ExperimentConfig, teacher_cfg: ExperimentConfig, *, on_gpu: bool) -> TeacherCost:
    """Estimate of training `cfg`'s teacher, whose training run is `teacher_cfg` (teacher.teacher_training_config)."""
    images, shape, classes = KNOWN_SIZES.get(cfg.data.name, (50000, (3, 32, 32), 10))
    if cfg.data.image_size:
        shape = (shape[0], cfg.data.image_size, cfg.data.image_size)
    per_forward = forward_flops(teacher_cfg.student, shape, classes)
    per_image = per_forward * adversarial_training_forwards(teacher_cfg.method.name, teacher_cfg.attack.steps)
    return TeacherCost(
        arch=teacher_cfg.student.arch,
        method=teacher_cfg.method.name,
        epochs=teacher_cfg.optim.epochs,
        images=images,
        forward_flops=per_forward,
        total_flops=per_image * images * teacher_cfg.optim.epochs,
        on_gpu=on_gpu,
        assumed_images=cfg.data.name not in KNOWN_SIZES,
    )


def _flops(value: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def _hours(hours: float) -> str:
    if hours >= 1:
        return f"{hours:.3g} h"
    if hours * 60 >= 1:
        return f"{hours * 60:.3g} min"
    return f"{hours * 3600:.2g} s"
