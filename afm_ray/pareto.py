"""Pareto-optimal students of a sweep, read back from MLflow.

    python -m afm_ray.pareto --experiment NAME [--tracking-uri URI]
        [--objectives aa_acc:max clean_acc:max params:min ...] [--filter "params.method = 'rslad'"]
        [--sweep RUN_ID] [--plot FRONT.png] [--out TABLE.parquet|.csv] [--register MODEL_NAME]

Reads the child (trial) runs that the sweep logs (INTERFACES.md, "MLflow layout"), keeps the
runs that FINISHED with tag ``afm_ray.trial_status = completed`` and a value for every objective,
and reports the non-dominated set: a plain-text table, optionally a plot, the whole table as
Parquet/CSV with a ``pareto`` column, and each Pareto-optimal student registered in the MLflow
Model Registry under the aliases ``pareto-1``, ``pareto-2``, ...

Failed, running and early-stopped trials never enter the front: Tune's ASHA stops trials with
truncated metrics that Optuna then records as complete, and a truncated trial on the front
would be a lie. They stay in the table and the plot, marked excluded with the reason.

The core (objectives, domination, layers, the table) needs numpy, pyarrow and MLflow only;
torch is imported solely by `verify_registered`/`clean_accuracy`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # only for annotations; importing torch here would tie the core to it
    import torch
    from mlflow import MlflowClient
    from mlflow.entities import Experiment, Run
    from mlflow.entities.model_registry import ModelVersion

ROLE_TAG = "afm_ray.role"
TRIAL_STATUS_TAG = "afm_ray.trial_status"
TRIAL_ID_TAG = "afm_ray.trial_id"
PARENT_TAG = "mlflow.parentRunId"
STUDENT_MODEL = "student"
#: The one-value metrics every completed trial logs at its end (INTERFACES.md).
FINAL_METRICS = ("clean_acc", "pgd20_acc", "cw_acc", "aa_acc", "params", "latency_ms")
#: Hyperparameters shown in the printed table when any trial has them.
KEY_HPARAMS = ("attack.eps", "attack.steps", "method.tau", "augment.policy")
DEFAULT_OBJECTIVES = ("aa_acc:max", "clean_acc:max")
ALIAS_PREFIX = "pareto-"

Goal = Literal["max", "min"]


# --------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Objective:
    """One metric to optimise: ``metric`` (an MLflow metric key) and ``goal`` (max or min)."""

    metric: str
    goal: Goal

    @classmethod
    def parse(cls, spec: str) -> Objective:
        """``"aa_acc:max"`` -> Objective("aa_acc", "max")."""
        metric, sep, goal = spec.rpartition(":")
        if not sep or not metric or goal not in ("max", "min"):
            raise ValueError(
                f"bad objective {spec!r}: expected NAME:max or NAME:min "
                "(e.g. aa_acc:max clean_acc:max params:min)"
            )
        return cls(metric, goal)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.metric}:{self.goal}"


def parse_objectives(specs: Iterable[str | Objective]) -> tuple[Objective, ...]:
    """Parse ``NAME:max|min`` strings; at least one objective, no metric twice."""
    objectives = tuple(s if isinstance(s, Objective) else Objective.parse(s) for s in specs)
    if not objectives:
        raise ValueError(
            "no objectives given: expected NAME:max|min, e.g. aa_acc:max clean_acc:max"
        )
    seen = Counter(o.metric for o in objectives)
    twice = sorted(m for m, n in seen.items() if n > 1)
    if twice:
        raise ValueError(f"objective metric(s) given more than once: {', '.join(twice)}")
    return objectives


# --------------------------------------------------------------------------- domination


def _maximised(values: Any, goals: Sequence[str]) -> np.ndarray:
    """(n, m) float array with minimised columns negated, so larger is better everywhere."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be 2-D (trials, objectives), got shape {v.shape}")
    goals = tuple(goals)
    if len(goals) != v.shape[1]:
        raise ValueError(f"{len(goals)} goals for {v.shape[1]} objective columns")
    bad = [g for g in goals if g not in ("max", "min")]
    if bad:
        raise ValueError(f"bad goal(s) {bad}: each goal is 'max' or 'min'")
    if np.isnan(v).any():
        raise ValueError(
            "values contain NaN: leave those trials out (rank_trials marks them 'missing')"
        )
    return v * np.where(np.asarray(goals) == "max", 1.0, -1.0)


def dominance_matrix(values: Any, goals: Sequence[str]) -> np.ndarray:
    """Boolean (n, n) matrix D with D[i, j] True iff trial i dominates trial j.

    i dominates j iff i is no worse than j on every objective and strictly better on at least
    one, so identical objective vectors never dominate each other (ties share a front).
    Memory is n^2 bytes: 100 MB for 10,000 trials.
    """
    v = _maximised(values, goals)
    d = np.empty((len(v), len(v)), dtype=bool)
    for i, row in enumerate(v):  # one row at a time keeps memory at n^2 bools, not n^2*m
        d[i] = (row >= v).all(axis=1) & (row > v).any(axis=1)
    return d


def pareto_mask(values: Any, goals: Sequence[str]) -> np.ndarray:
    """True for the non-dominated rows of ``values`` (n trials x m objectives)."""
    return ~dominance_matrix(values, goals).any(axis=0)


def non_dominated(values: Sequence[Sequence[float]], goals: Sequence[str]) -> list[int]:
    """Indices of the Pareto-optimal rows of ``values``; a row with a NaN is never on it.

    For callers holding plain result rows (the sweep's end-of-run summary); `rank_trials` is
    the MLflow-side entry point.
    """
    if len(values) == 0:
        return []
    v = np.asarray(values, dtype=np.float64)
    _maximised(np.nan_to_num(v), goals)  # the shape and goal checks, NaN aside
    rows = np.flatnonzero(~np.isnan(v).any(axis=1))
    return rows[pareto_mask(v[rows], goals)].tolist()


def nondominated_layers(values: Any, goals: Sequence[str]) -> np.ndarray:
    """Front index per row: 1 for the Pareto front, 2 for the front once 1 is removed, ...

    The fast non-dominated sort of NSGA-II (Deb et al. 2002, Sec. III-A): a row joins layer
    k+1 when every row that dominates it lies in layers 1..k.
    """
    d = dominance_matrix(values, goals)
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


# --------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class Trial:
    """One trial run as logged by the sweep (only what the front and the table need)."""

    run_id: str
    run_name: str
    status: str  # MLflow run status: FINISHED, FAILED, KILLED, RUNNING, SCHEDULED
    trial_status: str | None  # tag afm_ray.trial_status: completed, early_stopped, failed, running
    trial_id: str | None
    sweep_id: str | None  # the parent (sweep) run id
    start_time: int  # ms since the epoch; orders ties
    params: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric

    @property
    def method(self) -> str:
        return self.params.get("method.name", "")

    @classmethod
    def from_run(cls, run: Run) -> Trial:
        tags = run.data.tags
        return cls(
            run_id=run.info.run_id,
            run_name=run.info.run_name or "",
            status=run.info.status,
            trial_status=tags.get(TRIAL_STATUS_TAG),
            trial_id=tags.get(TRIAL_ID_TAG),
            sweep_id=tags.get(PARENT_TAG),
            start_time=int(run.info.start_time or 0),
            params=dict(run.data.params),
            metrics={k: float(v) for k, v in run.data.metrics.items()},
        )


@dataclass(frozen=True)
class RankedTrial:
    """A trial with its place: ``front`` 1 is the Pareto front, ``rank`` numbers that front."""

    trial: Trial
    objectives: tuple[float, ...]  # NaN where the metric is missing
    excluded: str | None  # why the trial cannot enter the front; None if eligible
    front: int | None  # non-dominated layer (1 = Pareto front); None if excluded
    rank: int | None  # 1-based order on the Pareto front; None elsewhere

    @property
    def pareto(self) -> bool:
        return self.front == 1

    @property
    def run_id(self) -> str:
        return self.trial.run_id


_TRIAL_STATUS_REASON = {"failed": "failed", "early_stopped": "early-stopped", "running": "running"}


def exclusion_reason(trial: Trial, objectives: Sequence[Objective]) -> str | None:
    """Why ``trial`` may not enter the front, or None if it may."""
    if trial.trial_status != "completed":
        if trial.trial_status is None:
            return f"no {TRIAL_STATUS_TAG} tag"
        return _TRIAL_STATUS_REASON.get(trial.trial_status, f"trial status {trial.trial_status!r}")
    if trial.status != "FINISHED":
        return f"run {trial.status}"
    missing = [o.metric for o in objectives if math.isnan(trial.metrics.get(o.metric, math.nan))]
    if missing:
        return "missing " + ", ".join(missing)
    return None


def _check_objectives_logged(trials: Sequence[Trial], objectives: Sequence[Objective]) -> None:
    present = sorted(set().union(*(t.metrics for t in trials)))
    listed = ", ".join(present) or "none"
    for o in objectives:
        if o.metric in present:
            continue
        if o.metric in FINAL_METRICS:
            raise ValueError(
                f"metric {o.metric!r} was logged by none of the {len(trials)} trial runs; "
                f"metrics they have: {listed}"
            )
        raise ValueError(f"unknown objective {o.metric!r}; metrics of the trial runs: {listed}")


def _best_first_key(values: Sequence[float], objectives: Sequence[Objective]) -> tuple[float, ...]:
    # Sort key: best first on objective 1, then 2, ...; NaN (missing) last.
    return tuple(
        math.inf if math.isnan(v) else (-v if o.goal == "max" else v)
        for v, o in zip(values, objectives)
    )


def rank_trials(
    trials: Sequence[Trial], objectives: Sequence[Objective | str]
) -> list[RankedTrial]:
    """Pareto front, layers and ranks of ``trials``, sorted for reading.

    Only FINISHED runs tagged completed with a (non-NaN) value for every objective are ranked;
    the others come back with ``excluded`` saying why. Order: the front by rank (best on the
    first objective first, then the next; exact ties by start time), then layers 2, 3, ...,
    then the excluded trials grouped by reason.
    """
    objectives = parse_objectives(objectives)
    if not trials:
        raise ValueError("no trials to rank")
    _check_objectives_logged(trials, objectives)
    values = [tuple(t.metrics.get(o.metric, math.nan) for o in objectives) for t in trials]
    reasons = [exclusion_reason(t, objectives) for t in trials]
    eligible = [i for i, r in enumerate(reasons) if r is None]
    layers: dict[int, int] = {}
    if eligible:
        goals = [o.goal for o in objectives]
        layer = nondominated_layers([values[i] for i in eligible], goals)
        layers = {i: int(k) for i, k in zip(eligible, layer)}

    def key(i: int) -> tuple:
        return (
            reasons[i] is not None,
            layers.get(i, 0),
            reasons[i] or "",
            _best_first_key(values[i], objectives),
            trials[i].start_time,
            trials[i].run_id,
        )

    order = sorted(range(len(trials)), key=key)
    ranked, rank = [], 0
    for i in order:
        front = layers.get(i)
        if front == 1:
            rank += 1
        ranked.append(
            RankedTrial(trials[i], values[i], reasons[i], front, rank if front == 1 else None)
        )
    return ranked


# --------------------------------------------------------------------------- MLflow


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlflow.db`` (absolute)."""
    default = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        # Connecting creates an empty database: a typo would then read as "no experiment".
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).exists():
            raise FileNotFoundError(
                f"no MLflow database at {path} (tracking URI {uri}); pass --tracking-uri "
                "or set MLFLOW_TRACKING_URI"
            )
    # The registry lives with the runs unless MLflow's own variable says otherwise.
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


@contextmanager
def _global_tracking_uri(client: MlflowClient) -> Iterator[None]:
    # MLflow's registry store resolves logged models (models:/<id>) through a fresh
    # MlflowClient() on the *global* URI, and models:/ loading does too: point both at the
    # client's URIs for the duration. set_*_uri also write the MLFLOW_*_URI environment
    # variables, so put back exactly what the caller had (module globals of mlflow==3.17.2).
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (
        getattr(tracking_utils, "_tracking_uri", None),
        getattr(registry_utils, "_registry_uri", None),
    )
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client._registry_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _all_pages(search, *args: Any, **kwargs: Any) -> list:
    items, token = [], None
    while True:
        page = search(*args, page_token=token, **kwargs)
        items.extend(page)
        token = page.token
        if not token:
            return items


def _get_experiment(client: MlflowClient, name: str) -> Experiment:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None and name.isdigit():
        try:
            exp = client.get_experiment(name)
        except MlflowException:  # not an id either: report below
            exp = None
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in _all_pages(client.search_experiments))
        state = "is deleted" if exp is not None else "not found"
        raise ValueError(
            f"experiment {name!r} {state} at {client.tracking_uri}; "
            f"experiments there: {', '.join(names) or 'none'}"
        )
    return exp


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _resolve_sweep(client: MlflowClient, exp: Experiment, sweep: str) -> str:
    """Full run id of the sweep (parent) run named by id, id prefix or run name."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(sweep)
        if run.info.experiment_id == exp.experiment_id:
            return run.info.run_id
    except MlflowException:
        pass  # not a full run id: try prefixes and names of the sweep runs
    sweeps = _all_pages(
        client.search_runs, [exp.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'", max_results=1000
    )
    hits = [r for r in sweeps if r.info.run_id.startswith(sweep) or r.info.run_name == sweep]
    if len(hits) == 1:
        return hits[0].info.run_id
    listed = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in (hits or sweeps)) or "none"
    if hits:
        raise ValueError(f"sweep {sweep!r} is ambiguous in experiment {exp.name!r}: {listed}")
    raise ValueError(f"sweep {sweep!r} not found in experiment {exp.name!r}; sweep runs: {listed}")


_QUOTED = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
_BARE_METHOD = re.compile(
    rf"({_QUOTED})|\b(params|param|parameters|parameter)\.(?:method|`method`)(?![\w.`])"
)


def translate_filter(filter_string: str) -> str:
    """Rewrite a bare ``params.method`` (no such param) to ``params.`method.name```.

    The sweep logs the method as the config key ``method.name``; quoted values are left alone.
    """

    def sub(m: re.Match) -> str:
        return m.group(1) or f"{m.group(2)}.`method.name`"

    return _BARE_METHOD.sub(sub, filter_string)


def trial_filter(filter_string: str | None = None, sweep_id: str | None = None) -> str:
    """The MLflow filter for trial runs, ANDed with a user filter (MLflow filters only AND)."""
    clauses = [f"tags.`{ROLE_TAG}` = 'trial'"]
    if sweep_id:
        clauses.append(f"tags.`{PARENT_TAG}` = {_quote(sweep_id)}")
    if filter_string and filter_string.strip():
        clauses.append(translate_filter(filter_string.strip()))
    return " and ".join(clauses)


def _one_line(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err)
    return " ".join(str(text).split())


def _explain_no_trials(
    client: MlflowClient, exp: Experiment, sweep_id: str | None, user_filter: str | None
) -> str:
    scope = f"experiment {exp.name!r}" + (f", sweep {sweep_id}" if sweep_id else "")

    def search(filter_string: str) -> list[Run]:
        return _all_pages(client.search_runs, [exp.experiment_id], filter_string, max_results=1000)

    trials = search(trial_filter(None, sweep_id))
    if trials and user_filter:
        keys = sorted(set().union(*(r.data.params for r in trials)))
        methods = sorted({r.data.params.get("method.name", "?") for r in trials})
        return (
            f"no trial run in {scope} matches --filter {user_filter!r} (it has {len(trials)} "
            f"trial runs; method.name values: {', '.join(methods)}; param keys, written "
            f"params.`key`: {', '.join(keys)})"
        )
    runs = search("")
    roles = Counter(r.data.tags.get(ROLE_TAG, "untagged") for r in runs)
    held = ", ".join(f"{n} {role}" for role, n in sorted(roles.items())) or "no runs at all"
    return f"{scope} has no trial runs (runs tagged {ROLE_TAG}='trial'); it holds {held}"


def load_trials(
    experiment: str,
    *,
    tracking_uri: str | None = None,
    filter_string: str | None = None,
    sweep: str | None = None,
) -> list[Trial]:
    """Trial runs of ``experiment`` (name or id), optionally of one sweep and filtered.

    ``filter_string`` is an MLflow search filter ANDed with the trial selection; a bare
    ``params.method`` is read as ``params.`method.name```. An unknown experiment, an experiment
    without trial runs, or a filter that matches none is a ValueError naming what exists.
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    exp = _get_experiment(client, experiment)
    sweep_id = _resolve_sweep(client, exp, sweep) if sweep else None
    query = trial_filter(filter_string, sweep_id)
    try:
        runs = _all_pages(
            client.search_runs, [exp.experiment_id], query,
            run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
        )
    except MlflowException as err:
        raise ValueError(f"invalid --filter {filter_string!r}: {_one_line(err)}") from None
    if not runs:
        raise ValueError(_explain_no_trials(client, exp, sweep_id, filter_string))
    return [Trial.from_run(r) for r in runs]


# --------------------------------------------------------------------------- table


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
    if base.endswith("_ms"):
        return 1.0, "ms"
    return 1.0, ""


def axis_label(objective: Objective) -> str:
    """Axis label with unit and direction, e.g. 'AutoAttack accuracy (%, higher is better)'."""
    _, unit = _unit(objective.metric)
    name = _METRIC_NAMES.get(objective.metric, objective.metric)
    better = "higher" if objective.goal == "max" else "lower"
    return f"{name} ({unit + ', ' if unit else ''}{better} is better)"


def _fmt_metric(metric: str, value: float) -> str:
    if value is None or math.isnan(value):
        return "-"
    scale, unit = _unit(metric)
    if unit == "%":
        return f"{value * scale:.2f}"
    if unit == "millions":
        if abs(value) >= 1e6:
            return f"{value / 1e6:.2f}M"
        return f"{value / 1e3:.1f}k" if abs(value) >= 1e3 else f"{value:.0f}"
    if unit == "ms":
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.4g}"


def _fmt_param(value: str | None) -> str:
    if value is None:
        return "-"
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.4g}"


def _metric_header(metric: str) -> str:
    _, unit = _unit(metric)
    return f"{metric} %" if unit == "%" else metric


def format_table(
    ranked: Sequence[RankedTrial],
    objectives: Sequence[Objective | str],
    *,
    front_only: bool = False,
) -> str:
    """Fixed-width text table: rank, front, run, method, key hyperparameters, objectives, note."""
    objectives = parse_objectives(objectives)
    rows = [r for r in ranked if r.pareto] if front_only else list(ranked)
    hparams = [k for k in KEY_HPARAMS if any(k in r.trial.params for r in ranked)]
    columns: list[tuple[str, list[str], str]] = [
        ("rank", [str(r.rank) if r.rank else "" for r in rows], ">"),
        ("front", [str(r.front) if r.front else "" for r in rows], ">"),
        ("run", [r.run_id[:8] for r in rows], "<"),
        ("method", [r.trial.method or "-" for r in rows], "<"),
        *[(k, [_fmt_param(r.trial.params.get(k)) for r in rows], ">") for k in hparams],
        *[
            (_metric_header(o.metric), [_fmt_metric(o.metric, r.objectives[j]) for r in rows], ">")
            for j, o in enumerate(objectives)
        ],
        ("excluded", [r.excluded or "" for r in rows], "<"),
    ]
    if not any(r.excluded for r in rows):
        columns.pop()
    widths = [max([len(h), *(len(c) for c in cells)]) for h, cells, _ in columns]
    lines = ["  ".join(f"{h:{a}{w}}" for (h, _, a), w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for i in range(len(rows)):
        cells_i = (f"{cells[i]:{a}{w}}" for (_, cells, a), w in zip(columns, widths))
        lines.append("  ".join(cells_i).rstrip())
    return "\n".join(lines)


def headline(ranked: Sequence[RankedTrial]) -> str:
    """'3 Pareto-optimal of 9 eligible trials (4 excluded)'."""
    n_eligible = sum(r.excluded is None for r in ranked)
    return (
        f"{sum(r.pareto for r in ranked)} Pareto-optimal of {n_eligible} eligible trials "
        f"({len(ranked) - n_eligible} excluded)"
    )


def summary(ranked: Sequence[RankedTrial], objectives: Sequence[Objective | str]) -> str:
    """One line: how many trials are on the front, eligible, and excluded (by reason)."""
    objectives = parse_objectives(objectives)
    n_front = sum(r.pareto for r in ranked)
    n_eligible = sum(r.excluded is None for r in ranked)
    reasons = Counter(r.excluded for r in ranked if r.excluded)
    text = (
        f"{n_front} Pareto-optimal of {n_eligible} eligible trials "
        f"({', '.join(map(str, objectives))}); {len(ranked) - n_eligible} excluded"
    )
    if reasons:
        text += ": " + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    return text


def to_arrow(ranked: Sequence[RankedTrial], objectives: Sequence[Objective | str]) -> pa.Table:
    """The whole table: one row per trial, ``pareto``/``front``/``rank`` columns, objectives,
    the other final metrics, and every param (as logged: strings) under its config key."""
    objectives = parse_objectives(objectives)
    trials = [r.trial for r in ranked]
    cols: dict[str, pa.Array] = {
        "rank": pa.array([r.rank for r in ranked], pa.int32()),
        "front": pa.array([r.front for r in ranked], pa.int32()),
        "pareto": pa.array([r.pareto for r in ranked], pa.bool_()),
        "excluded": pa.array([r.excluded for r in ranked], pa.string()),
        "run_id": pa.array([t.run_id for t in trials], pa.string()),
        "run_name": pa.array([t.run_name for t in trials], pa.string()),
        "sweep_id": pa.array([t.sweep_id for t in trials], pa.string()),
        "trial_id": pa.array([t.trial_id for t in trials], pa.string()),
        "status": pa.array([t.status for t in trials], pa.string()),
        "trial_status": pa.array([t.trial_status for t in trials], pa.string()),
        "method": pa.array([t.method or None for t in trials], pa.string()),
    }
    metrics = [o.metric for o in objectives]
    metrics += [
        m for m in FINAL_METRICS if m not in metrics and any(m in t.metrics for t in trials)
    ]
    for m in metrics:  # null where never logged, NaN where logged as NaN
        cols[m] = pa.array([t.metrics.get(m) for t in trials], pa.float64())
    for key in sorted(set().union(*(t.params for t in trials))):
        if key not in cols:
            cols[key] = pa.array([t.params.get(key) for t in trials], pa.string())
    meta = {"afm_ray.objectives": ",".join(map(str, objectives))}
    return pa.table(cols, metadata=meta)


def write_table(
    ranked: Sequence[RankedTrial], objectives: Sequence[Objective | str], path: str | Path
) -> Path:
    """Write `to_arrow` to ``.parquet`` (pyarrow.parquet) or ``.csv`` (pyarrow.csv)."""
    path = Path(path)
    _check_out_suffix(path)
    table = to_arrow(ranked, objectives)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    return path


def _check_out_suffix(path: Path) -> None:
    if path.suffix.lower() not in (".parquet", ".pq", ".csv"):
        raise ValueError(f"--out {str(path)!r}: expected a .parquet or .csv file name")


# --------------------------------------------------------------------------- plot


def _staircase(xs: np.ndarray, ys: np.ndarray, x_goal: str, y_goal: str) -> tuple[list, list]:
    # Boundary of the region the front dominates: between neighbours (sorted on x) step
    # through the corner that is the worse of the two on each axis.
    def worse(a: float, b: float, goal: str) -> float:
        return min(a, b) if goal == "max" else max(a, b)

    order = np.lexsort((ys, xs))
    xs, ys = xs[order], ys[order]
    px, py = [xs[0]], [ys[0]]
    for k in range(1, len(xs)):
        px += [worse(xs[k - 1], xs[k], x_goal), xs[k]]
        py += [worse(ys[k - 1], ys[k], y_goal), ys[k]]
    return px, py


def _panel(
    ax: Any,
    ranked: Sequence[RankedTrial],
    objectives: Sequence[Objective],
    i: int,
    j: int | None,
    staircase: bool,
) -> None:
    xo = objectives[i]
    yo = objectives[j] if j is not None else None
    xs = np.array([r.objectives[i] for r in ranked]) * _unit(xo.metric)[0]
    if yo is None:  # one objective: value against start order
        ys = np.array([r.trial.start_time for r in ranked], dtype=float)
        ys = np.argsort(np.argsort(ys)).astype(float) + 1
        xs, ys = ys, xs
    else:
        ys = np.array([r.objectives[j] for r in ranked]) * _unit(yo.metric)[0]
    shown = ~(np.isnan(xs) | np.isnan(ys))
    excluded = np.array([r.excluded is not None for r in ranked]) & shown
    front = np.array([r.pareto for r in ranked]) & shown
    dominated = ~excluded & ~front & shown
    if excluded.any():
        kinds = sorted({r.excluded for r in ranked if r.excluded})
        ax.scatter(xs[excluded], ys[excluded], marker="x", s=30, c="0.5", alpha=0.6, lw=1,
                   label=f"excluded ({', '.join(kinds)})")
    if dominated.any():
        ax.scatter(xs[dominated], ys[dominated], s=34, c="tab:blue", alpha=0.35, lw=0,
                   label=f"dominated ({dominated.sum()})")
    if front.any():
        if staircase and yo is not None:
            px, py = _staircase(xs[front], ys[front], xo.goal, yo.goal)
            ax.plot(px, py, c="tab:red", lw=1.2, alpha=0.7, zorder=2)
        ax.scatter(xs[front], ys[front], s=70, c="tab:red", edgecolors="black", lw=0.8, zorder=3,
                   label=f"Pareto front ({front.sum()}), numbered by rank")
        at: dict[tuple[float, float], list[str]] = {}
        for k in np.flatnonzero(front):  # exact ties share one label, "2,3"
            at.setdefault((xs[k], ys[k]), []).append(str(ranked[k].rank))
        for (x, y), ranks in at.items():
            ax.annotate(",".join(ranks), (x, y), xytext=(6, 5), textcoords="offset points",
                        fontsize=9, zorder=4)
    if yo is None:
        ax.set_xlabel("trial (start order)")
        ax.set_ylabel(axis_label(xo))
    else:
        ax.set_xlabel(axis_label(xo))
        ax.set_ylabel(axis_label(yo))
    ax.grid(alpha=0.3)
    ax.margins(0.08)  # room for the rank labels of points on the edge


def plot_front(
    ranked: Sequence[RankedTrial],
    objectives: Sequence[Objective | str],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Scatter of every trial with the front highlighted (numbers = Pareto rank).

    Two objectives: one panel with the front's staircase. Three or more: one panel per pair
    (in a projection a front point may look dominated: it wins on another objective).
    """
    # Figure without pyplot draws through the Agg canvas: no global backend to switch.
    from matplotlib.figure import Figure

    objectives = parse_objectives(objectives)
    m = len(objectives)
    pairs: list[tuple[int, int | None]] = (
        [(0, None)] if m == 1 else list(combinations(range(m), 2))
    )
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig = Figure(figsize=(5.6 * ncols, 4.6 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (i, j) in zip(axes, pairs):
        _panel(ax, ranked, objectives, i, j, staircase=(m == 2))
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        # one row under a grid of panels; stacked under a single panel, where a row would not fit
        fig.legend(handles, labels, loc="outside lower center", frameon=False,
                   ncols=len(handles) if len(pairs) > 1 else 1)
    fig.suptitle(title or headline(ranked))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


# --------------------------------------------------------------------------- registry


def _student_source(
    client: MlflowClient, run_id: str, model_name: str = STUDENT_MODEL
) -> tuple[str, str | None]:
    """(source URI, logged model id) of the student logged by ``run_id``.

    MLflow 3 stores ``log_model(..., name="student")`` as a logged model (``models:/<id>``);
    the older layout keeps an MLmodel under the run's artifacts at ``student/``.
    """
    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = {_quote(run_id)} AND name = {_quote(model_name)}",
    )
    if found:
        latest = max(found, key=lambda lm: lm.creation_timestamp or 0)
        return f"models:/{latest.model_id}", latest.model_id
    if any(f.path == f"{model_name}/MLmodel" for f in client.list_artifacts(run_id, model_name)):
        return f"{run.info.artifact_uri.rstrip('/')}/{model_name}", None
    others = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = {_quote(run_id)}"
    )
    names = ", ".join(sorted({lm.name for lm in others})) or "none"
    # afm_ray.tracking records why logging the student failed instead of failing the trial.
    why = run.data.tags.get("afm_ray.model_error")
    raise ValueError(
        f"run {run_id} has no logged model named {model_name!r} (its logged models: {names}"
        + (f"; afm_ray.model_error: {why}" if why else "")
        + f"); the sweep logs it with mlflow.pytorch.log_model(student, name={model_name!r})"
    )


def register_front(
    ranked: Sequence[RankedTrial],
    objectives: Sequence[Objective | str],
    name: str,
    *,
    tracking_uri: str | None = None,
    model_name: str = STUDENT_MODEL,
) -> list[ModelVersion]:
    """Register each Pareto-optimal student as a version of registered model ``name``.

    Version k gets the alias ``pareto-<rank>`` and tags with its objective values (as logged,
    e.g. ``aa_acc``), the source run, rank and the objectives. A run registered before reuses
    its version; ``pareto-*`` aliases beyond the current front are removed, so
    ``models:/NAME@pareto-1`` always means this front's rank 1.
    """
    objectives = parse_objectives(objectives)
    front = sorted((r for r in ranked if r.pareto), key=lambda r: r.rank or 0)
    if not front:
        raise ValueError("no Pareto-optimal trial to register (every trial is excluded)")
    client = _client(tracking_uri)
    sources = [_student_source(client, r.run_id, model_name) for r in front]  # all, before writing
    with _global_tracking_uri(client):
        return _register(client, front, sources, objectives, name)


def _register(
    client: MlflowClient,
    front: list[RankedTrial],
    sources: list[tuple[str, str | None]],
    objectives: tuple[Objective, ...],
    name: str,
) -> list[ModelVersion]:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="Pareto-optimal students registered by afm_ray.pareto"
        )
    versions = []
    for r, (source, model_id) in zip(front, sources):
        tags = {o.metric: repr(float(v)) for o, v in zip(objectives, r.objectives)}
        tags.update({
            "afm_ray.pareto_rank": str(r.rank),
            "afm_ray.objectives": ",".join(map(str, objectives)),
            "afm_ray.run_id": r.run_id,
            "method.name": r.trial.method,
        })
        existing = client.search_model_versions(
            f"name = {_quote(name)} and run_id = {_quote(r.run_id)}"
        )
        if existing:
            mv = max(existing, key=lambda v: int(v.version))
            for key, value in tags.items():  # the rank may have moved since
                client.set_model_version_tag(name, mv.version, key, value)
        else:
            mv = client.create_model_version(
                name, source=source, run_id=r.run_id, tags=tags, model_id=model_id
            )
        client.set_registered_model_alias(name, f"{ALIAS_PREFIX}{r.rank}", mv.version)
        versions.append(mv)
    # What the previous front left behind: aliases past this front's size, rank tags of
    # versions that are no longer on it.
    for alias in client.get_registered_model(name).aliases:
        suffix = alias[len(ALIAS_PREFIX):]
        if alias.startswith(ALIAS_PREFIX) and suffix.isdigit() and int(suffix) > len(front):
            client.delete_registered_model_alias(name, alias)
    on_front = {mv.version for mv in versions}
    for mv in _all_pages(client.search_model_versions, f"name = {_quote(name)}"):
        if mv.version not in on_front and "afm_ray.pareto_rank" in mv.tags:
            client.delete_model_version_tag(name, mv.version, "afm_ray.pareto_rank")
    return versions


def clean_accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512
) -> float:
    """Fraction of ``x`` (floats in [0,1]) classified as ``y``, in eval mode where possible.

    A model loaded from MLflow's 'pt2' format is a traced graph whose mode was fixed when it
    was logged and that refuses eval()/train(); it is evaluated as is.
    """
    import torch

    was_training = model.training
    try:
        model.eval()
    except NotImplementedError:
        was_training = None
    try:
        correct = 0
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                logits = model(x[start:start + batch_size])
                labels = y[start:start + batch_size].to(logits.device)
                correct += int((logits.argmax(dim=1) == labels).sum())
    finally:
        if was_training:
            model.train()
    return correct / len(x)


def verify_registered(
    name: str,
    alias: str = f"{ALIAS_PREFIX}1",
    *,
    tracking_uri: str | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """(logged clean_acc, re-measured clean accuracy) of ``models:/name@alias``.

    ``data`` is (x in [0,1], y); without it the test split is rebuilt from the source run's
    params with `afm_ray.data.load_dataset` (INTERFACES.md, "Re-evaluating a student").
    """
    import mlflow.pytorch

    client = _client(tracking_uri)
    version = client.get_model_version_by_alias(name, alias)
    run = client.get_run(version.run_id)
    logged = run.data.metrics.get("clean_acc", math.nan)
    with _global_tracking_uri(client):
        model = mlflow.pytorch.load_model(f"models:/{name}@{alias}")
    if data is None:
        from afm_ray.data import load_dataset

        p = run.data.params
        size = p.get("data.image_size")
        ds = load_dataset(
            p["data.name"],
            None if p.get("data.root") in (None, "", "None") else p["data.root"],
            test_fraction=float(p.get("data.test_fraction", 0.2)),
            seed=int(p.get("data.seed", 0)),
            image_size=None if size in (None, "", "None", "0") else int(size),
        )
        data = (ds.x_test.float() / 255, ds.y_test)
    x, y = data
    return logged, clean_accuracy(model, x, y)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m afm_ray.pareto",
        description="Pareto-optimal students of an afm-ray sweep, read from MLflow.",
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment name (or id)")
    p.add_argument("--tracking-uri",
                   help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    p.add_argument("--objectives", nargs="+", default=list(DEFAULT_OBJECTIVES),
                   metavar="NAME:max|min",
                   help=f"metrics to optimise (default: {' '.join(DEFAULT_OBJECTIVES)}); "
                        f"final metrics: {', '.join(FINAL_METRICS)}")
    p.add_argument("--filter", dest="filter_string", metavar="FILTER",
                   help="MLflow search filter ANDed with the trial selection, e.g. "
                        "\"params.`method.name` = 'advfunmatch'\" (params.method works too)")
    p.add_argument("--sweep", metavar="RUN_ID",
                   help="only trials of this sweep (parent run id, id prefix or run name)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="write a plot of all trials with the front highlighted")
    p.add_argument("--out", metavar="FILE.parquet|.csv",
                   help="write the whole table with a pareto column")
    p.add_argument("--register", metavar="MODEL_NAME",
                   help="register each Pareto-optimal student with aliases pareto-1, pareto-2, ...")
    p.add_argument("--front-only", action="store_true", help="print only the Pareto front")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        objectives = parse_objectives(args.objectives)
        if args.out:
            _check_out_suffix(Path(args.out))
        uri = resolve_tracking_uri(args.tracking_uri)
        trials = load_trials(args.experiment, tracking_uri=uri,
                             filter_string=args.filter_string, sweep=args.sweep)
        ranked = rank_trials(trials, objectives)
        print(format_table(ranked, objectives, front_only=args.front_only))
        print(summary(ranked, objectives))
        if args.out:
            print(f"table: {write_table(ranked, objectives, args.out)}")
        if args.plot:
            title = f"{args.experiment}: {headline(ranked)}"
            print(f"plot: {plot_front(ranked, objectives, args.plot, title=title)}")
        if args.register:
            versions = register_front(ranked, objectives, args.register, tracking_uri=uri)
            for rank, mv in enumerate(versions, start=1):
                print(f"registered models:/{args.register}@{ALIAS_PREFIX}{rank} -> version "
                      f"{mv.version} (run {mv.run_id})")
    except (ValueError, FileNotFoundError, MlflowException) as err:
        print(f"afm_ray.pareto: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if not any(r.pareto for r in ranked):
        print("afm_ray.pareto: no trial is eligible for the front (reasons in the table)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
