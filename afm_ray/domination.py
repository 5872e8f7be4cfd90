"""Pareto domination over a table of objective values, numpy only.

``values`` is an (n, m) array-like: one row per candidate (a trial, a configuration), one column
per objective. ``modes`` says per column whether larger is better (``"max"``) or smaller is
better (``"min"``), e.g. ``["max", "min"]`` for (accuracy, parameter count).

Row i *dominates* row j when i is no worse than j in every column and strictly better in at
least one. Identical rows never dominate each other, so ties and duplicates share a front.

Used by the front of a finished sweep (`afm_ray.pareto`), the sweep's end-of-run summary, and
anything else that ranks trials on several objectives (schedulers, benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "crowding_distance",
    "dominance_matrix",
    "dominated_beyond_noise",
    "hypervolume",
    "maximised",
    "non_dominated",
    "nondominated_layers",
    "pareto_mask",
]


def maximised(values: Any, modes: Sequence[str]) -> np.ndarray:
    """``values`` as an (n, m) float array with the "min" columns negated: larger is better everywhere.

    Raises ValueError for a shape that is not (n, m), a mode count other than m, a mode other
    than "max"/"min", or a NaN (a missing value has no place in a comparison: drop the row).
    An empty ``values`` gives a (0, m) array.
    """
    modes = tuple(modes)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1 and v.size == 0:  # [] has no columns to count
        v = v.reshape(0, len(modes))
    if v.ndim != 2:
        raise ValueError(f"values must be 2-D (rows, objectives), got shape {v.shape}")
    if len(modes) != v.shape[1]:
        raise ValueError(f"{len(modes)} goals for {v.shape[1]} objective columns (one mode per column)")
    bad = [m for m in modes if m not in ("max", "min")]
    if bad:
        raise ValueError(f"bad mode(s) {bad}: each mode is 'max' or 'min'")
    if np.isnan(v).any():
        raise ValueError("values contain NaN: leave those rows out (non_dominated skips them)")
    return v * np.where(np.asarray(modes) == "max", 1.0, -1.0)


def dominance_matrix(values: Any, modes: Sequence[str]) -> np.ndarray:
    """Boolean (n, n) matrix D with D[i, j] True iff row i dominates row j.

    Memory is n^2 bytes: 100 MB for 10,000 rows.
    """
    v = maximised(values, modes)
    d = np.empty((len(v), len(v)), dtype=bool)
    for i, row in enumerate(v):  # one row at a time keeps memory at n^2 bools, not n^2 * m
        d[i] = (row >= v).all(axis=1) & (row > v).any(axis=1)
    return d


def dominated_beyond_noise(low: Any, high: Any, modes: Sequence[str], by: Sequence[int]) -> np.ndarray:
    """Per row: True iff some row in ``by`` dominates it even at the unfavourable ends of both intervals.

    ``low`` and ``high`` (n, m) bound each value (equal where a value is exact, e.g. a parameter
    count). Row i dominates row j beyond noise when i's worst end is no worse than j's best end
    in every column and strictly better in at least one: no value inside the two intervals could
    reverse the order. A row that is dominated but not beyond noise may be as good as its dominator.
    """
    lo, hi = maximised(low, modes), maximised(high, modes)
    worst, best = np.minimum(lo, hi), np.maximum(lo, hi)  # a negated "min" column swaps its ends
    out = np.zeros(len(worst), dtype=bool)
    for i in by:
        out |= (worst[i] >= best).all(axis=1) & (worst[i] > best).any(axis=1)
    return out


def pareto_mask(values: Any, modes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows (the Pareto front); NaN is an error."""
    return ~dominance_matrix(values, modes).any(axis=0)


def non_dominated(values: Any, modes: Sequence[str]) -> list[int]:
    """Indices of the Pareto-optimal rows, in row order; a row with a NaN is never on the front.

    The forgiving entry point for plain result rows where a metric may be missing.
    """
    if len(values) == 0:
        return []
    v = np.asarray(values, dtype=np.float64)
    maximised(np.nan_to_num(v), modes)  # the shape and mode checks, NaN aside
    rows = np.flatnonzero(~np.isnan(v).any(axis=1))
    return rows[pareto_mask(v[rows], modes)].tolist()


def nondominated_layers(values: Any, modes: Sequence[str]) -> np.ndarray:
    """Front number per row: 1 for the Pareto front, 2 for the front once 1 is removed, ...

    The fast non-dominated sort of NSGA-II (Deb et al. 2002, Sec. III-A): a row joins layer
    k+1 when every row that dominates it lies in layers 1..k.
    """
    d = dominance_matrix(values, modes)
    n_dominators = d.sum(axis=0)
    layer = np.zeros(len(d), dtype=np.int64)
    current = np.flatnonzero(n_dominators == 0)
    k = 0
    while current.size:
        k += 1
        layer[current] = k
        n_dominators = n_dominators - d[current].sum(axis=0)
        current = np.flatnonzero((n_dominators == 0) & (layer == 0))
    return layer


def crowding_distance(values: Any, modes: Sequence[str]) -> np.ndarray:
    """NSGA-II crowding distance of each row within ``values`` (Deb et al. 2002, Sec. III-B).

    Meant for the rows of one front: larger means a lonelier point, worth keeping for spread.
    Per column, rows are sorted (ties by row index); the first and last get ``inf`` and each
    other row adds the gap between its two neighbours divided by the column's range. A column
    where all rows agree says nothing about spread and adds nothing. A duplicate row adds no
    spread either: its first occurrence gets the distance, later copies get 0. Up to two
    distinct rows are all boundary (``inf``). The modes only validate: distance has no direction.
    """
    v = maximised(values, modes)
    dist = np.zeros(len(v))
    if len(v) == 0:
        return dist
    _, first = np.unique(v, axis=0, return_index=True)
    first = np.sort(first)
    u = v[first]
    if len(u) <= 2:
        dist[first] = np.inf
        return dist
    d = np.zeros(len(u))
    for col in u.T:
        span = col.max() - col.min()
        if span == 0:
            continue
        order = np.argsort(col, kind="stable")
        d[order[1:-1]] += (col[order[2:]] - col[order[:-2]]) / span
        d[[order[0], order[-1]]] = np.inf
    dist[first] = d
    return dist


def hypervolume(values: Any, modes: Sequence[str], reference: Sequence[float]) -> float:
    """Volume of the objective space that the rows dominate, bounded by ``reference``.

    ``reference`` is one value per column, worse than the interesting rows in every column
    (below them for "max", above them for "min"); a row that does not beat it strictly in
    every column adds nothing. Exact: a sweep for 1-2 objectives, slicing along the last
    objective down to 2-D for more (fine for hundreds of points at 3-4 objectives).
    """
    if len(reference) != len(modes):
        raise ValueError(f"reference has {len(reference)} values for {len(modes)} objectives")
    v = maximised(values, modes)
    ref = maximised([reference], modes)[0]
    v = v[(v > ref).all(axis=1)]
    if len(v) == 0:
        return 0.0
    # Only the front matters, and it is usually much smaller; then minimise towards -ref.
    return _hypervolume_min(-v[pareto_mask(v, ["max"] * v.shape[1])], -ref)


def _hypervolume_min(points: np.ndarray, ref: np.ndarray) -> float:
    # Volume of the union of the boxes [p, ref] for points p < ref (minimisation).
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(ref[0] - points[:, 0].min())
    if points.shape[1] == 2:
        # Sorted on x, point k adds the strip [x_k, ref_x] x [y_k, lowest y so far].
        x, y = points[np.lexsort((points[:, 1], points[:, 0]))].T
        lowest_before = np.minimum.accumulate(np.concatenate(([ref[1]], y[:-1])))
        return float(np.sum((ref[0] - x) * np.clip(lowest_before - y, 0.0, None)))
    # Between consecutive levels of the last objective the cross-section is the
    # hypervolume, one dimension down, of the points at or below the lower level.
    p = points[np.argsort(points[:, -1], kind="stable")]
    levels = np.append(p[:, -1], ref[-1])
    total = 0.0
    for k in range(len(p)):
        depth = levels[k + 1] - levels[k]
        if depth > 0:
            total += depth * _hypervolume_min(p[: k + 1, :-1], ref[:-1])
    return total
