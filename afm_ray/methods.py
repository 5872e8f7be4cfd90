"""Distillation and adversarial-training methods: one small unit per row of DESIGN.md's table.

Each method is a dataclass of its hyperparameters (defaults from the official code; a guess
says so) whose `__call__(student, teacher, x, y, attack)` runs the inner maximisation through
the one shared `afm_ray.attacks.pgd` and returns {"loss": scalar with grad, <named parts>:
detached}. The outer losses are pure functions of logits (`advfunmatch_loss`, `rslad_loss`,
...), pinned by tests/test_methods.py against stored values.

Notation (DESIGN.md): S student, T teacher (frozen, eval mode), x the augmented clean batch in
[0,1], x' the PGD point in B(x, eps) ∩ [0,1], p(.) = softmax(logits / tau), and
KL(P || Q) = F.kl_div(log Q, log P, reduction="batchmean", log_target=True) with P the target.
Inner objectives are summed over the batch (the official codes' `size_average=False`; a sign
step does not care, and a sum keeps per-sample gradients from shrinking with the batch size).

Efficiency: per batch, the teacher's clean logits are computed at most once, under no_grad;
no forward is spent on a loss term whose weight is 0 (AdaAD/ARD at their default alpha = 1);
nothing here calls `.item()` or branches on tensor values, so a step never syncs with the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from afm_ray.attacks import pgd

__all__ = [
    "AKD",
    "ARD",
    "METHODS",
    "PGDAT",
    "RANDOM_STARTS",
    "RSLAD",
    "TRADES",
    "AdaAD",
    "AdvFunMatch",
    "AttackSpec",
    "FunMatch",
    "Method",
    "adaad_loss",
    "advfunmatch_loss",
    "akd_loss",
    "akd_target",
    "ard_loss",
    "build_method",
    "funmatch_loss",
    "kl_div",
    "pgd_at_loss",
    "rslad_loss",
    "soft_cross_entropy",
    "trades_loss",
]

NORMS = ("linf", "l2")
# "default" = the method's own start (its `default_random_start`, from its official code).
RANDOM_STARTS = ("default", "uniform", "normal", "none")
# Hyperparameter names shared by the config (`method.tau`, ...); None for any of them means
# "the method's own default" (config.MethodConfig), so build_method drops those.
HPARAM_NAMES = ("tau", "alpha", "beta", "lam")


@dataclass
class AttackSpec:
    """The training-time inner maximisation: PGD budget, step, norm and start.

    random_start: "default" uses the method's own start (e.g. RSLAD/AdaAD/TRADES x + 0.001 N(0,1),
    PGD-AT/ARD uniform); "uniform", "normal" or "none" override it.
    """

    eps: float  # radius of the l_p ball, in [0,1] pixel units
    step_size: float  # PGD step (linf: per-pixel sign step; l2: length of the normalised step)
    steps: int  # PGD iterations; 0 = no attack (x' is the clamped start point)
    norm: str = "linf"  # linf | l2
    random_start: str = "default"  # default | uniform | normal | none

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"attack eps={self.eps!r} is invalid; expected a finite number >= 0")
        if not (isinstance(self.step_size, (int, float)) and math.isfinite(self.step_size)
                and self.step_size >= 0):
            raise ValueError(f"attack step_size={self.step_size!r} is invalid; expected a finite number >= 0")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"attack steps={self.steps!r} is invalid; expected an integer >= 0")
        if self.norm not in NORMS:
            raise ValueError(f"attack norm={self.norm!r} is unknown; use one of {NORMS}")
        if self.random_start not in RANDOM_STARTS:
            raise ValueError(f"attack random_start={self.random_start!r} is unknown; use one of {RANDOM_STARTS}")


class Method(Protocol):
    name: str
    needs_teacher: bool
    uses_labels: bool

    def __call__(self, student: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor | None,
                 attack: AttackSpec) -> dict[str, Tensor]: ...


# --------------------------------------------------------------------------------------------
# Pure functions of logits.

def kl_div(target_logits: Tensor, input_logits: Tensor, tau: float = 1.0, *,
           reduction: str = "batchmean") -> Tensor:
    """KL(p_target || p_input) with p = softmax(logits / tau); batchmean unless told otherwise."""
    # float32 log-softmax: under bf16 autocast the logits arrive in bf16.
    log_p = F.log_softmax(target_logits.float() / tau, dim=1)
    log_q = F.log_softmax(input_logits.float() / tau, dim=1)
    return F.kl_div(log_q, log_p, reduction=reduction, log_target=True)


def soft_cross_entropy(logits: Tensor, y: Tensor, *, reduction: str = "mean") -> Tensor:
    """-sum_c y_c log softmax(logits)_c, averaged (or summed) over the batch.

    y: soft labels (B, C) (one-hot or mixup/cutmix-mixed); int64 class indices (B,) are taken
    as one-hot.
    """
    y = _as_soft_labels(y, logits)
    per_sample = -(y * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"reduction={reduction!r} is unknown; use 'mean' or 'sum'")


def advfunmatch_loss(student_adv_logits: Tensor, teacher_adv_logits: Tensor, tau: float) -> dict[str, Tensor]:
    """AdvFunMatch outer loss tau^2 KL(p_T(x') || p_S(x')) (Wu et al. 2023)."""
    kl = kl_div(teacher_adv_logits, student_adv_logits, tau)
    return {"loss": tau**2 * kl, "kl_adv": kl.detach()}


def funmatch_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> dict[str, Tensor]:
    """FunMatch loss tau^2 KL(p_T(x) || p_S(x)) (Beyer et al. 2022, function matching)."""
    kl = kl_div(teacher_logits, student_logits, tau)
    return {"loss": tau**2 * kl, "kl_clean": kl.detach()}


def rslad_loss(student_adv_logits: Tensor, student_clean_logits: Tensor, teacher_clean_logits: Tensor,
               tau: float, alpha: float) -> dict[str, Tensor]:
    """RSLAD: alpha KL(p_T(x) || p_S(x')) + (1 - alpha) KL(p_T(x) || p_S(x)) (Zi et al. 2021)."""
    kl_adv = kl_div(teacher_clean_logits, student_adv_logits, tau)
    kl_clean = kl_div(teacher_clean_logits, student_clean_logits, tau)
    loss = alpha * kl_adv + (1.0 - alpha) * kl_clean
    return {"loss": loss, "kl_adv": kl_adv.detach(), "kl_clean": kl_clean.detach()}


def adaad_loss(student_adv_logits: Tensor, teacher_adv_logits: Tensor, student_clean_logits: Tensor | None,
               teacher_clean_logits: Tensor | None, tau: float, alpha: float) -> dict[str, Tensor]:
    """AdaAD: alpha KL(p_T(x') || p_S(x')) + (1 - alpha) KL(p_T(x) || p_S(x)) (Huang et al. 2023).

    The clean logits may be None when alpha == 1 (the clean term has weight 0); "kl_clean" is
    then absent from the result.
    """
    kl_adv = kl_div(teacher_adv_logits, student_adv_logits, tau)
    out = {"loss": alpha * kl_adv, "kl_adv": kl_adv.detach()}
    if student_clean_logits is None or teacher_clean_logits is None:
        if alpha != 1.0:
            raise ValueError(f"adaad_loss with alpha={alpha} needs student and teacher clean logits; got None")
        return out
    kl_clean = kl_div(teacher_clean_logits, student_clean_logits, tau)
    out["loss"] = out["loss"] + (1.0 - alpha) * kl_clean
    out["kl_clean"] = kl_clean.detach()
    return out


def akd_target(teacher_clean_logits: Tensor, y: Tensor, tau: float, lam: float) -> Tensor:
    """AKD soft target y~ = lam y + (1 - lam) p_T(x) (Maroto et al. 2022)."""
    p_teacher = F.softmax(teacher_clean_logits.float() / tau, dim=1)
    return lam * _as_soft_labels(y, teacher_clean_logits) + (1.0 - lam) * p_teacher


def akd_loss(student_adv_logits: Tensor, teacher_clean_logits: Tensor, y: Tensor, tau: float,
             lam: float) -> dict[str, Tensor]:
    """AKD outer loss CE(S(x'), y~) with y~ = lam y + (1 - lam) p_T(x) (Maroto et al. 2022)."""
    ce = soft_cross_entropy(student_adv_logits, akd_target(teacher_clean_logits, y, tau, lam))
    return {"loss": ce, "ce_adv": ce.detach()}


def ard_loss(student_adv_logits: Tensor, student_clean_logits: Tensor | None, teacher_clean_logits: Tensor,
             y: Tensor | None, tau: float, alpha: float) -> dict[str, Tensor]:
    """ARD: alpha tau^2 KL(p_T(x) || p_S(x')) + (1 - alpha) CE(S(x), y) (Goldblum et al. 2020).

    student_clean_logits and y may be None when alpha == 1 (the CE term has weight 0);
    "ce_clean" is then absent from the result.
    """
    kl_adv = kl_div(teacher_clean_logits, student_adv_logits, tau)
    out = {"loss": alpha * tau**2 * kl_adv, "kl_adv": kl_adv.detach()}
    if student_clean_logits is None or y is None:
        if alpha != 1.0:
            raise ValueError(f"ard_loss with alpha={alpha} needs student clean logits and labels y; got None")
        return out
    ce_clean = soft_cross_entropy(student_clean_logits, y)
    out["loss"] = out["loss"] + (1.0 - alpha) * ce_clean
    out["ce_clean"] = ce_clean.detach()
    return out


def pgd_at_loss(adv_logits: Tensor, y: Tensor) -> dict[str, Tensor]:
    """PGD-AT outer loss CE(f(x'), y) (Madry et al. 2018)."""
    ce = soft_cross_entropy(adv_logits, y)
    return {"loss": ce, "ce_adv": ce.detach()}


def trades_loss(clean_logits: Tensor, adv_logits: Tensor, y: Tensor, beta: float) -> dict[str, Tensor]:
    """TRADES: CE(f(x), y) + beta KL(p(x) || p(x')) (Zhang et al. 2019).

    The gradient flows through both p(x) and p(x'), as in the official code.
    """
    ce_clean = soft_cross_entropy(clean_logits, y)
    kl_adv = kl_div(clean_logits, adv_logits)
    return {"loss": ce_clean + beta * kl_adv, "ce_clean": ce_clean.detach(), "kl_adv": kl_adv.detach()}


def _as_soft_labels(y: Tensor, logits: Tensor) -> Tensor:
    if y.dim() == 1 and not y.is_floating_point():
        return F.one_hot(y, logits.shape[1]).to(torch.float32)
    if y.shape != logits.shape:
        raise ValueError(
            f"labels y have shape {tuple(y.shape)}; expected soft labels of shape {tuple(logits.shape)} "
            f"(or int64 class indices of shape ({logits.shape[0]},))"
        )
    return y.float()


# --------------------------------------------------------------------------------------------
# Method units.

def _attack_model(student: nn.Module) -> nn.Module:
    """The student as the attack calls it: without DDP/DataParallel, compiled where possible.

    A DDP forward prepares a gradient all-reduce that an input-gradient-only attack step never
    completes, so the attack must bypass the wrapper (the final loss forward goes through it).
    A compiled module is kept as is (the attack is most of a step's compute) unless the
    compiled thing is the DDP wrapper itself.
    """
    orig = getattr(student, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(orig, (DistributedDataParallel, DataParallel)):
        student = orig
    while isinstance(student, (DistributedDataParallel, DataParallel)):
        student = student.module
    return student


@dataclass
class _MethodBase:
    name: ClassVar[str]
    needs_teacher: ClassVar[bool]
    uses_labels: ClassVar[bool]
    uses_attack: ClassVar[bool] = True
    default_random_start: ClassVar[str] = "uniform"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{self.name}: {f.name}={value!r} is invalid; expected a finite number")
            setattr(self, f.name, float(value))
            check = _HPARAM_CHECKS.get(f.name)
            if check is not None and not check[0](value):
                raise ValueError(f"{self.name}: {f.name}={value!r} is invalid; expected {check[1]}")

    def random_start(self, attack: AttackSpec) -> str:
        """The attack's start: the caller's override, or this method's own for "default"."""
        return self.default_random_start if attack.random_start == "default" else attack.random_start

    def inner_objective(self, student: nn.Module, teacher: nn.Module | None, x: Tensor,
                        y: Tensor | None) -> Callable[[Tensor], Tensor]:
        """The inner maximisation's objective of x' (summed over the batch), as the attack sees it."""
        raise NotImplementedError(f"{self.name} has no attack")

    def _check(self, student: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor | None) -> None:
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: x has dtype {x.dtype}; pass float images in [0,1]")
        if self.needs_teacher:
            if teacher is None:
                raise ValueError(f"{self.name} needs a teacher; got teacher=None")
            if teacher.training:
                # A train-mode teacher would update its BatchNorm statistics: it must not change.
                raise ValueError(f"{self.name}: the teacher is in train mode; call teacher.eval() first")
        if self.uses_labels and y is None:
            raise ValueError(
                f"{self.name} needs labels y (soft labels (B, C)); got y=None. Label-free methods: "
                + ", ".join(n for n, cls in METHODS.items() if not cls.uses_labels)
            )
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: y has {y.shape[0]} rows for a batch of {x.shape[0]} images")

    def _attack(self, student: nn.Module, teacher: nn.Module | None, x: Tensor,
                objective: Callable[[Tensor], Tensor], attack: AttackSpec) -> Tensor:
        models = (student,) if teacher is None else (student, teacher)
        return pgd(objective, x, eps=attack.eps, step_size=attack.step_size, steps=attack.steps,
                   norm=attack.norm, random_start=self.random_start(attack), models=models)


_HPARAM_CHECKS: dict[str, tuple[Callable[[float], bool], str]] = {
    "tau": (lambda v: v > 0, "tau > 0"),
    "alpha": (lambda v: 0 <= v <= 1, "0 <= alpha <= 1"),
    "beta": (lambda v: v >= 0, "beta >= 0"),
    "lam": (lambda v: 0 <= v <= 1, "0 <= lam <= 1"),
}


def _disagreement_at(student: nn.Module, teacher: nn.Module, tau: float) -> Callable[[Tensor], Tensor]:
    """KL(p_T(x') || p_S(x')) summed over the batch, the gradient flowing through T and S:
    the inner objective of AdvFunMatch and AdaAD."""
    net = _attack_model(student)
    return lambda z: kl_div(teacher(z), net(z), tau, reduction="sum")


def _teacher_logits(teacher: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return teacher(x)


@dataclass
class AdvFunMatch(_MethodBase):
    """Adversarial function matching (Wu et al. 2023): consistent teaching on the worst-case x'.

    inner: max_x' KL(p_T(x') || p_S(x')), the gradient flowing through both T and S;
    outer: tau^2 KL(p_T(x') || p_S(x')). Labels are not used.
    """

    # GUESS: no official default found (code on gitee, not reachable here); 1 is FunMatch's
    # plain softmax (Beyer et al. 2022) and the value for which tau^2 is no rescaling at all.
    tau: float = 1.0  # softmax temperature
    name: ClassVar[str] = "advfunmatch"
    needs_teacher: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False
    # GUESS: not checked against the official code; uniform as in PGD-AT (Madry et al.).
    default_random_start: ClassVar[str] = "uniform"

    def inner_objective(self, student: nn.Module, teacher: nn.Module | None, x: Tensor,
                        y: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        return _disagreement_at(student, teacher, self.tau)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor | None,
                 attack: AttackSpec) -> dict[str, Tensor]:
        self._check(student, teacher, x, y)
        x_adv = self._attack(student, teacher, x, self.inner_objective(student, teacher, x, y), attack)
        return advfunmatch_loss(student(x_adv), _teacher_logits(teacher, x_adv), self.tau)


@dataclass
class FunMatch(_MethodBase):
    """Function matching (Beyer et al. 2022): tau^2 KL(p_T(x) || p_S(x)), no attack; the `attack`
    argument is ignored. The non-robust baseline of consistent teaching."""

    # GUESS: Beyer et al. distil with the plain softmax; 1 to our knowledge, not checked in code.
    tau: float = 1.0  # softmax temperature
    name: ClassVar[str] = "funmatch"
    needs_teacher: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False
    uses_attack: ClassVar[bool] = False

    def __call__(self, student: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor | None,
                 attack: AttackSpec | None = None) -> dict[str, Tensor]:
        self._check(student, teacher, x, y)
        return funmatch_loss(student(x), _teacher_logits(teacher, x), self.tau)


@dataclass
class RSLAD(_MethodBase):
    """Robust soft label adversarial distillation (Zi et al. 2021).

    inner: max_x' KL(p_T(x) || p_S(x')) with T on clean x once, the student in eval mode;
    outer: alpha KL(p_T(x) || p_S(x')) + (1 - alpha) KL(p_T(x) || p_S(x)). Labels are not used.
    The official code averages its KL over all B*C entries; we use batchmean (DESIGN.md), which
    is C times larger: an lr rescaling, not a different optimum.
    """

    tau: float = 1.0  # official code: plain softmax, no temperature
    alpha: float = 5 / 6  # official code: 5/6 adversarial + 1/6 clean
    name: ClassVar[str] = "rslad"
    needs_teacher: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False
    default_random_start: ClassVar[str] = "normal"  # official code: x + 0.001 N(0, 1)

    def inner_objective(self, student: nn.Module, teacher: nn.Module | None, x: Tensor,
                        y: Tensor | None = None, *,
                        teacher_clean_logits: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        net, tau = _attack_model(student), self.tau
        t_clean = _teacher_logits(teacher, x) if teacher_clean_logits is None else teacher_clean_logits
        return lambda z: kl_div(t_clean, net(z), tau, reduction="sum")

    def __call__(self, student: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor | None,
                 attack: AttackSpec) -> dict[str, Tensor]:
        self._check(student, teacher, x, y)
        t_clean = _teacher_logits(teacher, x)
        objective = self.inner_objective(student, teacher, x, y, teacher_clean_logits=t_clean)
        x_adv = self._attack(student, teacher, x, objective, attack)
        return rslad_loss(student(x_adv), student(x), t_clean, self.tau, self.alpha)


@dataclass
class AdaAD(_MethodBase):
    """Adaptive adversarial distillation (Huang et al. 2023).

    inner: max_x' KL(p_T(x') || p_S(x')) (T evaluated at x', as in the official code);
    outer: alpha KL(p_T(x') || p_S(x')) + (1 - alpha) KL(p_T(x) || p_S(x)). Labels are not used.
    At alpha = 1 (the default) the clean term is skipped, and "kl_clean" is not reported. The
    official code still runs S(x) in train mode there, which only feeds clean batches into the
    student's BatchNorm running statistics; we save that forward.
    """

    tau: float = 1.0  # official code: plain softmax, no temperature
    alpha: float = 1.0  # official code: --AdaAD_alpha 1.0
    name: ClassVar[str] = "adaad"
    needs_teacher: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False
    default_random_start: ClassVar[str] = "normal"  # official code: x + 0.001 N(0, 1)

    def inner_objective(self, student: nn.Module, teacher: nn.Module | None, x: Tensor,
                        y: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        return _disagreement_at(student, teacher, self.tau)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor | None,
                 attack: AttackSpec) -> dict[str, Tensor]:
        self._check(student, teacher, x, y)
        x_adv = self._attack(student, teacher, x, self.inner_objective(student, teacher, x, y), attack)
        s_clean = t_clean = None
        if self.alpha != 1.0:
            s_clean, t_clean = student(x), _teacher_logits(teacher, x)
        return adaad_loss(student(x_adv), _teacher_logits(teacher, x_adv), s_clean, t_clean,
                          self.tau, self.alpha)


@dataclass
class AKD(_MethodBase):
    """Adversarial knowledge distillation (Maroto et al. 2022): adversarial training of S on
    y~ = lam y + (1 - lam) p_T(x); inner and outer CE(S(x'), y~). Weak AT for the student
    (smaller eps/steps) is the caller's AttackSpec."""

    # GUESS: no official code found; the paper mixes labels and teacher outputs, and 1/2 is
    # the neutral mix. lam is the weight of the label.
    lam: float = 0.5  # weight of the (one-hot or mixed) label in the target
    tau: float = 1.0  # GUESS: plain softmax for p_T, as in RSLAD/AdaAD
    name: ClassVar[str] = "akd"
    needs_teacher: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = True
    default_random_start: ClassVar[str] = "uniform"  # AKD builds on PGD-AT (Madry et al.)

    def inner_objective(self, student: nn.Module, teacher: nn.Module | None, x: Tensor,
                        y: Tensor | None, *,
                        teacher_clean_logits: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        net = _attack_model(student)
        t_clean = _teacher_logits(teacher, x) if teacher_clean_logits is None else teacher_clean_logits
        target = akd_target(t_clean, y, self.tau, self.lam)
        return lambda z: soft_cross_entropy(net(z), target, reduction="sum")

    def __call__(self, student: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor | None,
                 attack: AttackSpec) -> dict[str, Tensor]:
        self._check(student, teacher, x, y)
        t_clean = _teacher_logits(teacher, x)
        objective = self.inner_objective(student, teacher, x, y, teacher_clean_logits=t_clean)
        x_adv = self._attack(student, teacher, x, objective, attack)
        return akd_loss(student(x_adv), t_clean, y, self.tau, self.lam)


@dataclass
class ARD(_MethodBase):
    """Adversarially robust distillation (Goldblum et al. 2020).

    inner: max_x' CE(S(x'), y); outer: alpha tau^2 KL(p_T(x) || p_S(x')) + (1 - alpha) CE(S(x), y).
    At alpha = 1 (the official default) the clean CE is skipped and "ce_clean" is not reported
    (the official code still runs S(x) in train mode, which only moves BatchNorm statistics).
    The official code's KLDivLoss() averages over all B*C entries; we use batchmean (DESIGN.md).
    """

    tau: float = 30.0  # official code: --temp 30.0
    alpha: float = 1.0  # official code: --alpha 1.0 (the paper's CIFAR-10 runs)
    name: ClassVar[str] = "ard"
    needs_teacher: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = True
    default_random_start: ClassVar[str] = "uniform"  # official AttackPGD: U(-eps, eps)

    def inner_objective(self, student: nn.Module, teacher: nn.Module | None, x: Tensor,
                        y: Tensor | None) -> Callable[[Tensor], Tensor]:
        net = _attack_model(student)
        return lambda z: soft_cross_entropy(net(z), y, reduction="sum")

    def __call__(self, student: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor | None,
                 attack: AttackSpec) -> dict[str, Tensor]:
        self._check(student, teacher, x, y)
        x_adv = self._attack(student, teacher, x, self.inner_objective(student, teacher, x, y), attack)
        t_clean = _teacher_logits(teacher, x)
        s_clean = student(x) if self.alpha != 1.0 else None
        return ard_loss(student(x_adv), s_clean, t_clean, y, self.tau, self.alpha)


@dataclass
class PGDAT(_MethodBase):
    """PGD adversarial training (Madry et al. 2018): inner and outer CE(f(x'), y).
    No teacher (one passed is ignored); used to train teachers and as a student baseline."""

    name: ClassVar[str] = "pgd_at"
    needs_teacher: ClassVar[bool] = False
    uses_labels: ClassVar[bool] = True
    default_random_start: ClassVar[str] = "uniform"  # Madry et al.: U(-eps, eps)

    def inner_objective(self, student: nn.Module, teacher: nn.Module | None, x: Tensor,
                        y: Tensor | None) -> Callable[[Tensor], Tensor]:
        net = _attack_model(student)
        return lambda z: soft_cross_entropy(net(z), y, reduction="sum")

    def __call__(self, student: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor | None,
                 attack: AttackSpec) -> dict[str, Tensor]:
        self._check(student, None, x, y)
        x_adv = self._attack(student, None, x, self.inner_objective(student, None, x, y), attack)
        return pgd_at_loss(student(x_adv), y)


@dataclass
class TRADES(_MethodBase):
    """TRADES (Zhang et al. 2019): inner max_x' KL(p(x) || p(x')) with p(x) fixed at the
    eval-mode clean prediction; outer CE(f(x), y) + beta KL(p(x) || p(x')). No teacher (one
    passed is ignored)."""

    beta: float = 6.0  # official CIFAR-10 script: --beta 6.0
    name: ClassVar[str] = "trades"
    needs_teacher: ClassVar[bool] = False
    uses_labels: ClassVar[bool] = True
    # Official code: x + 0.001 N(0, 1); at x' = x the KL has zero gradient, so "none" never moves.
    default_random_start: ClassVar[str] = "normal"

    def inner_objective(self, student: nn.Module, teacher: nn.Module | None, x: Tensor,
                        y: Tensor | None) -> Callable[[Tensor], Tensor]:
        net = _attack_model(student)
        clean: list[Tensor] = []

        def objective(z: Tensor) -> Tensor:
            if not clean:
                # First call happens inside pgd, i.e. in eval mode like the official code; once
                # per batch (the official code recomputes it every step for the same value).
                with torch.no_grad():
                    clean.append(net(x))
            return kl_div(clean[0], net(z), reduction="sum")

        return objective

    def __call__(self, student: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor | None,
                 attack: AttackSpec) -> dict[str, Tensor]:
        self._check(student, None, x, y)
        x_adv = self._attack(student, None, x, self.inner_objective(student, None, x, y), attack)
        return trades_loss(student(x), student(x_adv), y, self.beta)


METHODS: dict[str, type[_MethodBase]] = {
    cls.name: cls for cls in (AdvFunMatch, RSLAD, AdaAD, AKD, ARD, FunMatch, PGDAT, TRADES)
}


def build_method(name: str, **hparams: float | None) -> Method:
    """The method `name` with `hparams` over its defaults.

    A value of None for tau/alpha/beta/lam means "the method's default" (config.MethodConfig),
    also for a method without that hyperparameter. Unknown names, unknown hyperparameters and
    invalid values (tau <= 0, alpha or lam outside [0,1], beta < 0) raise ValueError.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    cls = METHODS[name]
    valid = [f.name for f in fields(cls)]
    given = {k: v for k, v in hparams.items() if not (v is None and k in HPARAM_NAMES)}
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise ValueError(
            f"method {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(valid) if valid else 'none'}"
        )
    return cls(**given)
