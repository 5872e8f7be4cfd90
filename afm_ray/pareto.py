"""Pareto-optimal students of a sweep, read back from MLflow.

    python -m afm_ray.pareto --experiment NAME [--tracking-uri URI]
        [--objectives aa_acc:max clean_acc:max params:min ...] [--filter "params.method = 'rslad'"]
        [--sweep RUN_ID] [--plot FRONT.png] [--out TABLE.parquet|.csv] [--register MODEL_NAME]
        [--confirm [--samples N] [--seeds K]]

The sweep logs a parent run per sweep (tag ``afm_ray.role = sweep``) and under it a child run per
trial (``afm_ray.role = trial``, ``afm_ray.trial_status``) with the final metrics, the config as
params and the student as a logged model named ``student``. Only runs that FINISHED with trial
status ``completed`` and every objective logged compete: ASHA stops trials with truncated metrics
that Optuna then records as complete, and a truncated trial on the front would be a lie. The
others stay in the table and the plot, marked excluded with the reason. The runs travel as one
DataFrame in the columns of ``mlflow.search_runs``; the domination math is `afm_ray.front`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from afm_ray import names
from afm_ray.errors import ConfigError, TrackingError, one_line
from afm_ray.front import dominated_beyond_noise, nondominated_layers
from afm_ray.names import CI_HIGH, CI_LOW, Objective
from afm_ray.registry import register_front, verify_registered
from afm_ray.runs import (
    client_for,
    column,
    load_trials,
    search_runs,
    sweep_objectives,
    translate_filter,
    trial_filter,
)
from afm_ray.stats import wilson_interval
from afm_ray.storage import check_writable_file

__all__ = [  # reading runs and the registry live in afm_ray.runs / afm_ray.registry; here for one import
    "build_parser",
    "format_table",
    "load_trials",
    "objective_bounds",
    "parse_objectives",
    "plot_front",
    "rank_trials",
    "register_front",
    "run",
    "search_runs",
    "translate_filter",
    "trial_filter",
    "verify_registered",
    "write_table",
]

#: Robustness first: it orders the table and picks pareto-1 (names.DEFAULT_OBJECTIVES is the search's).
CLI_OBJECTIVES = ("aa_acc:max", "clean_acc:max")
#: Hyperparameters shown in the printed table when any trial has them.
KEY_HPARAMS = ("attack.eps", "attack.steps", "method.tau", "augment.policy")
_METHOD = "params.method.name"
_TRIAL_STATUS_REASON = {"failed": "failed", "early_stopped": "early-stopped", "running": "running"}


def parse_objectives(specs: Iterable[str | Objective]) -> tuple[Objective, ...]:
    """Parse ``NAME:max|min`` strings; at least one objective, no metric twice."""
    try:
        objectives = tuple(s if isinstance(s, Objective) else Objective.parse(s) for s in specs)
    except ValueError as err:  # names.py stays standard-library only, so its error is translated here
        raise ConfigError(f"--objectives: {err}") from None
    if not objectives:
        raise ConfigError("no objectives given: expected NAME:max|min, e.g. aa_acc:max clean_acc:max")
    twice = sorted(m for m, n in Counter(o.metric for o in objectives).items() if n > 1)
    if twice:
        raise ConfigError(f"objective metric(s) given more than once: {', '.join(twice)}")
    return objectives


def _objective_values(frame: pd.DataFrame, objectives: Sequence[Objective]) -> np.ndarray:
    return np.column_stack([column(frame, f"metrics.{o.metric}").astype(float) for o in objectives])


def objective_bounds(frame: pd.DataFrame, objectives: Sequence[Objective]) -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each (n, m): the 95% interval of each objective value. An accuracy's interval is its
    logged ``<metric>_ci_low/_ci_high``, else the Wilson interval from ``eval/n_samples``; other
    metrics (parameters, latency) and accuracies without an image count are exact (low = high)."""
    values = _objective_values(frame, objectives)
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
    statuses = zip(column(trials, f"tags.{names.TRIAL_STATUS_TAG}"), trials["status"], strict=True)
    skipped = column(trials, f"tags.{names.AA_SKIPPED_TAG}")
    for (trial_status, status), values, aa_skipped in zip(
        statuses, _objective_values(trials, objectives), skipped, strict=True
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
    objectives = parse_objectives(objectives)
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
    values, eligible = _objective_values(ranked, objectives), ranked["excluded"].isna().to_numpy()
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


_METRIC_NAMES = {
    "clean_acc": "clean accuracy",
    "pgd20_acc": "PGD-20 accuracy",
    "cw_acc": "CW accuracy",
    "aa_acc": "AutoAttack accuracy",
    "params": "student parameters",
    "latency_ms": "latency, batch 1",
}


def _unit(metric: str) -> tuple[float, str]:
    """(scale, unit) for display: accuracies in %, parameter counts in millions, ms as is."""
    base = metric.rsplit("/", 1)[-1]
    if base.endswith("_acc"):
        return 100.0, "%"
    if base == "params":
        return 1e-6, "millions"
    return (1.0, "ms") if base.endswith("_ms") else (1.0, "")


def axis_label(objective: Objective) -> str:
    """Axis label with unit and direction, e.g. 'AutoAttack accuracy (%, higher is better)'."""
    unit = _unit(objective.metric)[1]
    better = "higher" if objective.mode == "max" else "lower"
    return f"{_METRIC_NAMES.get(objective.metric, objective.metric)} ({unit + ', ' if unit else ''}{better} is better)"


def _fmt_metric(metric: str, value: float) -> str:
    scale, unit = _unit(metric)
    if pd.isna(value):
        return "-"
    if unit == "%":
        return f"{value * scale:.2f}"
    if unit == "millions":
        if abs(value) >= 1e6:
            return f"{value / 1e6:.2f}M"
        return f"{value / 1e3:.1f}k" if abs(value) >= 1e3 else f"{value:.0f}"
    if unit == "ms":
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.4g}"


def _fmt_param(value: Any) -> str:
    if pd.isna(value):
        return "-"
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.4g}"


def format_table(ranked: pd.DataFrame, objectives: Sequence[Objective | str], *, front_only: bool = False) -> str:
    """Fixed-width text table: rank, front, run, method, key hyperparameters, objectives, note."""
    rows = ranked[ranked["pareto"]] if front_only else ranked
    cells = {
        "rank": rows["rank"].astype("string").fillna(""),
        "front": rows["front"].astype("string").fillna(""),
        "run": rows["run_id"].str[:8],
        "method": column(rows, _METHOD).fillna("-").replace("", "-"),
    }
    cells |= {k: rows[f"params.{k}"].map(_fmt_param) for k in KEY_HPARAMS if f"params.{k}" in ranked.columns}
    objectives = parse_objectives(objectives)
    low, high = objective_bounds(rows, objectives)
    for j, o in enumerate(objectives):
        values = rows[f"metrics.{o.metric}"].map(lambda v, m=o.metric: _fmt_metric(m, v)).tolist()
        if _unit(o.metric)[1] == "%":  # an accuracy: with its 95% interval where it has one
            ends = zip(100 * low[:, j], 100 * high[:, j], strict=True)
            values = [
                v if v == "-" or lo == hi else f"{v} [{lo:.1f}, {hi:.1f}]"
                for v, (lo, hi) in zip(values, ends, strict=True)
            ]
        cells[f"{o.metric} % [95% CI]" if _unit(o.metric)[1] == "%" else o.metric] = pd.Series(values, dtype=object)
    noise = np.where(rows["within_noise"], "within noise", "")
    if noise.any() or rows["ties"].notna().any():
        ties = rows["ties"].map(_ties)
        cells["noise"] = pd.Series([t if isinstance(t, str) else n for t, n in zip(ties, noise, strict=True)])
    if rows["excluded"].notna().any():
        cells["excluded"] = rows["excluded"].fillna("")
    padded = {}  # every cell at its column's width, dashes under the header: to_string only lays them out
    for header, cell_column in cells.items():
        texts = cell_column.astype(str).tolist()
        width = max([len(header), *map(len, texts)])
        pad = str.ljust if header in ("run", "method", "noise", "excluded") else str.rjust  # text left, numbers right
        padded[pad(header, width)] = ["-" * width, *(pad(c, width) for c in texts)]
    table = pd.DataFrame(padded)
    text = table.to_string(index=False, col_space={c: len(c) + 1 for c in list(table.columns)[1:]})  # 2 spaces apart
    return "\n".join(line.rstrip() for line in text.splitlines())


def _ties(ties: Any) -> str | None:
    return f"~{ties}" if isinstance(ties, str) else None


def headline(ranked: pd.DataFrame) -> str:
    """'3 Pareto-optimal of 9 eligible trials (4 excluded)'."""
    n_eligible = int(ranked["excluded"].isna().sum())
    n_front, n_excluded = int(ranked["pareto"].sum()), len(ranked) - n_eligible
    return f"{n_front} Pareto-optimal of {n_eligible} eligible trials ({n_excluded} excluded)"


def summary(ranked: pd.DataFrame, objectives: Sequence[Objective | str]) -> str:
    """How many trials are on the front, eligible, and excluded (by reason); a second line on noise."""
    n_eligible = int(ranked["excluded"].isna().sum())
    text = (
        f"{int(ranked['pareto'].sum())} Pareto-optimal of {n_eligible} eligible trials "
        f"({', '.join(map(str, parse_objectives(objectives)))}); {len(ranked) - n_eligible} excluded"
    )
    reasons = Counter(ranked["excluded"].dropna()).most_common()
    text += ": " + ", ".join(f"{n} {reason}" for reason, n in reasons) if reasons else ""
    noise = int(ranked["within_noise"].sum())
    if noise or ranked["ties"].notna().any():
        text += (
            f"\nnoise: {noise} dominated trial(s) 'within noise' (no front member dominates them beyond both 95% "
            "intervals); '~2,3': a front member indistinguishable from ranks 2 and 3 (intervals overlap on every "
            "objective)"
        )
    return text


def output_frame(ranked: pd.DataFrame, objectives: Sequence[Objective | str]) -> pd.DataFrame:
    """The table for files: place and reason, ids, objectives, other final metrics, params (strings) by key."""
    metrics = [o.metric for o in parse_objectives(objectives)]
    metrics += [m for m in names.FINAL_METRICS if m not in metrics and f"metrics.{m}" in ranked.columns]
    source = {c: c for c in ("rank", "front", "pareto", "excluded", "run_id", "run_name")}  # output <- frame
    source |= {"sweep_id": f"tags.{names.PARENT_TAG}", "trial_id": f"tags.{names.TRIAL_ID_TAG}", "status": "status"}
    source |= {"trial_status": f"tags.{names.TRIAL_STATUS_TAG}", "method": _METHOD}
    source |= {m: f"metrics.{m}" for m in metrics}
    params = sorted(c for c in ranked.columns if c.startswith("params."))
    source |= {c.removeprefix("params."): c for c in params if c.removeprefix("params.") not in source}
    out = pd.DataFrame({name: column(ranked, src) for name, src in source.items()})
    low, high = objective_bounds(ranked, parse_objectives(objectives))
    for j, o in enumerate(parse_objectives(objectives)):  # each objective's interval, logged or computed
        if o.metric in names.ACCURACY_METRICS:
            out[o.metric + CI_LOW], out[o.metric + CI_HIGH] = low[:, j], high[:, j]
    out["within_noise"], out["ties"] = ranked["within_noise"], ranked["ties"]
    out["method"] = out["method"].replace("", None)
    return out.astype({c: "string" for c in out.columns if out[c].dtype == object or c == "method"})


def write_table(ranked: pd.DataFrame, objectives: Sequence[Objective | str], path: str | Path) -> Path:
    """Write `output_frame` to ``.parquet`` (the objectives in its schema metadata) or ``.csv``."""
    path, objectives = Path(path), parse_objectives(objectives)
    _check_out_suffix(path)
    frame = output_frame(ranked, objectives)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        frame.to_csv(path, index=False)
        return path
    import pyarrow as pa  # directly: DataFrame.to_parquet stores only df.attrs, as one JSON blob
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = {**(table.schema.metadata or {}), b"afm_ray.objectives": ",".join(map(str, objectives)).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def _check_out_suffix(path: Path) -> None:
    if path.suffix.lower() not in (".parquet", ".pq", ".csv"):
        raise ConfigError(f"--out {str(path)!r}: expected a .parquet or .csv file name")


def _panel(ax: Any, ranked: pd.DataFrame, objectives: Sequence[Objective], i: int, j: int | None) -> None:
    values = _objective_values(ranked, objectives)
    xo, yo = objectives[i], (objectives[j] if j is not None else None)
    xs = values[:, i] * _unit(xo.metric)[0]
    if yo is None:  # one objective: value against start order
        xs, ys = np.argsort(np.argsort(ranked["start_time"].fillna(0).to_numpy(), kind="stable")) + 1.0, xs
    else:
        ys = values[:, j] * _unit(yo.metric)[0]
    shown = ~(np.isnan(xs) | np.isnan(ys))
    excluded = ranked["excluded"].notna().to_numpy() & shown
    front = ranked["pareto"].to_numpy() & shown
    noisy = ranked["within_noise"].to_numpy() & shown
    dominated = ~excluded & ~front & ~noisy & shown
    low, high = objective_bounds(ranked, objectives)
    x_err = np.abs(np.stack([xs - low[:, i] * _unit(xo.metric)[0], high[:, i] * _unit(xo.metric)[0] - xs]))
    y_err = np.zeros_like(x_err) if yo is None else None
    if yo is None:
        x_err, y_err = y_err, x_err
    else:
        y_err = np.abs(np.stack([ys - low[:, j] * _unit(yo.metric)[0], high[:, j] * _unit(yo.metric)[0] - ys]))
    label: str | None = "95% intervals"  # one legend entry for all bars
    for mask, colour in ((front, "tab:red"), (noisy, "tab:orange"), (dominated, "tab:blue")):
        if mask.any() and np.nan_to_num(x_err[:, mask] + y_err[:, mask]).any():
            ax.errorbar(
                xs[mask],
                ys[mask],
                xerr=x_err[:, mask],
                yerr=y_err[:, mask],
                fmt="none",
                ecolor=colour,
                elinewidth=0.8,
                alpha=0.35,
                zorder=1,
                label=label,
            )
            label = None
    if excluded.any():
        kinds = ", ".join(sorted(set(ranked["excluded"].dropna())))
        ax.scatter(xs[excluded], ys[excluded], marker="x", s=30, c="0.5", alpha=0.6, lw=1, label=f"excluded ({kinds})")
    if dominated.any():
        label = f"dominated beyond noise ({dominated.sum()})"
        ax.scatter(xs[dominated], ys[dominated], s=34, c="tab:blue", alpha=0.35, lw=0, label=label)
    if noisy.any():
        label = f"dominated only within noise ({noisy.sum()})"
        ax.scatter(xs[noisy], ys[noisy], s=40, c="tab:orange", alpha=0.8, edgecolors="black", lw=0.4, label=label)
    if front.any():
        if yo is not None and len(objectives) == 2:
            # What the front dominates ends at a staircase: from each point to the next (sorted on x)
            # through the corner worse on both axes, which comes first iff x is maximised.
            order = np.lexsort((ys[front], xs[front]))
            where = "pre" if xo.mode == "max" else "post"
            ax.step(xs[front][order], ys[front][order], where=where, c="tab:red", lw=1.2, alpha=0.7, zorder=2)
        label = f"Pareto front ({front.sum()}), numbered by rank"
        ax.scatter(xs[front], ys[front], s=70, c="tab:red", edgecolors="black", lw=0.8, zorder=3, label=label)
        at: dict[tuple[float, float], list[str]] = {}
        for k in np.flatnonzero(front):  # exact ties share one label, "2,3"
            at.setdefault((xs[k], ys[k]), []).append(str(ranked["rank"].iloc[k]))
        for (x, y), ranks in at.items():
            ax.annotate(",".join(ranks), (x, y), xytext=(6, 5), textcoords="offset points", fontsize=9, zorder=4)
    ax.set_xlabel("trial (start order)" if yo is None else axis_label(xo))
    ax.set_ylabel(axis_label(xo if yo is None else yo))
    ax.grid(alpha=0.3)
    ax.margins(0.08)  # room for the rank labels of points on the edge


def plot_front(
    ranked: pd.DataFrame, objectives: Sequence[Objective | str], path: str | Path, *, title: str | None = None
) -> Path:
    """Every trial with its 95% intervals as error bars, the front highlighted and numbered by rank, trials
    dominated only within noise apart: one panel with the front's staircase for two objectives, else one
    per pair (where a front point may look dominated: it wins on another objective)."""
    from matplotlib.figure import Figure  # not pyplot: the Agg canvas, no global backend to switch

    objectives = parse_objectives(objectives)
    pairs = [(0, None)] if len(objectives) == 1 else list(combinations(range(len(objectives)), 2))
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig = Figure(figsize=(5.6 * ncols, 4.6 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (i, j) in zip(axes, pairs, strict=False):
        _panel(ax, ranked, objectives, i, j)
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # one row under a grid of panels; stacked under a single panel, where a row would not fit
        ncol = len(handles) if len(pairs) > 1 else 1
        fig.legend(handles, labels, loc="outside lower center", frameon=False, ncols=ncol)
    fig.suptitle(title or headline(ranked))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command line of ``python -m afm_ray.pareto``; `run` carries it out."""
    p = parser_class(
        prog="python -m afm_ray.pareto", description="Pareto-optimal students of an afm-ray sweep, read from MLflow."
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment name (or id)")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    default, final = " ".join(CLI_OBJECTIVES), ", ".join(names.OBJECTIVE_METRICS)
    helps = f"metrics to optimise (default: the sweep's own, robustness first; else {default}); final metrics: {final}"
    p.add_argument("--objectives", nargs="+", default=None, metavar="NAME:max|min", help=helps)
    helps = "MLflow search filter ANDed with the trial selection, e.g. \"params.`method.name` = 'advfunmatch'\""
    p.add_argument("--filter", dest="filter_string", metavar="FILTER", help=helps + " (params.method works too)")
    p.add_argument("--sweep", metavar="RUN_ID", help="only trials of this sweep (parent run id, id prefix or run name)")
    p.add_argument("--plot", metavar="FILE.png", help="write a plot of all trials with the front highlighted")
    p.add_argument("--out", metavar="FILE.parquet|.csv", help="write the whole table with a pareto column")
    aliases = "register each Pareto-optimal student with aliases pareto-1, pareto-2, ... (with --confirm: confirmed)"
    p.add_argument("--register", metavar="MODEL_NAME", help=aliases)
    p.add_argument("--front-only", action="store_true", help="print only the Pareto front")
    helps = "re-evaluate the front and the trials within noise of it on more test images (and --seeds), on Ray"
    p.add_argument("--confirm", action="store_true", help=helps + "; the front is recomputed on the confirmed means")
    p.add_argument("--samples", type=int, default=0, help="--confirm: test images (default 0: the whole test split)")
    p.add_argument("--seeds", type=int, default=0, help="--confirm: retrain each candidate this many times, new seeds")
    helps = "--confirm: Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help=helps)
    return p


def choose_objectives(given: Sequence[str] | None, trials: pd.DataFrame, tracking_uri: str) -> tuple[Objective, ...]:
    """``given``, else the objectives the trials' sweep recorded, else `CLI_OBJECTIVES`. The sweep's are
    reordered robustness first (aa, cw, pgd20, clean, then the rest): the order ranks the front only."""
    if given:
        return parse_objectives(given)
    recorded = sweep_objectives(client_for(tracking_uri), trials)
    if not recorded:
        return parse_objectives(CLI_OBJECTIVES)
    first = ("aa_acc", "cw_acc", "pgd20_acc", "clean_acc")
    return parse_objectives(sorted(recorded, key=lambda o: first.index(o.metric) if o.metric in first else len(first)))


def run(args: argparse.Namespace) -> int:
    """Carry out parsed ``args``: 0 with a front, 1 when no trial is eligible, 130 when a confirmation
    is interrupted (Ctrl-C); errors are UserErrors (afm_ray.cli prints them in one line, exit 2)."""
    if args.objectives:
        parse_objectives(args.objectives)  # a bad objective fails before MLflow is read
    if args.out:  # output files are checked before MLflow is read
        _check_out_suffix(Path(args.out))
        check_writable_file(args.out, "--out")
    if args.plot:
        from matplotlib.figure import Figure

        if Path(args.plot).suffix.lower().lstrip(".") not in (formats := Figure().canvas.get_supported_filetypes()):
            raise ConfigError(f"--plot {args.plot!r}: expected a file name ending in one of .{', .'.join(formats)}")
        check_writable_file(args.plot, "--plot")
    if not args.confirm and (args.samples or args.seeds):
        raise ConfigError("--samples and --seeds belong to --confirm")
    uri = args.tracking_uri or names.default_tracking_uri()
    try:
        trials = load_trials(args.experiment, tracking_uri=uri, filter_string=args.filter_string, sweep=args.sweep)
        objectives = choose_objectives(args.objectives, trials, uri)
        if not args.objectives:
            print(f"objectives: {' '.join(map(str, objectives))}")
        ranked = rank_trials(trials, objectives)
        print(format_table(ranked, objectives, front_only=args.front_only))
        print(summary(ranked, objectives))
        if args.out and not args.confirm:
            print(f"table: {write_table(ranked, objectives, args.out)}")
        if args.plot and not args.confirm:
            print(f"plot: {plot_front(ranked, objectives, args.plot, title=f'{args.experiment}: {headline(ranked)}')}")
        tags = {}
        if args.confirm and ranked["pareto"].any():
            from afm_ray.confirm import confirm_candidates, format_comparison  # Ray and training: only here

            try:
                confirmed = confirm_candidates(
                    ranked, tracking_uri=uri, samples=args.samples, seeds=args.seeds, address=args.address
                )
            except KeyboardInterrupt:  # what finished is logged; the same command continues from there
                print("interrupted: run the same command again to continue the confirmation", file=sys.stderr)
                return 130
            ranked = rank_trials(confirmed, objectives)
            print(format_comparison(confirmed, objectives))
            print("\nconfirmed front:")
            print(format_table(ranked, objectives, front_only=args.front_only))
            print(summary(ranked, objectives))
            if args.out:
                print(f"table: {write_table(ranked, objectives, args.out)}")
            if args.plot:
                title = f"{args.experiment}, confirmed: {headline(ranked)}"
                print(f"plot: {plot_front(ranked, objectives, args.plot, title=title)}")
            tags = {"afm_ray.confirmed": f"samples={args.samples} seeds={args.seeds}"}
        if args.register:
            versions = register_front(ranked, objectives, args.register, tracking_uri=uri, extra_tags=tags)
            for rank, mv in enumerate(versions, start=1):
                alias = f"{args.register}@{names.PARETO_ALIAS_PREFIX}{rank}"
                print(f"registered models:/{alias} -> version {mv.version} (run {mv.run_id})")
    except MlflowException as err:  # the store refused or failed a request
        raise TrackingError(f"MLflow at {uri}: {one_line(err)}") from None
    if not ranked["pareto"].any():
        print("afm_ray.pareto: no trial is eligible for the front (reasons in the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m afm_ray.pareto; as __main__ this is not the library module, so no cycle
    from afm_ray.cli import pareto_main

    sys.exit(pareto_main())
