"""Attacks: the one PGD routine every method and every eval attack goes through.

`pgd` maximises any scalar objective of the perturbed input (Madry et al. 2018, eq. 2:
x^{t+1} = Proj_{B(x, eps) ∩ [0,1]}(x^t + alpha * step(grad)) ), so a distillation method only
writes its inner objective and never copies the loop. PGD-20/10 and CW-linf are thin
wrappers over it; AutoAttack comes from the `pyautoattack` packaging of the reference code.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afm_ray.models import eval_mode
from afm_ray.names import ATTACKS, NORMS, RANDOM_STARTS

# Smallest per-sample gradient norm used when normalising an l2 step; a zero gradient then
# gives a zero step instead of NaN.
_L2_TINY = 1e-12


def _per_sample_norm(t: Tensor) -> Tensor:
    """l2 norm over all but the batch dim, shaped (B, 1, ..., 1) to broadcast against t."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project onto B(x, eps) ∩ [0,1]. Clamping to [0,1] after the ball projection only moves
    coordinates toward x (x itself is in [0,1]), so the result stays inside the ball."""
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        scale = (eps / _per_sample_norm(delta).clamp_min(_L2_TINY)).clamp(max=1.0)
        x_adv = x + delta * scale
    return x_adv.clamp(0.0, 1.0)


def _random_start(x: Tensor, eps: float, norm: str, random_start: str) -> Tensor:
    if random_start == "none":
        return x.clone()
    if random_start == "normal":
        # Official RSLAD / AdaAD code: x + 0.001 * N(0, 1), then projected.
        return x + 0.001 * torch.randn_like(x)
    if norm == "linf":
        return x + torch.empty_like(x).uniform_(-eps, eps)
    # l2: uniform in the ball = uniform direction times radius eps * U^(1/d).
    direction = torch.randn_like(x)
    direction = direction / _per_sample_norm(direction).clamp_min(_L2_TINY)
    d = x[0].numel()
    radius = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype).pow(1.0 / d)
    return x + direction * radius.view(-1, *([1] * (x.dim() - 1)))


def pgd(
    objective: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: Literal["linf", "l2"] = "linf",
    random_start: Literal["uniform", "normal", "none"] = "uniform",
    models: Sequence[nn.Module] = (),
) -> Tensor:
    """Projected gradient ascent of `objective` over B(x, eps) ∩ [0,1] (Madry et al. 2018, eq. 2).

    objective: maps x_adv (same shape as x) to a scalar; callers return a sum or mean loss.
    norm: "linf" takes sign-gradient steps, "l2" per-sample normalised-gradient steps.
    random_start: "uniform" U(-eps, eps) (l2: uniform in the ball), "normal" x + 0.001 N(0, 1)
        (official RSLAD/AdaAD code), "none" starts at x.
    models: put in eval mode during the attack; every submodule's train/eval flag is restored
        exactly afterwards, also on exception.
    Gradients are taken w.r.t. x_adv only (torch.autograd.grad), so no parameter accumulates
    `.grad`. Returns the detached x_adv; steps == 0 returns the projected start point.
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; use one of {NORMS}")
    if random_start not in RANDOM_STARTS:
        raise ValueError(f"random_start={random_start!r} is not supported; use one of {RANDOM_STARTS}")
    if eps < 0 or steps < 0:
        raise ValueError(f"eps={eps} and steps={steps} must both be >= 0")

    x = x.detach()
    with eval_mode(models), torch.enable_grad():
        x_adv = _project(_random_start(x, eps, norm, random_start), x, eps, norm).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = objective(x_adv)
            if loss.dim() != 0:
                raise ValueError(
                    f"objective returned shape {tuple(loss.shape)}; it must return a scalar "
                    "(sum or mean the per-sample loss)"
                )
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                if norm == "linf":
                    step = grad.sign()
                else:
                    step = grad / _per_sample_norm(grad).clamp_min(_L2_TINY)
                x_adv = _project(x_adv + step_size * step, x, eps, norm)
            x_adv = x_adv.detach()
    return x_adv


def cw_margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """CW-linf margin (Carlini & Wagner 2017, eq. f_6 without kappa): max_{j!=y} z_j - z_y, summed."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return (others.amax(dim=1) - true).sum()


# --------------------------------------------------------------------------------------------
# Evaluation protocol (names.EVAL_PROTOCOLS): clean, PGD-20/10 on CE (step eps/4, uniform start), CW-linf
# margin (20 steps, step eps/4), AutoAttack "standard".

_PGD_STEPS = {"pgd20": 20, "pgd10": 10, "cw": 20}
_AA_NORMS = {"linf": "Linf", "l2": "L2"}
# At most one per-batch progress line per this many seconds (start and end are always reported).
_PROGRESS_EVERY_S = 30.0


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the attack's randomness without moving the caller's RNG stream: evaluation in the
    middle of training must not change what the next epoch's shuffles and augmentations are,
    and AutoAttack calls torch.manual_seed itself."""
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(
        devices=[device] if accelerator else [], device_type=device.type if accelerator else None
    ):
        torch.manual_seed(seed)
        yield


class _ProgressHandler(logging.Handler):
    """Forwards pyautoattack's debug log lines to a `progress(str)` callback."""

    def __init__(self, progress: Callable[[str], None], prefix: str) -> None:
        super().__init__(level=logging.DEBUG)
        self.progress = progress
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress(f"{self.prefix}{record.getMessage()}")
        except Exception:  # a broken progress sink must not abort a long evaluation
            self.handleError(record)


@contextlib.contextmanager
def _autoattack_logs_to(progress: Callable[[str], None] | None, prefix: str) -> Iterator[None]:
    if progress is None:
        yield
        return
    logger = logging.getLogger("auto-attack")
    handler = _ProgressHandler(progress, prefix)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    # Its debug lines go to `progress`; do not also flood the application's root handlers.
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _check_eval_inputs(x: Tensor, y: Tensor, eps: float, norm: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"x has dtype {x.dtype}; pass float images in [0,1] (e.g. x_uint8 / 255)")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(
            f"y has shape {tuple(y.shape)} and dtype {y.dtype}; pass int64 class indices of shape ({x.shape[0]},)"
        )
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; use one of {NORMS}")
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0")


def robust_predictions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    attack: str,
    eps: float,
    norm: Literal["linf", "l2"] = "linf",
    batch_size: int = 256,
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Tensor:
    """Per-sample correctness (bool, shape (N,), on x.device) of `model` under `attack`.

    attack: "clean"; "pgd20" / "pgd10" (CE, step eps/4, uniform start; Madry et al. 2018);
    "cw" (CW-linf margin loss, 20 steps, step eps/4, uniform start); "aa" (AutoAttack
    standard, Croce & Hein 2020, via pyautoattack). The model is in eval mode during the call
    and every submodule's flag is restored after. seed: if given, the attack's randomness is
    seeded and the caller's RNG state is left untouched (AutoAttack always gets `seed`, 0 if None).
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack={attack!r} is unknown; use one of {ATTACKS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    _check_eval_inputs(x, y, eps, norm)
    while True:
        rng = _forked_rng(x.device, seed) if seed is not None else contextlib.nullcontext()
        try:
            with eval_mode((model,)), rng:
                if attack == "aa":
                    return _autoattack_predictions(
                        model,
                        x,
                        y,
                        eps=eps,
                        norm=norm,
                        batch_size=batch_size,
                        seed=0 if seed is None else seed,
                        progress=progress,
                    )
                return _pgd_predictions(
                    model, x, y, attack=attack, eps=eps, norm=norm, batch_size=batch_size, progress=progress
                )
        except torch.OutOfMemoryError:
            # A batch chosen to fill the device can still miss (fragmentation, another process):
            # halve it and start this attack again rather than lose the evaluation.
            if batch_size == 1:
                raise
        # Outside the handler, where the traceback's frames no longer hold the failed batch.
        batch_size //= 2
        if x.device.type == "cuda":
            torch.cuda.empty_cache()
        if progress is not None:
            progress(f"{attack}: out of memory, retrying with batch {batch_size}")


def _pgd_predictions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    attack: str,
    eps: float,
    norm: str,
    batch_size: int,
    progress: Callable[[str], None] | None,
) -> Tensor:
    correct = torch.empty(x.shape[0], dtype=torch.bool, device=x.device)
    n_batches = math.ceil(x.shape[0] / batch_size)
    started = last_report = time.monotonic()
    for i, start in enumerate(range(0, x.shape[0], batch_size)):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if attack != "clean":
            loss_fn = cw_margin_loss if attack == "cw" else _ce_sum
            xb = pgd(
                lambda z, yb=yb, loss_fn=loss_fn: loss_fn(model(z), yb),
                xb,
                eps=eps,
                step_size=eps / 4,
                steps=_PGD_STEPS[attack],
                norm=norm,
                random_start="uniform",
            )
        with torch.no_grad():
            correct[start : start + batch_size] = model(xb).argmax(dim=1) == yb
        now = time.monotonic()
        if progress is not None and attack != "clean" and i + 1 < n_batches and now - last_report > _PROGRESS_EVERY_S:
            progress(f"{attack}: batch {i + 1}/{n_batches} ({now - started:.0f} s)")
            last_report = now
    return correct


def _ce_sum(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def _autoattack_predictions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    batch_size: int,
    seed: int,
    progress: Callable[[str], None] | None,
) -> Tensor:
    from pyautoattack import AutoAttack  # heavy import, only when AA is asked for

    # eps always explicit: pyautoattack's default is 0.3, wrong for everything but MNIST.
    adversary = AutoAttack(model, eps=eps, norm=_AA_NORMS[norm], version="standard", device=x.device, seed=seed)
    with _autoattack_logs_to(progress, "aa: "), _parameters_frozen(model):
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return y_adv.to(y.device) == y


@contextlib.contextmanager
def _parameters_frozen(model: nn.Module) -> Iterator[None]:
    """FAB calls .backward(), which would accumulate parameter .grad (and cost the parameter
    gradients); with requires_grad off only the input gradient is computed."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
