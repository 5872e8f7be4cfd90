"""Which trials of a sweep are Pareto-optimal, read back from MLflow (`afm_ray.tracking.mlflow_runs.load_trials`).

The sweep logs a parent run per sweep (tag ``afm_ray.role = sweep``) and under it a child run per
trial (``afm_ray.role = trial``, ``afm_ray.trial_status``) with the final metrics, the config as
params and the student as a logged model named ``student``. Only runs that FINISHED with trial
status ``completed`` and every objective logged compete: a scheduler stops trials with truncated
metrics, and a truncated trial on the front would be a lie. The others stay in the table and the
plot, marked excluded with the reason. The runs travel as one DataFrame in the columns of
``mlflow.search_runs``; the domination maths is `afm_ray.domination`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from afm_ray import names
from afm_ray.domination import dominated_beyond_noise, nondominated_layers
from afm_ray.errors import ConfigError, TrackingError
from afm_ray.names import CI_HIGH, CI_LOW, Objective
from afm_ray.stats import wilson_interval
from afm_ray.tracking.mlflow_runs import column, tag_column

_TRIAL_STATUS_REASON = {"failed": "failed", "early_stopped": "early-stopped", "running": "running"}


def objective_values(frame: pd.DataFrame, objectives: Sequence[Objective]) -> np.ndarray:
    return np.column_stack([column(frame, f"metrics.{o.metric}").astype(float) for o in objectives])


def objective_bounds(frame: pd.DataFrame, objectives: Sequence[Objective]) -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each (n, m): the 95% interval of each objective value. An accuracy's interval is its
    logged ``<metric>_ci_low/_ci_high``, else the Wilson interval from ``eval/n_samples``; other
    metrics (parameters, latency) and accuracies without an image count are exact (low = high)."""
    values = objective_values(frame, objectives)
    low, high = values.copy(), values.copy()
    n = column(frame, "metrics.eval/n_samples").astype(float).to_numpy()
    for j, o in enumerate(objectives):
        logged_low = column(frame, f"metrics.{o.metric}{CI_LOW}").astype(float).to_numpy()
        logged_high = column(frame, f"metrics.{o.metric}{CI_HIGH}").astype(float).to_numpy()
        for i in range(len(frame)):
            if not np.isnan(logged_low[i]) and not np.isnan(logged_high[i]):
                low[i, j], high[i, j] = logged_low[i], logged_high[i]
            elif o.metric in names.ACCURACY_METRICS and not np.isnan(values[i, j]) and n[i] >= 1:
                low[i, j], high[i, j] = wilson_interval(values[i, j], n[i])
    return low, high


def exclusion_reasons(trials: pd.DataFrame, objectives: Sequence[Objective]) -> pd.Series:
    """Per trial, why it may not enter the front (failed, early-stopped, running, missing ...), else None."""
    reasons = []
    statuses = zip(column(trials, tag_column(names.TRIAL_STATUS_TAG)), trials["status"], strict=True)
    skipped = column(trials, tag_column(names.AA_SKIPPED_TAG))
    for (trial_status, status), values, aa_skipped in zip(
        statuses, objective_values(trials, objectives), skipped, strict=True
    ):
        missing = ", ".join(o.metric for o, v in zip(objectives, values, strict=True) if np.isnan(v))
        if missing and not pd.isna(aa_skipped):  # staged evaluation: dominated already at PGD-20
            missing = f"{missing} (AutoAttack skipped, {aa_skipped})"
        if pd.isna(trial_status):
            reasons.append(f"no {names.TRIAL_STATUS_TAG} tag")
        elif trial_status != "completed":
            reasons.append(_TRIAL_STATUS_REASON.get(trial_status, f"trial status {trial_status!r}"))
        elif status != "FINISHED":
            reasons.append(f"run {status}")
        else:
            reasons.append(f"missing {missing}" if missing else None)
    return pd.Series(reasons, index=trials.index, dtype=object)


def rank_trials(trials: pd.DataFrame, objectives: Sequence[Objective | str]) -> pd.DataFrame:
    """``trials`` sorted for reading, with ``excluded`` (the reason, or None), ``front`` (non-dominated layer,
    1 = the Pareto front), ``rank`` (1, 2, ... along the front; both NA where none) and ``pareto``. Order: the
    front by rank (best on the first objective, then the next; ties by start time), layers 2, 3, ..., excluded."""
    objectives = Objective.parse_all(objectives)
    if trials.empty:
        raise TrackingError("no trials to rank")
    logged = sorted(c.removeprefix("metrics.") for c in trials.columns if c.startswith("metrics."))
    for o in (o for o in objectives if o.metric not in logged):
        have = ", ".join(logged) or "none"
        if o.metric in names.OBJECTIVE_METRICS:
            raise ConfigError(
                f"metric {o.metric!r} was logged by none of the {len(trials)} trial runs; metrics they have: {have}"
            )
        raise ConfigError(f"unknown objective {o.metric!r}; metrics of the trial runs: {have}")
    ranked = trials.reset_index(drop=True)
    ranked["excluded"] = exclusion_reasons(ranked, objectives)
    values, eligible = objective_values(ranked, objectives), ranked["excluded"].isna().to_numpy()
    layer = np.zeros(len(ranked), dtype=np.int64)  # 0 = excluded: sorts after the layers
    if eligible.any():
        layer[eligible] = nondominated_layers(values[eligible], [o.mode for o in objectives])
    key = pd.DataFrame({"excluded": ~eligible, "layer": layer, "reason": ranked["excluded"].fillna("")})
    for j, o in enumerate(objectives):  # best first: maximised objectives negated; NaN sorts last
        key[f"o{j}"] = -values[:, j] if o.mode == "max" else values[:, j]
    key["start"], key["run_id"] = ranked["start_time"].fillna(0), ranked["run_id"]
    order = key.sort_values(list(key.columns), kind="stable", na_position="last").index
    ranked, front = ranked.loc[order].reset_index(drop=True), pd.Series(layer[order], dtype="Int32")
    ranked["front"], ranked["pareto"] = front.where(front > 0), (front == 1).to_numpy()
    ranked["rank"] = ranked["pareto"].cumsum().astype("Int32").where(ranked["pareto"])
    _mark_noise(ranked, objectives)
    return ranked


def _mark_noise(ranked: pd.DataFrame, objectives: Sequence[Objective]) -> None:
    """``within_noise``: dominated, but by no front member once both intervals count; ``ties``: per front
    member, the ranks of the others it cannot be told from (intervals overlap on every objective)."""
    low, high = objective_bounds(ranked, objectives)
    eligible, front = ranked["excluded"].isna().to_numpy(), np.flatnonzero(ranked["pareto"].to_numpy())
    beyond = np.ones(len(ranked), dtype=bool)
    if eligible.any():
        beyond[eligible] = dominated_beyond_noise(
            low[eligible], high[eligible], [o.mode for o in objectives], np.flatnonzero(ranked["pareto"][eligible])
        )
    ranked["within_noise"] = eligible & ~ranked["pareto"].to_numpy() & ~beyond
    ties = [None] * len(ranked)
    for i in front:
        same = [k for k in front if k != i and ((low[i] <= high[k]) & (low[k] <= high[i])).all()]
        ties[i] = ",".join(str(ranked["rank"].iloc[k]) for k in same) or None
    ranked["ties"] = pd.Series(ties, index=ranked.index, dtype=object)
