"""The methods' losses as pure functions of logits (docs/methods.md), pinned by
tests/test_methods.py against stored values; afm_ray.methods wraps each in a method unit.

KL(P || Q) = F.kl_div(log Q, log P, reduction="batchmean", log_target=True) with P the target,
p(.) = softmax(logits / tau); log-softmaxes in float32 even when the logits come in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "adaad_loss",
    "advfunmatch_loss",
    "akd_loss",
    "akd_target",
    "ard_loss",
    "funmatch_loss",
    "kl_div",
    "pgd_at_loss",
    "rslad_loss",
    "soft_cross_entropy",
    "trades_loss",
]


def kl_div(target_logits: Tensor, input_logits: Tensor, tau: float = 1.0, *, reduction: str = "batchmean") -> Tensor:
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


def rslad_loss(
    student_adv_logits: Tensor, student_clean_logits: Tensor, teacher_clean_logits: Tensor, tau: float, alpha: float
) -> dict[str, Tensor]:
    """RSLAD: alpha KL(p_T(x) || p_S(x')) + (1 - alpha) KL(p_T(x) || p_S(x)) (Zi et al. 2021)."""
    kl_adv = kl_div(teacher_clean_logits, student_adv_logits, tau)
    kl_clean = kl_div(teacher_clean_logits, student_clean_logits, tau)
    loss = alpha * kl_adv + (1.0 - alpha) * kl_clean
    return {"loss": loss, "kl_adv": kl_adv.detach(), "kl_clean": kl_clean.detach()}


def adaad_loss(
    student_adv_logits: Tensor,
    teacher_adv_logits: Tensor,
    student_clean_logits: Tensor | None,
    teacher_clean_logits: Tensor | None,
    tau: float,
    alpha: float,
) -> dict[str, Tensor]:
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


def akd_loss(
    student_adv_logits: Tensor, teacher_clean_logits: Tensor, y: Tensor, tau: float, lam: float
) -> dict[str, Tensor]:
    """AKD outer loss CE(S(x'), y~) with y~ = lam y + (1 - lam) p_T(x) (Maroto et al. 2022)."""
    ce = soft_cross_entropy(student_adv_logits, akd_target(teacher_clean_logits, y, tau, lam))
    return {"loss": ce, "ce_adv": ce.detach()}


def ard_loss(
    student_adv_logits: Tensor,
    student_clean_logits: Tensor | None,
    teacher_clean_logits: Tensor,
    y: Tensor | None,
    tau: float,
    alpha: float,
) -> dict[str, Tensor]:
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
