"""Intervals for accuracies: how far a measured accuracy may be from the true one.

An accuracy is a count of correct images out of n, so its uncertainty from the test images alone
is binomial. `wilson_interval` is the Wilson score interval (Wilson 1927; Brown, Cai & DasGupta
2001 recommend it over the normal approximation, which leaves [0, 1] and undercovers near 0 and
1). `mean_interval` adds the spread between training seeds. Standard library only, apart from
Student's t quantile for several seeds (scipy, imported when needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist, fmean, stdev

from afm_ray.names import ACCURACY_METRICS, CI_HIGH, CI_LOW, CONFIDENCE


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: expected a level in (0, 1), e.g. 0.95")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(accuracy: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) Wilson score interval of an accuracy measured on ``n`` images.

    ``accuracy`` may be any fraction in [0, 1] (a mean of accuracies too: the formula needs no
    integer count). ``n`` < 1 or a NaN accuracy gives (nan, nan).
    """
    if not n >= 1 or math.isnan(accuracy):
        return math.nan, math.nan
    if not 0 <= accuracy <= 1:
        raise ValueError(f"accuracy={accuracy}: expected a fraction in [0, 1]")
    z = _z(confidence)
    denominator = 1 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / denominator
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_intervals(metrics: Mapping[str, float], n: float, confidence: float = CONFIDENCE) -> dict[str, float]:
    """``<m>_ci_low`` / ``<m>_ci_high`` for every accuracy ``m`` in ``metrics`` (clean, PGD-20, CW, AA)
    measured on ``n`` images."""
    out = {}
    for metric in ACCURACY_METRICS:
        if metric in metrics:
            low, high = wilson_interval(float(metrics[metric]), n, confidence)
            out[metric + CI_LOW], out[metric + CI_HIGH] = low, high
    return out


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student t quantile: the half-width of a mean's interval in standard errors."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, dof))


def mean_interval(accuracies: Sequence[float], n: float, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) of the accuracies of several students (training seeds) scored on the same ``n`` images.

    Two independent errors make the mean miss the true expected accuracy: the seeds (Student's t
    interval of the mean over the seeds, half-width t * sd / sqrt(k)), and the test images, which
    all students share, so averaging over seeds does not shrink it (the Wilson interval at the
    mean). Independent errors add in variance, so each side's half-width is the root of the sum
    of the squares. One seed gives the Wilson interval alone.
    """
    values = [float(a) for a in accuracies if not math.isnan(float(a))]
    if not values:
        return math.nan, math.nan, math.nan
    mean = fmean(values)
    low, high = wilson_interval(min(max(mean, 0.0), 1.0), n, confidence)
    seeds = t_quantile(confidence, len(values) - 1) * stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0
    if math.isnan(low):  # no image count: the seeds' spread is all there is, if any
        if len(values) == 1:
            return mean, math.nan, math.nan
        low = high = mean
    return mean, max(0.0, mean - math.hypot(mean - low, seeds)), min(1.0, mean + math.hypot(high - mean, seeds))


#: Fewer test images than this cannot confirm a front: a 95% interval near 50% is +-10 points on 100 images.
MIN_CONFIRM_IMAGES = 100
#: New training seeds a confirmation needs before its interval counts the seeds' spread (a t interval).
MIN_NEW_SEEDS_FOR_T = 2


def confirmed_interval(
    accuracies: Sequence[float], n: float, new_seeds: int, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """(mean, low, high) of a confirmed trial: its students' accuracies (the sweep's student re-evaluated,
    then ``new_seeds`` retrains), all scored on the same ``n`` test images.

    The rule: the seeds' spread enters (`mean_interval`, a t interval over the students combined with
    the images' Wilson interval) only with at least `MIN_NEW_SEEDS_FOR_T` new seeds. With fewer, the
    spread of two values says almost nothing (t(0.975, 1) = 12.7: one new seed would widen the
    interval it was run to narrow), so the interval is the test images' evidence alone: the Wilson
    interval at the mean on the ``n`` images every student was scored on (not n times the students:
    they share those images). It then covers the images' noise, not the seeds'.
    """
    if new_seeds >= MIN_NEW_SEEDS_FOR_T:
        return mean_interval(accuracies, n, confidence)
    values = [float(a) for a in accuracies if not math.isnan(float(a))]
    if not values:
        return math.nan, math.nan, math.nan
    mean = fmean(values)
    return (mean, *wilson_interval(min(max(mean, 0.0), 1.0), n, confidence))
