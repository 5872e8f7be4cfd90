"""Pareto-optimal students of a sweep, read back from MLflow.

    python -m afm_ray.pareto --experiment NAME [--tracking-uri URI]
        [--objectives aa_acc:max clean_acc:max params:min ...] [--filter "params.method = 'rslad'"]
        [--sweep RUN_ID] [--plot FRONT.png] [--out TABLE.parquet|.csv] [--register MODEL_NAME]

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
import contextlib
import math
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import Experiment, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from afm_ray import names
from afm_ray.front import nondominated_layers
from afm_ray.names import Objective

if TYPE_CHECKING:  # torch is imported only to verify a registered student
    import torch

#: Robustness first: it orders the table and picks pareto-1 (names.DEFAULT_OBJECTIVES is the search's).
CLI_OBJECTIVES = ("aa_acc:max", "clean_acc:max")
#: Hyperparameters shown in the printed table when any trial has them.
KEY_HPARAMS = ("attack.eps", "attack.steps", "method.tau", "augment.policy")
_METHOD = "params.method.name"
_TRIAL_STATUS_REASON = {"failed": "failed", "early_stopped": "early-stopped", "running": "running"}


def parse_objectives(specs: Iterable[str | Objective]) -> tuple[Objective, ...]:
    """Parse ``NAME:max|min`` strings; at least one objective, no metric twice."""
    objectives = tuple(s if isinstance(s, Objective) else Objective.parse(s) for s in specs)
    if not objectives:
        raise ValueError("no objectives given: expected NAME:max|min, e.g. aa_acc:max clean_acc:max")
    twice = sorted(m for m, n in Counter(o.metric for o in objectives).items() if n > 1)
    if twice:
        raise ValueError(f"objective metric(s) given more than once: {', '.join(twice)}")
    return objectives


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    # A tag or param that no run has is no column at all in the search_runs layout.
    return frame[name] if name in frame.columns else pd.Series(None, index=frame.index, dtype=object)


def _objective_values(frame: pd.DataFrame, objectives: Sequence[Objective]) -> np.ndarray:
    return np.column_stack([_column(frame, f"metrics.{o.metric}").astype(float) for o in objectives])


def exclusion_reasons(trials: pd.DataFrame, objectives: Sequence[Objective]) -> pd.Series:
    """Per trial, why it may not enter the front (failed, early-stopped, running, missing ...), else None."""
    reasons = []
    statuses = zip(_column(trials, f"tags.{names.TRIAL_STATUS_TAG}"), trials["status"], strict=True)
    skipped = _column(trials, f"tags.{names.AA_SKIPPED_TAG}")
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
        raise ValueError("no trials to rank")
    logged = sorted(c.removeprefix("metrics.") for c in trials.columns if c.startswith("metrics."))
    for o in (o for o in objectives if o.metric not in logged):
        have = ", ".join(logged) or "none"
        if o.metric in names.OBJECTIVE_METRICS:
            raise ValueError(
                f"metric {o.metric!r} was logged by none of the {len(trials)} trial runs; metrics they have: {have}"
            )
        raise ValueError(f"unknown objective {o.metric!r}; metrics of the trial runs: {have}")
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
    return ranked


def _client(tracking_uri: str | None) -> MlflowClient:
    # Every MLflow call here goes through a client: the process-wide URIs belong to the caller.
    uri = tracking_uri or names.default_tracking_uri()
    path = uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if path and path != ":memory:" and not Path(path).exists():  # connecting would create an empty one
        raise FileNotFoundError(
            f"no MLflow database at {path} (tracking URI {uri}); pass --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def _all_pages(search: Any, *args: Any, **kwargs: Any) -> list:
    items, token = [], None
    while True:
        page = search(*args, page_token=token, **kwargs)
        items.extend(page)
        if not (token := page.token):
            return items


def search_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> pd.DataFrame:
    """Active runs matching ``filter_string``, one row each, in the columns of ``mlflow.search_runs``
    (not that function: it reads only the process-wide tracking URI, and switching that here would
    redirect whatever else the calling process logs meanwhile)."""
    runs = _all_pages(client.search_runs, [experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=1000)
    # {"run_id": ..., "metrics": {"aa_acc": 0.5}, ...} -> columns "run_id", "metrics.aa_acc", ...
    return pd.json_normalize([{**dict(r.info), **r.data.to_dictionary()} for r in runs], max_level=1)


def _get_experiment(client: MlflowClient, name: str) -> Experiment:
    exp = client.get_experiment_by_name(name)
    if exp is None and name.isdigit():
        with contextlib.suppress(MlflowException):  # else not an id either: reported below
            exp = client.get_experiment(name)
    if exp is None or exp.lifecycle_stage != "active":
        known = ", ".join(sorted(e.name for e in _all_pages(client.search_experiments))) or "none"
        state = "is deleted" if exp is not None else "not found"
        raise ValueError(f"experiment {name!r} {state} at {client.tracking_uri}; experiments there: {known}")
    return exp


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _resolve_sweep(client: MlflowClient, exp: Experiment, sweep: str) -> str:
    """Full run id of the sweep (parent) run named by id, id prefix or run name."""
    sweeps = search_runs(client, exp.experiment_id, f"tags.`{names.ROLE_TAG}` = 'sweep'")
    runs = list(zip(sweeps["run_id"], sweeps["run_name"], strict=True)) if len(sweeps) else []
    hits = [(run_id, name) for run_id, name in runs if run_id.startswith(sweep) or name == sweep]
    if len(hits) == 1:
        return hits[0][0]
    listed = ", ".join(f"{run_id} ({name})" for run_id, name in (hits or runs)) or "none"
    if hits:
        raise ValueError(f"sweep {sweep!r} is ambiguous in experiment {exp.name!r}: {listed}")
    raise ValueError(f"sweep {sweep!r} not found in experiment {exp.name!r}; sweep runs: {listed}")


_QUOTED = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
_BARE_METHOD = re.compile(rf"({_QUOTED})|\b(params|param|parameters|parameter)\.(?:method|`method`)(?![\w.`])")


def translate_filter(filter_string: str) -> str:
    """Read a bare ``params.method`` as ``params.`method.name``` (the key the sweep logs); quoted values stay."""
    return _BARE_METHOD.sub(lambda m: m.group(1) or f"{m.group(2)}.`method.name`", filter_string)


def trial_filter(filter_string: str | None = None, sweep_id: str | None = None) -> str:
    """The MLflow filter for trial runs, ANDed with a user filter (MLflow filters only AND)."""
    clauses = [f"tags.`{names.ROLE_TAG}` = 'trial'"]
    if sweep_id:
        clauses.append(f"tags.`{names.PARENT_TAG}` = {_quote(sweep_id)}")
    if filter_string and filter_string.strip():
        clauses.append(translate_filter(filter_string.strip()))
    return " and ".join(clauses)


def _one_line(err: BaseException) -> str:
    return " ".join(str(getattr(err, "message", None) or err).split())


def _explain_no_trials(client: MlflowClient, exp: Experiment, sweep_id: str | None, user_filter: str | None) -> str:
    scope = f"experiment {exp.name!r}" + (f", sweep {sweep_id}" if sweep_id else "")
    trials = search_runs(client, exp.experiment_id, trial_filter(None, sweep_id))
    if len(trials) and user_filter:
        keys = ", ".join(sorted(c.removeprefix("params.") for c in trials.columns if c.startswith("params.")))
        methods = ", ".join(sorted(set(_column(trials, _METHOD).fillna("?"))))
        return (
            f"no trial run in {scope} matches --filter {user_filter!r} (it has {len(trials)} trial runs; "
            f"method.name values: {methods}; param keys, written params.`key`: {keys})"
        )
    roles = Counter(_column(search_runs(client, exp.experiment_id), f"tags.{names.ROLE_TAG}").fillna("untagged"))
    held = ", ".join(f"{n} {role}" for role, n in sorted(roles.items())) or "no runs at all"
    return f"{scope} has no trial runs (runs tagged {names.ROLE_TAG}='trial'); it holds {held}"


def load_trials(
    experiment: str, *, tracking_uri: str | None = None, filter_string: str | None = None, sweep: str | None = None
) -> pd.DataFrame:
    """Trial runs of ``experiment`` (name or id) as `search_runs` gives them, of one ``sweep`` (run id, prefix
    or name) and filtered if asked; an unknown experiment or no trial run is a ValueError naming what exists."""
    client = _client(tracking_uri)
    exp = _get_experiment(client, experiment)
    sweep_id = _resolve_sweep(client, exp, sweep) if sweep else None
    try:
        trials = search_runs(client, exp.experiment_id, trial_filter(filter_string, sweep_id))
    except MlflowException as err:
        raise ValueError(f"invalid --filter {filter_string!r}: {_one_line(err)}") from None
    if trials.empty:
        raise ValueError(_explain_no_trials(client, exp, sweep_id, filter_string))
    return trials


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
        "method": _column(rows, _METHOD).fillna("-").replace("", "-"),
    }
    cells |= {k: rows[f"params.{k}"].map(_fmt_param) for k in KEY_HPARAMS if f"params.{k}" in ranked.columns}
    for o in parse_objectives(objectives):
        header = f"{o.metric} %" if _unit(o.metric)[1] == "%" else o.metric
        cells[header] = rows[f"metrics.{o.metric}"].map(lambda v, m=o.metric: _fmt_metric(m, v))
    if rows["excluded"].notna().any():
        cells["excluded"] = rows["excluded"].fillna("")
    padded = {}  # every cell at its column's width, dashes under the header: to_string only lays them out
    for header, column in cells.items():
        column = column.astype(str).tolist()
        width = max([len(header), *map(len, column)])
        pad = str.ljust if header in ("run", "method", "excluded") else str.rjust  # text left, numbers right
        padded[pad(header, width)] = ["-" * width, *(pad(c, width) for c in column)]
    table = pd.DataFrame(padded)
    text = table.to_string(index=False, col_space={c: len(c) + 1 for c in list(table.columns)[1:]})  # 2 spaces apart
    return "\n".join(line.rstrip() for line in text.splitlines())


def headline(ranked: pd.DataFrame) -> str:
    """'3 Pareto-optimal of 9 eligible trials (4 excluded)'."""
    n_eligible = int(ranked["excluded"].isna().sum())
    n_front, n_excluded = int(ranked["pareto"].sum()), len(ranked) - n_eligible
    return f"{n_front} Pareto-optimal of {n_eligible} eligible trials ({n_excluded} excluded)"


def summary(ranked: pd.DataFrame, objectives: Sequence[Objective | str]) -> str:
    """One line: how many trials are on the front, eligible, and excluded (by reason)."""
    n_eligible = int(ranked["excluded"].isna().sum())
    text = (
        f"{int(ranked['pareto'].sum())} Pareto-optimal of {n_eligible} eligible trials "
        f"({', '.join(map(str, parse_objectives(objectives)))}); {len(ranked) - n_eligible} excluded"
    )
    reasons = Counter(ranked["excluded"].dropna()).most_common()
    return text + (": " + ", ".join(f"{n} {reason}" for reason, n in reasons) if reasons else "")


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
    out = pd.DataFrame({name: _column(ranked, column) for name, column in source.items()})
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
        raise ValueError(f"--out {str(path)!r}: expected a .parquet or .csv file name")


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
    dominated = ~excluded & ~front & shown
    if excluded.any():
        kinds = ", ".join(sorted(set(ranked["excluded"].dropna())))
        ax.scatter(xs[excluded], ys[excluded], marker="x", s=30, c="0.5", alpha=0.6, lw=1, label=f"excluded ({kinds})")
    if dominated.any():
        label = f"dominated ({dominated.sum()})"
        ax.scatter(xs[dominated], ys[dominated], s=34, c="tab:blue", alpha=0.35, lw=0, label=label)
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
    """Every trial, the front highlighted and numbered by rank: one panel with the front's staircase for two
    objectives, else one per pair (where a front point may look dominated: it wins on another objective)."""
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


def _student_source(client: MlflowClient, run_id: str, model_name: str) -> tuple[str, str | None]:
    # (where the files are, logged model id). MLflow 3 logs a logged model; older runs keep an
    # MLmodel under the run's artifacts. Not models:/<id>: MLflow's SQL registry resolves such a
    # source through a client on the process-wide tracking URI, which need not be ours.
    run = client.get_run(run_id)
    exp_id, by_run = run.info.experiment_id, f"source_run_id = {_quote(run_id)}"
    found = client.search_logged_models([exp_id], filter_string=f"{by_run} AND name = {_quote(model_name)}")
    if found:
        latest = max(found, key=lambda lm: lm.creation_timestamp or 0)
        return latest.artifact_location, latest.model_id
    if any(f.path == f"{model_name}/MLmodel" for f in client.list_artifacts(run_id, model_name)):
        return f"{run.info.artifact_uri.rstrip('/')}/{model_name}", None
    logged = ", ".join(sorted({lm.name for lm in client.search_logged_models([exp_id], filter_string=by_run)}))
    why = run.data.tags.get(names.MODEL_ERROR_TAG)  # the sweep keeps a trial whose student failed to log
    raise ValueError(
        f"run {run_id} has no logged model named {model_name!r} (its logged models: {logged or 'none'}"
        + (f"; {names.MODEL_ERROR_TAG}: {why}" if why else "")
        + f"); the sweep logs it with mlflow.pytorch.log_model(student, name={model_name!r})"
    )


def register_front(
    ranked: pd.DataFrame, objectives: Sequence[Objective | str], name: str, *, tracking_uri: str | None = None
) -> list[ModelVersion]:
    """Register each Pareto-optimal student as a version of model ``name``, aliased ``pareto-<rank>``
    and tagged with its objective values, run, rank and the objectives. A run registered before keeps
    its version, and ``pareto-*`` aliases past this front go: ``models:/NAME@pareto-1`` is its rank 1."""
    objectives = parse_objectives(objectives)
    front = ranked[ranked["pareto"]].sort_values("rank")
    if front.empty:
        raise ValueError("no Pareto-optimal trial to register (every trial is excluded)")
    client = _client(tracking_uri)
    sources = [_student_source(client, run_id, names.STUDENT_MODEL) for run_id in front["run_id"]]  # all before writing
    if not client.search_registered_models(filter_string=f"name = {_quote(name)}"):
        client.create_registered_model(name, description="Pareto-optimal students registered by afm_ray.pareto")
    versions = []
    for (_, row), (source, model_id) in zip(front.iterrows(), sources, strict=True):
        run_id, rank = row["run_id"], int(row["rank"])
        tags = {o.metric: repr(float(row[f"metrics.{o.metric}"])) for o in objectives}
        tags |= {"afm_ray.pareto_rank": str(rank), "afm_ray.objectives": ",".join(map(str, objectives))}
        tags |= {"afm_ray.run_id": run_id, "method.name": "" if pd.isna(row.get(_METHOD)) else row[_METHOD]}
        existing = client.search_model_versions(f"name = {_quote(name)} and run_id = {_quote(run_id)}")
        if existing:
            mv = max(existing, key=lambda v: int(v.version))
            for key, value in tags.items():  # the rank may have moved since
                client.set_model_version_tag(name, mv.version, key, value)
        else:
            mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags, model_id=model_id)
        client.set_registered_model_alias(name, f"{names.PARETO_ALIAS_PREFIX}{rank}", mv.version)
        versions.append(mv)
    # What the previous front left behind: aliases past this front's size, rank tags off the front.
    for alias in client.get_registered_model(name).aliases:
        suffix = alias.removeprefix(names.PARETO_ALIAS_PREFIX)
        if alias.startswith(names.PARETO_ALIAS_PREFIX) and suffix.isdigit() and int(suffix) > len(front):
            client.delete_registered_model_alias(name, alias)
    on_front = {mv.version for mv in versions}
    for mv in _all_pages(client.search_model_versions, f"name = {_quote(name)}"):
        if mv.version not in on_front and "afm_ray.pareto_rank" in mv.tags:
            client.delete_model_version_tag(name, mv.version, "afm_ray.pareto_rank")
    return versions


def verify_registered(
    name: str,
    alias: str = f"{names.PARETO_ALIAS_PREFIX}1",
    *,
    tracking_uri: str | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """(logged clean_acc, re-measured clean accuracy) of ``models:/name@alias`` on ``data`` = (x in [0,1], y),
    by default the test split that its run's params describe."""
    import torch
    from mlflow.pytorch import load_model

    client = _client(tracking_uri)
    version = client.get_model_version_by_alias(name, alias)
    run = client.get_run(version.run_id)
    # Download through our client and load the copy: loading models:/... itself would resolve it
    # through the process-wide URIs, which belong to the caller.
    with tempfile.TemporaryDirectory(prefix="afm_ray_pareto_") as tmp:
        location = client.get_model_version_download_uri(name, version.version)
        model = load_model(download_artifacts(location, dst_path=tmp, tracking_uri=client.tracking_uri))
    if data is None:  # the run's params are its whole resolved config
        from afm_ray.config import from_flat
        from afm_ray.data import load_dataset

        d = from_flat(run.data.params, ignore_unknown=True).data
        ds = load_dataset(
            d.name, d.root or None, test_fraction=d.test_fraction, seed=d.seed, image_size=d.image_size or None
        )
        data = (ds.x_test.float() / 255, ds.y_test)
    x, y = data
    with contextlib.suppress(NotImplementedError):  # MLflow's 'pt2' format: a traced graph, its mode fixed
        model.eval()
    with torch.no_grad():
        batches = ((x[i : i + 512], y[i : i + 512]) for i in range(0, len(x), 512))
        correct = sum(int((model(xb).argmax(dim=1).cpu() == yb.cpu()).sum()) for xb, yb in batches)
    return run.data.metrics.get("clean_acc", math.nan), correct / len(x)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m afm_ray.pareto``; `run` carries it out."""
    p = argparse.ArgumentParser(
        prog="python -m afm_ray.pareto", description="Pareto-optimal students of an afm-ray sweep, read from MLflow."
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment name (or id)")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    default, final = " ".join(CLI_OBJECTIVES), ", ".join(names.OBJECTIVE_METRICS)
    helps = f"metrics to optimise (default: {default}); final metrics: {final}"
    p.add_argument("--objectives", nargs="+", default=list(CLI_OBJECTIVES), metavar="NAME:max|min", help=helps)
    helps = "MLflow search filter ANDed with the trial selection, e.g. \"params.`method.name` = 'advfunmatch'\""
    p.add_argument("--filter", dest="filter_string", metavar="FILTER", help=helps + " (params.method works too)")
    p.add_argument("--sweep", metavar="RUN_ID", help="only trials of this sweep (parent run id, id prefix or run name)")
    p.add_argument("--plot", metavar="FILE.png", help="write a plot of all trials with the front highlighted")
    p.add_argument("--out", metavar="FILE.parquet|.csv", help="write the whole table with a pareto column")
    aliases = "register each Pareto-optimal student with aliases pareto-1, pareto-2, ..."
    p.add_argument("--register", metavar="MODEL_NAME", help=aliases)
    p.add_argument("--front-only", action="store_true", help="print only the Pareto front")
    return p


def run(args: argparse.Namespace) -> int:
    """Carry out parsed ``args``: 0 with a front, 1 when no trial is eligible, 2 on an error (one line)."""
    try:
        objectives = parse_objectives(args.objectives)
        if args.out:
            _check_out_suffix(Path(args.out))
        uri = args.tracking_uri or names.default_tracking_uri()
        trials = load_trials(args.experiment, tracking_uri=uri, filter_string=args.filter_string, sweep=args.sweep)
        ranked = rank_trials(trials, objectives)
        print(format_table(ranked, objectives, front_only=args.front_only))
        print(summary(ranked, objectives))
        if args.out:
            print(f"table: {write_table(ranked, objectives, args.out)}")
        if args.plot:
            print(f"plot: {plot_front(ranked, objectives, args.plot, title=f'{args.experiment}: {headline(ranked)}')}")
        if args.register:
            for rank, mv in enumerate(register_front(ranked, objectives, args.register, tracking_uri=uri), start=1):
                alias = f"{args.register}@{names.PARETO_ALIAS_PREFIX}{rank}"
                print(f"registered models:/{alias} -> version {mv.version} (run {mv.run_id})")
    except (ValueError, FileNotFoundError, MlflowException) as err:
        print(f"afm_ray.pareto: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if not ranked["pareto"].any():
        print("afm_ray.pareto: no trial is eligible for the front (reasons in the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m afm_ray.pareto; as __main__ this is not the library module, so no cycle
    from afm_ray.cli import pareto_main

    sys.exit(pareto_main())
