"""A teacher ensemble that every method reads as one teacher (AKD, Maroto et al. 2022).

The ensemble's prediction at temperature tau is the mean of its members' probabilities at tau,
p_T(x) = 1/K sum_k softmax(z_k(x) / tau). The methods read a teacher only through
softmax(logits / tau) at their own tau (docs/methods.md), so the ensemble returns the logits
tau log p_T(x): softmax of them over tau is exactly that mean, and every method's formula holds
unchanged (for one teacher no ensemble is built at all). The logits are differentiable in x, so the
attacks that run through the teacher (AdvFunMatch, AdaAD) attack the ensemble's mean.

Why the mean of probabilities: it is the ensemble's predictive distribution (a mixture, as in
deep ensembles and RobustBench's ensemble models), so where members disagree the soft label stays
soft. The mean of logits is a product of the members' distributions: sharper, and confident where
they disagree, which discards the disagreement a student could learn from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def ensemble_logits(logits: Sequence[Tensor], tau: float) -> Tensor:
    """tau log(1/K sum_k softmax(z_k / tau)), in float32: logits whose softmax at tau is the members' mean."""
    if not logits:
        raise ValueError("an ensemble needs at least one member's logits")
    if not tau > 0:
        raise ValueError(f"tau={tau}: expected a temperature > 0")
    log_probs = torch.stack([torch.log_softmax(z.float() / tau, dim=-1) for z in logits])
    return tau * (torch.logsumexp(log_probs, dim=0) - math.log(len(logits)))


class TeacherEnsemble(nn.Module):
    """K frozen teachers read as one: ``forward`` returns `ensemble_logits` of their logits at ``tau``."""

    def __init__(self, members: Sequence[nn.Module], tau: float) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs two or more members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.tau = float(tau)

    def forward(self, x: Tensor) -> Tensor:
        return ensemble_logits([member(x) for member in self.members], self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}, mean of the members' probabilities"
