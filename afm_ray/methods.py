"""Distillation and adversarial-training methods: one small unit per row of the methods table
(docs/methods.md).

Each method is a dataclass of its hyperparameters (defaults from the official code; a guess
says so) with an `inner_objective` and an `outer_loss`; the one `__call__(student, teacher, x,
y, attack)` of the base class runs the inner maximisation through the shared
`afm_ray.attacks.pgd`, then the outer loss, and returns {"loss": scalar with grad, <named parts>:
detached}. The outer losses are pure functions of logits in afm_ray.losses (`advfunmatch_loss`,
`rslad_loss`, ...), pinned by tests/test_methods.py against stored values.

Notation (docs/methods.md): S student, T teacher (frozen, eval mode), x the augmented clean batch in
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
from torch import Tensor, nn

from afm_ray.attacks import pgd
from afm_ray.losses import (
    adaad_loss,
    advfunmatch_loss,
    akd_loss,
    akd_target,
    ard_loss,
    funmatch_loss,
    kl_div,
    pgd_at_loss,
    rslad_loss,
    soft_cross_entropy,
    trades_loss,
)
from afm_ray.models import unwrap
from afm_ray.names import CONFIG_RANDOM_STARTS, HPARAM_NAMES, NORMS


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
        if not (isinstance(self.step_size, (int, float)) and math.isfinite(self.step_size) and self.step_size >= 0):
            raise ValueError(f"attack step_size={self.step_size!r} is invalid; expected a finite number >= 0")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"attack steps={self.steps!r} is invalid; expected an integer >= 0")
        if self.norm not in NORMS:
            raise ValueError(f"attack norm={self.norm!r} is unknown; use one of {NORMS}")
        if self.random_start not in CONFIG_RANDOM_STARTS:
            raise ValueError(f"attack random_start={self.random_start!r} is unknown; use one of {CONFIG_RANDOM_STARTS}")


class Method(Protocol):
    name: str
    needs_teacher: bool
    uses_labels: bool

    def __call__(
        self, student: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor | None, attack: AttackSpec
    ) -> dict[str, Tensor]: ...


# --------------------------------------------------------------------------------------------
# Method units.


def _attack_model(student: nn.Module) -> nn.Module:
    """The student as the attack calls it: without DDP/DataParallel, compiled where possible.

    A DDP forward prepares a gradient all-reduce that an input-gradient-only attack step never
    completes, so the attack must bypass the wrapper (the final loss forward goes through it).
    A compiled module is kept (the attack is most of a step's compute) unless the compiled
    thing is the DDP wrapper itself.
    """
    return unwrap(student, keep_compiled=True)


def _teacher_logits(teacher: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return teacher(x)


def _disagreement_at(student: nn.Module, teacher: nn.Module, tau: float) -> Callable[[Tensor], Tensor]:
    """KL(p_T(x') || p_S(x')) summed over the batch, the gradient flowing through T and S:
    the inner objective of AdvFunMatch and AdaAD."""
    net = _attack_model(student)
    return lambda z: kl_div(teacher(z), net(z), tau, reduction="sum")


def _label_cross_entropy(student: nn.Module, y: Tensor) -> Callable[[Tensor], Tensor]:
    """CE(S(x'), y) summed over the batch: the inner objective of PGD-AT and ARD."""
    net = _attack_model(student)
    return lambda z: soft_cross_entropy(net(z), y, reduction="sum")


_HPARAM_CHECKS: dict[str, tuple[Callable[[float], bool], str]] = {
    "tau": (lambda v: v > 0, "tau > 0"),
    "alpha": (lambda v: 0 <= v <= 1, "0 <= alpha <= 1"),
    "beta": (lambda v: v >= 0, "beta >= 0"),
    "lam": (lambda v: 0 <= v <= 1, "0 <= lam <= 1"),
}


@dataclass
class _MethodBase:
    """One training step's loss: check inputs, run the attack on the method's inner objective
    through the shared `pgd`, then the method's outer loss.

    A method says what it needs (`needs_teacher`, `uses_labels`, `uses_attack`, and whether its
    outer loss or attack reads the teacher's clean logits) and writes two functions of the same
    signature for every method: `inner_objective` and `outer_loss`. The teacher's clean logits
    are computed once per batch, under no_grad, and only when the method reads them.
    """

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

    def reads_teacher_clean(self) -> bool:
        """Whether the attack or the outer loss uses T(x), the teacher on the clean batch."""
        return False

    def random_start(self, attack: AttackSpec) -> str:
        """The attack's start: the caller's override, or this method's own for "default"."""
        return self.default_random_start if attack.random_start == "default" else attack.random_start

    def inner_objective(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        x: Tensor,
        y: Tensor | None,
        teacher_clean_logits: Tensor | None = None,
    ) -> Callable[[Tensor], Tensor]:
        """The inner maximisation's objective of x' (summed over the batch), as the attack sees it."""
        raise NotImplementedError(f"{self.name} has no attack")

    def outer_loss(
        self,
        student: nn.Module,
        x: Tensor,
        x_adv: Tensor | None,
        y: Tensor | None,
        teacher: nn.Module | None,
        teacher_clean_logits: Tensor | None,
    ) -> dict[str, Tensor]:
        """The loss the student minimises, from the clean batch x and the attack's x'."""
        raise NotImplementedError

    def __call__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        x: Tensor,
        y: Tensor | None,
        attack: AttackSpec | None = None,
    ) -> dict[str, Tensor]:
        self._check(student, teacher, x, y)
        if not self.needs_teacher:
            teacher = None  # PGD-AT and TRADES ignore a teacher they are given
        t_clean = _teacher_logits(teacher, x) if self.reads_teacher_clean() else None
        x_adv = None
        if self.uses_attack:
            if attack is None:
                raise ValueError(f"{self.name} needs an AttackSpec; got attack=None")
            objective = self.inner_objective(student, teacher, x, y, t_clean)
            models = (student,) if teacher is None else (student, teacher)
            x_adv = pgd(
                objective,
                x,
                eps=attack.eps,
                step_size=attack.step_size,
                steps=attack.steps,
                norm=attack.norm,
                random_start=self.random_start(attack),
                models=models,
            )
        return self.outer_loss(student, x, x_adv, y, teacher, t_clean)

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

    def inner_objective(self, student, teacher, x, y=None, teacher_clean_logits=None):
        return _disagreement_at(student, teacher, self.tau)

    def outer_loss(self, student, x, x_adv, y, teacher, teacher_clean_logits):
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

    def reads_teacher_clean(self) -> bool:
        return True

    def outer_loss(self, student, x, x_adv, y, teacher, teacher_clean_logits):
        return funmatch_loss(student(x), teacher_clean_logits, self.tau)


@dataclass
class RSLAD(_MethodBase):
    """Robust soft label adversarial distillation (Zi et al. 2021).

    inner: max_x' KL(p_T(x) || p_S(x')) with T on clean x once, the student in eval mode;
    outer: alpha KL(p_T(x) || p_S(x')) + (1 - alpha) KL(p_T(x) || p_S(x)). Labels are not used.
    The official code averages its KL over all B*C entries; we use batchmean (docs/methods.md),
    which is C times larger: an lr rescaling, not a different optimum.
    """

    tau: float = 1.0  # official code: plain softmax, no temperature
    alpha: float = 5 / 6  # official code: 5/6 adversarial + 1/6 clean
    name: ClassVar[str] = "rslad"
    needs_teacher: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False
    default_random_start: ClassVar[str] = "normal"  # official code: x + 0.001 N(0, 1)

    def reads_teacher_clean(self) -> bool:
        return True

    def inner_objective(self, student, teacher, x, y=None, teacher_clean_logits=None):
        net, tau = _attack_model(student), self.tau
        t_clean = _teacher_logits(teacher, x) if teacher_clean_logits is None else teacher_clean_logits
        return lambda z: kl_div(t_clean, net(z), tau, reduction="sum")

    def outer_loss(self, student, x, x_adv, y, teacher, teacher_clean_logits):
        return rslad_loss(student(x_adv), student(x), teacher_clean_logits, self.tau, self.alpha)


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

    def reads_teacher_clean(self) -> bool:
        return self.alpha != 1.0

    def inner_objective(self, student, teacher, x, y=None, teacher_clean_logits=None):
        return _disagreement_at(student, teacher, self.tau)

    def outer_loss(self, student, x, x_adv, y, teacher, teacher_clean_logits):
        s_clean = student(x) if self.alpha != 1.0 else None
        return adaad_loss(
            student(x_adv), _teacher_logits(teacher, x_adv), s_clean, teacher_clean_logits, self.tau, self.alpha
        )


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

    def reads_teacher_clean(self) -> bool:
        return True

    def inner_objective(self, student, teacher, x, y, teacher_clean_logits=None):
        net = _attack_model(student)
        t_clean = _teacher_logits(teacher, x) if teacher_clean_logits is None else teacher_clean_logits
        target = akd_target(t_clean, y, self.tau, self.lam)
        return lambda z: soft_cross_entropy(net(z), target, reduction="sum")

    def outer_loss(self, student, x, x_adv, y, teacher, teacher_clean_logits):
        return akd_loss(student(x_adv), teacher_clean_logits, y, self.tau, self.lam)


@dataclass
class ARD(_MethodBase):
    """Adversarially robust distillation (Goldblum et al. 2020).

    inner: max_x' CE(S(x'), y); outer: alpha tau^2 KL(p_T(x) || p_S(x')) + (1 - alpha) CE(S(x), y).
    At alpha = 1 (the official default) the clean CE is skipped and "ce_clean" is not reported
    (the official code still runs S(x) in train mode, which only moves BatchNorm statistics).
    The official code's KLDivLoss() averages over all B*C entries; we use batchmean.
    """

    tau: float = 30.0  # official code: --temp 30.0
    alpha: float = 1.0  # official code: --alpha 1.0 (the paper's CIFAR-10 runs)
    name: ClassVar[str] = "ard"
    needs_teacher: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = True
    default_random_start: ClassVar[str] = "uniform"  # official AttackPGD: U(-eps, eps)

    def reads_teacher_clean(self) -> bool:
        return True

    def inner_objective(self, student, teacher, x, y, teacher_clean_logits=None):
        return _label_cross_entropy(student, y)

    def outer_loss(self, student, x, x_adv, y, teacher, teacher_clean_logits):
        s_clean = student(x) if self.alpha != 1.0 else None
        return ard_loss(student(x_adv), s_clean, teacher_clean_logits, y, self.tau, self.alpha)


@dataclass
class PGDAT(_MethodBase):
    """PGD adversarial training (Madry et al. 2018): inner and outer CE(f(x'), y).
    No teacher (one passed is ignored); used to train teachers and as a student baseline."""

    name: ClassVar[str] = "pgd_at"
    needs_teacher: ClassVar[bool] = False
    uses_labels: ClassVar[bool] = True
    default_random_start: ClassVar[str] = "uniform"  # Madry et al.: U(-eps, eps)

    def inner_objective(self, student, teacher, x, y, teacher_clean_logits=None):
        return _label_cross_entropy(student, y)

    def outer_loss(self, student, x, x_adv, y, teacher, teacher_clean_logits):
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

    def inner_objective(self, student, teacher, x, y, teacher_clean_logits=None):
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

    def outer_loss(self, student, x, x_adv, y, teacher, teacher_clean_logits):
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
