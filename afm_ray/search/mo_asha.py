"""Multi-objective asynchronous successive halving (MO-ASHA): rungs and the promote-or-stop rule.

Pure and Ray-free, so the Ray Tune scheduler (afm_ray.sweep.schedulers) and the search
benchmark (benchmarks/search.py, which replays it on recorded curves) run the same code.

The design is Syne Tune's MOASHA (Schmucker et al. 2021, "Multi-objective multi-fidelity
hyperparameter optimization with application to fairness"; Salinas et al. 2021), itself ASHA
(Li et al. 2020) with the scalar ranking replaced by a multi-objective one:

- rungs sit at ``grace_period * reduction_factor**k`` epochs, strictly below ``max_t`` (the
  last epoch: a trial that got there finishes and is evaluated);
- when a trial reports an epoch at or past a rung it has not been recorded at, its objective
  vector is recorded at that rung and ranked among every trial recorded there so far: first
  by non-dominated layer (NSGA-II's fast non-dominated sort), then, within a layer, by
  crowding distance (a lonelier point keeps the front's spread);
- it continues if it is in the top ``1 / reduction_factor`` of them (``position < n / rf``,
  position 0 being the best, ties sharing the better position), else it stops. The first trial
  at a rung has nothing to be compared with and continues, as in ASHA;
- with a ``margin`` (accuracy units, > 0), a trial outside the top 1/rf also continues while no
  trial at the rung leads it by at least ``margin`` in every objective: one within the
  validation noise of the rung's front is not stopped on a difference the noise could make.
  Ranking early epochs by non-dominated layer alone stops the high-clean, low-early-robustness
  end of the final front (docs/search.md measures how often, with and without the margin).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from afm_ray.domination import crowding_distance, dominated_beyond_noise, nondominated_layers

__all__ = ["RungLadder", "promoted", "rank_positions", "rung_milestones"]


def rung_milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """Epochs at which trials are compared: grace_period * rf**k for k = 0, 1, ..., below max_t."""
    if grace_period < 1:
        raise ValueError(f"grace_period must be >= 1, got {grace_period}")
    if reduction_factor <= 1:
        raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
    milestones: list[int] = []
    k = 0
    while (m := int(round(grace_period * reduction_factor**k))) < max_t:
        if not milestones or m > milestones[-1]:
            milestones.append(m)
        k += 1
    return milestones


def rank_positions(values: Sequence[Sequence[float]], modes: Sequence[str]) -> np.ndarray:
    """Position of each row in the order (non-dominated layer, then crowding distance within the
    layer, larger first): the number of rows strictly ahead of it, so tied rows share a position."""
    v = np.asarray(values, dtype=np.float64).reshape(len(values), len(modes))
    if len(v) == 0:
        return np.zeros(0, dtype=np.int64)
    layer = nondominated_layers(v, modes)
    crowd = np.zeros(len(v))
    for k in np.unique(layer):
        rows = np.flatnonzero(layer == k)
        crowd[rows] = crowding_distance(v[rows], modes)
    ahead = (layer[None, :] < layer[:, None]) | ((layer[None, :] == layer[:, None]) & (crowd[None, :] > crowd[:, None]))
    return ahead.sum(axis=1)


def promoted(
    values: Sequence[Sequence[float]], modes: Sequence[str], reduction_factor: float, margin: float = 0.0
) -> np.ndarray:
    """Boolean mask: the rows in the top 1/reduction_factor of ``values`` (position < n / rf), and
    with ``margin`` > 0 also every row that no row leads by at least ``margin`` in every objective."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    positions = rank_positions(values, modes)
    keep = positions < len(positions) / reduction_factor
    if margin > 0 and len(positions):
        v = np.asarray(values, dtype=np.float64).reshape(len(positions), len(modes))
        # Intervals of half the margin each side: a row dominates another beyond them iff it
        # leads by >= margin in every objective (and by more in one).
        keep |= ~dominated_beyond_noise(v - margin / 2, v + margin / 2, modes, range(len(v)))
    return keep


class RungLadder:
    """The rungs of one MO-ASHA bracket and the values recorded at each.

    ``on_result(trial_id, epoch, values)`` answers True (continue) or False (stop). Values are
    the per-epoch objectives in the order of ``modes`` (e.g. validation clean and PGD accuracy,
    both "max").
    """

    def __init__(
        self, modes: Sequence[str], *, grace_period: int, reduction_factor: float, max_t: int, margin: float = 0.0
    ):
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.modes = tuple(modes)
        self.reduction_factor = float(reduction_factor)
        self.margin = float(margin)
        self.milestones = rung_milestones(grace_period, reduction_factor, max_t)
        self.recorded: dict[int, dict[str, tuple[float, ...]]] = {m: {} for m in self.milestones}

    def on_result(self, trial_id: str, epoch: float, values: Sequence[float]) -> bool:
        values = tuple(float(x) for x in values)
        if len(values) != len(self.modes) or any(math.isnan(x) for x in values):
            return True  # nothing to rank on: never stop a trial for a missing metric
        for milestone in reversed(self.milestones):  # the highest rung the trial has reached
            if epoch < milestone:
                continue
            rung = self.recorded[milestone]
            if trial_id in rung:  # decided at this rung already (a repeated or resumed epoch)
                return True
            rung[trial_id] = values
            ids = list(rung)
            keep = promoted([rung[i] for i in ids], self.modes, self.reduction_factor, self.margin)
            return bool(keep[ids.index(trial_id)])
        return True  # before the first rung

    def forget(self, trial_id: str) -> None:
        """Drop a trial's records (a trial removed before it finished, e.g. errored)."""
        for rung in self.recorded.values():
            rung.pop(trial_id, None)
