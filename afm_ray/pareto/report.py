"""How a ranked front is shown: the printed table, the one-line summaries, the table file, the plot.

Every accuracy is shown with its 95% interval (`afm_ray.pareto.ranking.objective_bounds`); the plot
draws them as error bars and highlights the front, numbered by rank.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from afm_ray import names
from afm_ray.display import method_uses, value_text
from afm_ray.errors import ConfigError
from afm_ray.names import CI_HIGH, CI_LOW, Objective
from afm_ray.pareto.ranking import objective_bounds, objective_values
from afm_ray.tracking.mlflow_runs import METHOD_COLUMN, column, tag_column, trial_names

#: Hyperparameters shown in the printed table when any trial has them.
KEY_HPARAMS = ("attack.eps", "attack.steps", "method.tau", "augment.policy")


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


def _param_cells(rows: pd.DataFrame, key: str) -> pd.Series:
    """A hyperparameter's column for people (afm_ray.display): 4 digits, budgets as x/255 where that is the
    unit, '-' where the trial's method does not use the key (no tau for PGD-AT) or it is unset."""
    methods = column(rows, METHOD_COLUMN).fillna("")
    data, norm = column(rows, "params.data.name").fillna(""), column(rows, "params.attack.norm").fillna("linf")
    cells = []
    for value, method, data_name, norm_name in zip(rows[f"params.{key}"], methods, data, norm, strict=True):
        if pd.isna(value) or value in ("", "None") or not method_uses(str(method), key):
            cells.append("-")
        else:
            cells.append(value_text(key, value, str(data_name), str(norm_name)))
    return pd.Series(cells, index=rows.index, dtype=object)


def format_table(ranked: pd.DataFrame, objectives: Sequence[Objective | str], *, front_only: bool = False) -> str:
    """Fixed-width text table: rank, front, trial (the name the sweep printed), method, key hyperparameters,
    objectives, note."""
    rows = ranked[ranked["pareto"]] if front_only else ranked
    cells = {
        "rank": rows["rank"].astype("string").fillna(""),
        "front": rows["front"].astype("string").fillna(""),
        "trial": trial_names(rows),
        "method": column(rows, METHOD_COLUMN).fillna("-").replace("", "-"),
    }
    cells |= {k: _param_cells(rows, k) for k in KEY_HPARAMS if f"params.{k}" in ranked.columns}
    objectives = Objective.parse_all(objectives)
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
        pad = str.ljust if header in ("trial", "method", "noise", "excluded") else str.rjust  # text left, numbers right
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
        f"({', '.join(map(str, Objective.parse_all(objectives)))}); {len(ranked) - n_eligible} excluded"
    )
    reasons = Counter(ranked["excluded"].dropna()).most_common()
    text += ": " + ", ".join(f"{n} {reason}" for reason, n in reasons) if reasons else ""
    noise = int(ranked["within_noise"].sum())
    tied = ranked[ranked["ties"].notna()]
    if noise or len(tied):
        text += (
            f"\nnoise: {noise} dominated trial(s) 'within noise' (no front member dominates them beyond both 95% "
            "intervals)"
        )
        if len(tied):  # the legend's example is the table's own first tie
            rank, others = int(tied["rank"].iloc[0]), str(tied["ties"].iloc[0]).split(",")
            ranks = " and ".join([", ".join(others[:-1]), others[-1]] if len(others) > 1 else others)
            text += (
                f"; '~{','.join(others)}' at rank {rank}: it cannot be told apart from rank{'s' * (len(others) > 1)} "
                f"{ranks} (their intervals overlap on every objective)"
            )
    return text


def output_frame(ranked: pd.DataFrame, objectives: Sequence[Objective | str]) -> pd.DataFrame:
    """The table for files: place and reason, ids, objectives, other final metrics, params (strings) by key."""
    metrics = [o.metric for o in Objective.parse_all(objectives)]
    metrics += [m for m in names.FINAL_METRICS if m not in metrics and f"metrics.{m}" in ranked.columns]
    source = {c: c for c in ("rank", "front", "pareto", "excluded", "run_id", "run_name")}  # output <- frame
    source |= {"sweep_id": tag_column(names.PARENT_TAG), "trial_id": tag_column(names.TRIAL_ID_TAG), "status": "status"}
    source |= {"trial_status": tag_column(names.TRIAL_STATUS_TAG), "method": METHOD_COLUMN}
    source |= {m: f"metrics.{m}" for m in metrics}
    params = sorted(c for c in ranked.columns if c.startswith("params."))
    source |= {c.removeprefix("params."): c for c in params if c.removeprefix("params.") not in source}
    out = pd.DataFrame({name: column(ranked, src) for name, src in source.items()})
    low, high = objective_bounds(ranked, Objective.parse_all(objectives))
    for j, o in enumerate(Objective.parse_all(objectives)):  # each objective's interval, logged or computed
        if o.metric in names.ACCURACY_METRICS:
            out[o.metric + CI_LOW], out[o.metric + CI_HIGH] = low[:, j], high[:, j]
    out["within_noise"], out["ties"] = ranked["within_noise"], ranked["ties"]
    out["method"] = out["method"].replace("", None)
    return out.astype({c: "string" for c in out.columns if out[c].dtype == object or c == "method"})


def write_table(ranked: pd.DataFrame, objectives: Sequence[Objective | str], path: str | Path) -> Path:
    """Write `output_frame` to ``.parquet`` (the objectives in its schema metadata) or ``.csv``."""
    path, objectives = Path(path), Objective.parse_all(objectives)
    check_out_suffix(path)
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


def check_out_suffix(path: Path) -> None:
    if path.suffix.lower() not in (".parquet", ".pq", ".csv"):
        raise ConfigError(f"--out {str(path)!r}: expected a .parquet or .csv file name")


def _panel(ax: Any, ranked: pd.DataFrame, objectives: Sequence[Objective], i: int, j: int | None) -> None:
    values = objective_values(ranked, objectives)
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

    objectives = Objective.parse_all(objectives)
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
