"""Staged robust evaluation: does a trial's AutoAttack still matter once its PGD-20 is known?

`eval.aa_policy: candidates` runs AutoAttack only for a trial that could still reach the front.
For the same model and images, AutoAttack's robust accuracy is at most PGD-20's (its first
attack, APGD-CE, is a stronger PGD on the same cross-entropy loss): PGD-20 is an upper bound on
the trial's AutoAttack accuracy. Every other objective (clean, PGD-20, CW accuracy, parameter
count, latency) is known exactly by then. So if a trial B that already finished, with its
AutoAttack measured, is at least as good as trial A's *optimistic* vector in every objective
(A's AutoAttack taken at its PGD-20 bound plus ``margin``), then A's true vector is dominated
by B and A cannot reach the front: its AutoAttack is skipped.

The margin (accuracy units, `eval.aa_margin`) guards the bound: AutoAttack beating PGD-20 on
an image is possible in principle (different random starts), so B must clear A's PGD-20 by
``margin`` before A is skipped; with ``margin > 0`` B's advantage is also strict.

Pure: the Ray actor that holds the finished trials (afm_ray.sweep.aa_gate), the training worker
that asks it, and the search benchmark that replays the policy share this code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from afm_ray.names import Objective

AA_METRIC = "aa_acc"
AA_BOUND_METRIC = "pgd20_acc"  # the upper bound on aa_acc known before AutoAttack runs


def optimistic_vector(
    metrics: Mapping[str, float], objectives: Sequence[Objective], margin: float
) -> list[float] | None:
    """The best a trial can still score per objective, before its AutoAttack: every metric as
    measured, ``aa_acc`` at its PGD-20 bound plus ``margin``. None if a needed metric is missing."""
    out = []
    for o in objectives:
        if o.metric == AA_METRIC:
            bound = metrics.get(AA_BOUND_METRIC)
            if bound is None:
                return None
            # The margin only ever makes the bound more optimistic (harder to dominate).
            out.append(float(bound) + margin if o.mode == "max" else float(bound) - margin)
        elif o.metric in metrics:
            out.append(float(metrics[o.metric]))
        else:
            return None
    return out


def aa_verdict(
    metrics: Mapping[str, float],
    finished: Iterable[tuple[str, Mapping[str, float]]],
    objectives: Sequence[Objective],
    margin: float,
) -> str | None:
    """None if AutoAttack must run for the trial with ``metrics`` (everything but aa_acc), else
    the reason it cannot matter, naming the finished trial that dominates its best case.

    ``finished``: (trial id, final metrics) of trials that completed with AutoAttack measured.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    # With a positive margin on aa_acc, B beats A's true aa_acc strictly whenever it clears the bound.
    strict_by_margin = margin > 0 and any(o.metric == AA_METRIC for o in objectives)
    bound = optimistic_vector(metrics, objectives, margin)
    if bound is None:
        return None  # cannot bound an objective: AutoAttack runs
    sign = [1.0 if o.mode == "max" else -1.0 for o in objectives]
    for trial_id, other in finished:
        if any(o.metric not in other for o in objectives):
            continue
        values = [float(other[o.metric]) for o in objectives]
        better_or_equal = all(s * v >= s * b for s, v, b in zip(sign, values, bound, strict=True))
        strictly = any(s * v > s * b for s, v, b in zip(sign, values, bound, strict=True))
        if better_or_equal and (strictly or strict_by_margin):
            parts = []
            for o, v, b in zip(objectives, values, bound, strict=True):
                if o.metric == AA_METRIC:
                    parts.append(f"aa_acc {v:.4g} >= pgd20_acc {metrics[AA_BOUND_METRIC]:.4g} + margin {margin:g}")
                else:
                    parts.append(f"{o.metric} {v:.4g} {'>=' if o.mode == 'max' else '<='} {b:.4g}")
            return f"dominated by finished trial {trial_id}: " + ", ".join(parts)
    return None
