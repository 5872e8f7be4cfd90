"""Statistics of the search benchmark: ratios of regrets between two searchers with bootstrap
95% intervals over seeds, and the first compute at which a hypervolume curve reaches a target.

Seeds are the resampled unit: seed s of every searcher is one replicate (the same seed gives the
samplers the same random start-up draws), so a bootstrap sample draws seed indices with
replacement and takes the same indices for both searchers (paired). Percentile intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BOOTSTRAP = 10_000
CONFIDENCE = 0.95


def _ratio(a: np.ndarray, b: np.ndarray, stat: Any) -> np.ndarray:
    num, den = stat(a, axis=-1), stat(b, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.inf)


def ratio_with_interval(
    a: Sequence[float], b: Sequence[float], *, stat: str = "mean", seed: int = 0, samples: int = BOOTSTRAP
) -> tuple[float, list[float]]:
    """stat(a) / stat(b) (``stat``: mean or median) and its paired-bootstrap 95% interval.
    ``a`` and ``b`` are per-seed values of the same seeds."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"a and b must be 1-D and of the same length, got {a.shape} and {b.shape}")
    f = {"mean": np.mean, "median": np.median}[stat]
    idx = np.random.default_rng(seed).integers(0, len(a), size=(samples, len(a)))
    boot = _ratio(a[idx], b[idx], f)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(boot, [tail, 100 - tail])
    return float(_ratio(a, b, f)), [float(low), float(high)]


def pooled_ratio_with_interval(
    pairs: Sequence[tuple[Sequence[float], Sequence[float]]], *, stat: str = "mean", seed: int = 0
) -> tuple[float, list[float]]:
    """The mean over tables of stat(a) / stat(b) (one (a, b) pair per table), with a bootstrap 95%
    interval that resamples the seeds of each table independently."""
    f = {"mean": np.mean, "median": np.median}[stat]
    rng = np.random.default_rng(seed)
    point, boots = [], []
    for a, b in pairs:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        idx = rng.integers(0, len(a), size=(BOOTSTRAP, len(a)))
        point.append(float(_ratio(a, b, f)))
        boots.append(_ratio(a[idx], b[idx], f))
    boot = np.mean(boots, axis=0)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(boot, [tail, 100 - tail])
    return float(np.mean(point)), [float(low), float(high)]


def first_reaching(curve: np.ndarray, target: float) -> int | None:
    """Index of the first point of ``curve`` at or above ``target`` (None if it never gets there)."""
    hit = np.flatnonzero(np.asarray(curve) >= target)
    return int(hit[0]) if hit.size else None


def reach_with_interval(
    curves: np.ndarray, target_curves: np.ndarray, fraction: float, *, seed: int = 0, samples: int = 2000
) -> tuple[int | None, list[int | None]]:
    """The first grid index at which the median of ``curves`` (seeds x grid) reaches ``fraction``
    of the median final value of ``target_curves``, and a bootstrap 95% interval of that index
    (seeds of each resampled independently; None = not reached within the grid)."""
    point = first_reaching(np.median(curves, axis=0), fraction * float(np.median(target_curves[:, -1])))
    rng = np.random.default_rng(seed)
    hits = []
    for _ in range(samples):
        c = curves[rng.integers(0, len(curves), len(curves))]
        t = target_curves[rng.integers(0, len(target_curves), len(target_curves))]
        hit = first_reaching(np.median(c, axis=0), fraction * float(np.median(t[:, -1])))
        hits.append(np.inf if hit is None else hit)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(hits, [tail, 100 - tail], method="nearest")
    return point, [None if np.isinf(v) else int(v) for v in (low, high)]
