"""The two training steps benchmarks/bench.py compares, on one set-up: data, models, optimizer.

`make_our_step` is one iteration of training's inner loop (afm_ray.train.loop.TrainStep fed by
afm_ray.data.DeviceBatchLoader). `make_reference_step` is the plain research-code step it is
measured against; bench.py's module docstring lists which parts of it are deliberately
independent of afm_ray and which are shared, and why.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from afm_ray.augment import BatchAugment
from afm_ray.data import DeviceBatchLoader
from afm_ray.losses import (
    adaad_loss,
    advfunmatch_loss,
    akd_loss,
    ard_loss,
    funmatch_loss,
    kl_div,
    pgd_at_loss,
    rslad_loss,
    soft_cross_entropy,
)
from afm_ray.methods import METHODS, AttackSpec, build_method
from afm_ray.models import build_model
from afm_ray.train.loop import TrainStep

__all__ = [
    "REFERENCE_NOTES",
    "BenchConfig",
    "CropFlipDataset",
    "build_models",
    "cpu_defaults",
    "cuda_defaults",
    "cycle",
    "make_our_step",
    "make_reference_step",
    "OFFICIAL_OUTER",
    "n_images",
    "reference_attack_objective",
    "reference_loss",
    "reference_outer_loss",
    "synthetic_images",
]

# What each reference step runs beyond our step, from the official code (each method's class in
# afm_ray.methods names its paper and what its official code does).
REFERENCE_NOTES: dict[str, str] = {
    "advfunmatch": "no official code reachable: written like AdaAD (T at x' in every attack step, "
    "T(x') once more after)",
    "rslad": "official: T(x) once per batch before the attack; S(x') and S(x) after",
    "adaad": "official: S(x), S(x'), T(x), T(x') after the attack even at alpha = 1 (ours skips S(x), T(x))",
    "akd": "no official code: T(x) once, attack and loss on CE(S(x'), y~)",
    "ard": "official: S(x') (AttackPGD's return), T(x), S(x) even at alpha = 1 (ours skips S(x))",
    "funmatch": "no attack: S(x), T(x) under no_grad",
    "pgd_at": "Madry et al.: attack, then S(x')",
    "trades": "official: S(x) recomputed in every attack step and twice in the loss (ours: once in the "
    "attack, once in the loss)",
}


# --------------------------------------------------------------------------------------------
# The set-up both steps share.


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark shape and how to run it (`cpu_defaults` / `cuda_defaults` fill it in)."""

    student: str = "small_cnn"  # student architecture, a name in afm_ray.models.MODELS
    student_width: int | None = 16  # None = the architecture's default width
    teacher: str = "small_cnn"  # teacher architecture (frozen, eval mode)
    teacher_width: int | None = 64
    batch_size: int = 128  # images per training step
    steps: int = 3  # PGD steps of the training attack
    image_size: int = 28  # square images of this side
    channels: int = 1  # 1 (grey) or 3 (RGB)
    num_classes: int = 10
    eps: float = 0.3  # linf budget in [0,1] pixel units; the step is eps / 4, as attack.step_size: null
    policy: str = "crop_flip"  # our step's BatchAugment policy; crop_flip is what the reference does
    device: str = "cpu"
    amp: str = "off"  # off | bf16 autocast around our method call (the reference is always fp32)
    channels_last: bool = False  # our student, teacher and batches in channels_last (as afm_ray/train/loop.py)
    compile: bool = False  # torch.compile our student (as afm_ray/train/loop.py)
    iters: int = 12  # timed iterations; the median is reported
    warmup: int = 1  # untimed iterations first (with --compile at least 3: compilation)
    ref_workers: int = 0  # DataLoader workers of the reference step
    ref_attack_grad: str = "backward"  # backward: loss.backward() per attack step | input: autograd.grad
    seed: int = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def step_size(self) -> float:
        return self.eps / 4


def cpu_defaults() -> dict[str, object]:
    """Shapes that finish in a few minutes on 2 CPU cores: the embedded default (28x28 grey digits,
    small_cnn width-16 student, width-64 teacher), PGD-3, batch 128."""
    return dict(
        student="small_cnn",
        student_width=16,
        teacher="small_cnn",
        teacher_width=64,
        batch_size=128,
        steps=3,
        image_size=28,
        channels=1,
        eps=0.3,
        iters=12,
        warmup=1,
        ref_workers=0,
    )


def cuda_defaults() -> dict[str, object]:
    """The realistic CIFAR shapes: ResNet-18 student, WRN-34-10 teacher, batch 256, PGD-10 at 8/255.
    Research code typically loads with 4 DataLoader workers."""
    return dict(
        student="resnet18",
        student_width=None,
        teacher="wrn34_10",
        teacher_width=None,
        batch_size=256,
        steps=10,
        image_size=32,
        channels=3,
        eps=8 / 255,
        iters=20,
        warmup=5,
        ref_workers=4,
    )


def synthetic_images(n: int, cfg: BenchConfig, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n random uint8 images of cfg's shape and int64 labels, on the CPU (content does not
    change the cost of any op here)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *cfg.image_shape), generator=g, dtype=torch.uint8)
    return x, torch.randint(0, cfg.num_classes, (n,), generator=g)


def build_models(cfg: BenchConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """A student (train mode) and a frozen eval-mode teacher of cfg's architectures."""
    common = dict(
        num_classes=cfg.num_classes, in_channels=cfg.channels, mean=(0.5,) * cfg.channels, std=(0.25,) * cfg.channels
    )
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, width=cfg.student_width, **common).to(device)
    teacher = build_model(cfg.teacher, width=cfg.teacher_width, **common).to(device)
    return student.train(), teacher.eval().requires_grad_(False)


def cycle(loader: object) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches forever, re-iterating (a new epoch) when the loader runs out."""
    while True:
        yield from loader  # type: ignore[misc]


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    # optim.* defaults of afm_ray.config
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def n_images(cfg: BenchConfig) -> int:
    """Images each step's loader holds: enough batches that the timed iterations rarely cross an
    epoch boundary."""
    return cfg.batch_size * (cfg.warmup + cfg.iters + 4)


def make_our_step(
    name: str, cfg: BenchConfig, student: nn.Module, teacher: nn.Module, device: torch.device
) -> Callable[[], None]:
    """One iteration of train_fn_per_worker's inner loop for method `name`: the same TrainStep
    object training calls, fed by the same loader (the per-epoch bookkeeping is left out)."""
    method = build_method(name)
    x_all, y_all = synthetic_images(n_images(cfg), cfg, cfg.seed)
    batches = cycle(
        DeviceBatchLoader(x_all, y_all, cfg.batch_size, device=device, shuffle=True, drop_last=True, seed=cfg.seed)
    )
    if cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
        # A copy: the teacher is shared with the reference step, which stays contiguous (NCHW).
        teacher = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    model = torch.compile(student) if cfg.compile else student
    model.train()
    train_step = TrainStep(
        method=method,
        model=model,
        teacher=teacher if method.needs_teacher else None,
        augment=BatchAugment(cfg.policy, image_shape=cfg.image_shape, num_classes=cfg.num_classes),
        attack=AttackSpec(eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps),
        optimizer=_sgd(student),
        num_classes=cfg.num_classes,
        channels_last=cfg.channels_last,
        amp_dtype=torch.bfloat16 if cfg.amp == "bf16" else None,
    )
    sums: dict[str, Tensor] = {}

    def step() -> None:
        for key, value in train_step(*next(batches)).items():  # as the training loop accumulates
            sums[key] = sums.get(key, 0) + value.float()

    return step


# --------------------------------------------------------------------------------------------
# The research-code reference step.


class CropFlipDataset(TensorDataset):
    """The research-code input pipeline: ToTensor, RandomCrop(padding), RandomHorizontalFlip,
    per sample in __getitem__, in plain torch (the same ops as BatchAugment's crop_flip)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__(x, y)
        c, h, _ = x.shape[1:]
        # afm_ray.augment._crop_flip: grey digits 2 px at 28x28 and no flip; RGB 4 px at 32x32 + flip
        self.pad = max(1, round(2 * h / 28)) if c == 1 else max(1, round(4 * h / 32))
        self.flip = c == 3

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img, label = self.tensors[0][i], self.tensors[1][i]
        img = img.float().div(255.0)
        h, w = img.shape[1:]
        img = F.pad(img, (self.pad,) * 4)
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        img = img[:, top : top + h, left : left + w]
        if self.flip and torch.rand(1).item() < 0.5:
            img = img.flip(-1)
        return img, label


def make_reference_step(
    name: str, cfg: BenchConfig, student: nn.Module, teacher: nn.Module, device: torch.device
) -> Callable[[], None]:
    """The plain research-code step for method `name`: a host DataLoader, then `reference_loss`,
    then `backward` and SGD with a `.item()` of the loss, as research training loops log it."""
    hp = build_method(name)  # the same hyperparameters and random start as our step
    x_all, y_all = synthetic_images(n_images(cfg), cfg, cfg.seed)
    loader = DataLoader(
        CropFlipDataset(x_all, y_all),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.ref_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.ref_workers > 0,
    )
    batches = cycle(loader)
    optimizer = _sgd(student)
    student.train()
    running = {"loss": 0.0, "attack_loss": 0.0}

    def step() -> None:
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = reference_loss(name, hp, student, teacher, inputs, targets, cfg, running)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running["loss"] += loss.item()

    return step


def reference_loss(
    name: str,
    hp: Any,
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: BenchConfig,
    running: dict[str, float],
) -> Tensor:
    """Research-style attack + outer loss of `name`: the PGD loop inline, one `.item()` per step.

    hp: the method from `build_method(name)`, for its hyperparameters and random-start kind.
    """
    eps, step_size = cfg.eps, cfg.step_size
    teacher_logits = None
    if name in ("rslad", "akd"):  # official RSLAD (AKD written like it): T(x) once, before the attack
        with torch.no_grad():
            teacher_logits = teacher(x)

    x_adv = x
    if hp.uses_attack:
        attack_loss = reference_attack_objective(name, hp, student, teacher, x, y, teacher_logits)
        student.eval()
        if hp.default_random_start == "normal":
            x_adv = x.detach() + 0.001 * torch.randn(x.shape, device=x.device)
        else:
            x_adv = x.detach() + torch.zeros_like(x).uniform_(-eps, eps)
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
        for _ in range(cfg.steps):
            x_adv.requires_grad_()
            loss = attack_loss(x_adv)
            if cfg.ref_attack_grad == "backward":
                loss.backward()
                grad = x_adv.grad
            else:
                grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
            running["attack_loss"] += loss.item()
        student.train()
    return reference_outer_loss(name, hp, student, teacher, x, x_adv, y, teacher_logits)["loss"]


def reference_attack_objective(
    name: str, hp: Any, student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, teacher_logits: Tensor | None
) -> Callable[[Tensor], Tensor]:
    """The attack's objective of x' as the official codes write it: summed over the batch
    (`size_average=False`), with the forwards they spend in every attack step (T(x') for
    AdvFunMatch and AdaAD, S(x) for TRADES). teacher_logits: T(x), for RSLAD and AKD."""
    tau = getattr(hp, "tau", 1.0)
    kl = nn.KLDivLoss(reduction="sum")
    if name in ("pgd_at", "ard"):
        return lambda x_adv: F.cross_entropy(student(x_adv), y, reduction="sum")
    if name == "akd":
        p_teacher = F.softmax(teacher_logits / tau, dim=1)
        soft_y = hp.lam * F.one_hot(y, p_teacher.shape[1]).float() + (1 - hp.lam) * p_teacher
        return lambda x_adv: -(soft_y * F.log_softmax(student(x_adv), dim=1)).sum()
    if name == "rslad":
        return lambda x_adv: kl(F.log_softmax(student(x_adv) / tau, dim=1), F.softmax(teacher_logits / tau, dim=1))
    if name in ("adaad", "advfunmatch"):
        return lambda x_adv: kl(F.log_softmax(student(x_adv) / tau, dim=1), F.softmax(teacher(x_adv) / tau, dim=1))
    if name == "trades":
        return lambda x_adv: kl(F.log_softmax(student(x_adv), dim=1), F.softmax(student(x), dim=1))
    raise ValueError(f"no reference attack for method {name!r}")


# The outer losses: each official code's forwards after the attack, in its order and including
# those our methods skip, handed to afm_ray.methods' pure loss of those logits. Signature:
# (hp, student, teacher, x, x_adv, y, teacher_logits from before the attack or None).
OuterLoss = Callable[[Any, nn.Module, nn.Module, Tensor, Tensor, Tensor, Tensor | None], dict[str, Tensor]]


def _advfunmatch(
    hp: Any, student: nn.Module, teacher: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, teacher_logits: Tensor | None
) -> dict[str, Tensor]:
    outputs = student(x_adv)
    with torch.no_grad():
        teacher_outputs = teacher(x_adv)
    return advfunmatch_loss(outputs, teacher_outputs, hp.tau)


def _rslad(
    hp: Any, student: nn.Module, teacher: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, teacher_logits: Tensor | None
) -> dict[str, Tensor]:
    adv_logits, nat_logits = student(x_adv), student(x)
    return rslad_loss(adv_logits, nat_logits, teacher_logits, hp.tau, hp.alpha)


def _adaad(
    hp: Any, student: nn.Module, teacher: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, teacher_logits: Tensor | None
) -> dict[str, Tensor]:
    ori_outputs, adv_outputs = student(x), student(x_adv)  # even at alpha = 1, as the official code
    with torch.no_grad():
        t_ori_outputs, t_adv_outputs = teacher(x), teacher(x_adv)
    return adaad_loss(adv_outputs, t_adv_outputs, ori_outputs, t_ori_outputs, hp.tau, hp.alpha)


def _akd(
    hp: Any, student: nn.Module, teacher: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, teacher_logits: Tensor | None
) -> dict[str, Tensor]:
    return akd_loss(student(x_adv), teacher_logits, y, hp.tau, hp.lam)


def _ard(
    hp: Any, student: nn.Module, teacher: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, teacher_logits: Tensor | None
) -> dict[str, Tensor]:
    outputs = student(x_adv)
    teacher_outputs = teacher(x)
    basic_outputs = student(x)  # even at alpha = 1, as the official code
    return ard_loss(outputs, basic_outputs, teacher_outputs, y, hp.tau, hp.alpha)


def _funmatch(
    hp: Any, student: nn.Module, teacher: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, teacher_logits: Tensor | None
) -> dict[str, Tensor]:
    outputs = student(x)
    with torch.no_grad():
        teacher_outputs = teacher(x)
    return funmatch_loss(outputs, teacher_outputs, hp.tau)


def _pgd_at(
    hp: Any, student: nn.Module, teacher: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, teacher_logits: Tensor | None
) -> dict[str, Tensor]:
    return pgd_at_loss(student(x_adv), y)


def _trades(
    hp: Any, student: nn.Module, teacher: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, teacher_logits: Tensor | None
) -> dict[str, Tensor]:
    logits = student(x)
    adv_logits, nat_logits = student(x_adv), student(x)  # the official KL term runs S(x) a second time
    # trades_loss takes one clean forward for both terms; the official code runs one per term, so its
    # two terms are added here from the same shared soft_cross_entropy and kl_div.
    ce_clean, kl_adv = soft_cross_entropy(logits, y), kl_div(nat_logits, adv_logits)
    return {"loss": ce_clean + hp.beta * kl_adv, "ce_clean": ce_clean.detach(), "kl_adv": kl_adv.detach()}


OFFICIAL_OUTER: dict[str, OuterLoss] = {
    "advfunmatch": _advfunmatch,
    "rslad": _rslad,
    "adaad": _adaad,
    "akd": _akd,
    "ard": _ard,
    "funmatch": _funmatch,
    "pgd_at": _pgd_at,
    "trades": _trades,
}


def reference_outer_loss(
    name: str,
    hp: Any,
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    teacher_logits: Tensor | None,
) -> dict[str, Tensor]:
    """The loss the reference step minimises after its attack: {"loss", <named parts>}, the same
    math as the method's `outer_loss`, from the official code's forwards."""
    if name not in OFFICIAL_OUTER:
        raise ValueError(f"no reference step for method {name!r}; known: {', '.join(METHODS)}")
    return OFFICIAL_OUTER[name](hp, student, teacher, x, x_adv, y, teacher_logits)
