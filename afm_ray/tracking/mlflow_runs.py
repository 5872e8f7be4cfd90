"""MLflow's runs, the one way afm-ray reads them: a client per URI, paged searches, filter quoting,
the column names of a run frame, and the trial runs of a sweep.

The sweep logs a parent run per sweep (tag ``afm_ray.role = sweep``, param ``sweep.objectives``)
and under it a child run per trial (``afm_ray.role = trial``). `load_trials` returns them as one
DataFrame in the columns of ``mlflow.search_runs`` ("run_id", "metrics.aa_acc", "params.attack.eps",
"tags.afm_ray.trial_status", ...); `sweep_objectives` reads what the sweep optimised. Every call
goes through an `MlflowClient` on the given URI: the process-wide MLflow URIs belong to the caller.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Experiment, ViewType
from mlflow.exceptions import MlflowException

from afm_ray import names
from afm_ray.credentials import redact_uri
from afm_ray.databases import is_server_url, probe_database
from afm_ray.endpoints import check_mlflow_server
from afm_ray.errors import ConfigError, TrackingError, one_line
from afm_ray.names import Objective


def tag_column(tag: str) -> str:
    return f"tags.{tag}"


def param_column(key: str) -> str:
    return f"params.{key}"


METHOD_COLUMN = param_column("method.name")


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` of ``frame``, or all-missing: in the search_runs layout a tag or param that no run
    has is no column at all."""
    return frame[name] if name in frame.columns else pd.Series(None, index=frame.index, dtype=object)


def trial_names(frame: pd.DataFrame) -> pd.Series:
    """The one name a user reads for each trial run: its Tune trial id (what the sweep's lines print and
    what the sweep names the MLflow run), else the run's name, else the first 8 characters of its run id."""
    ids = column(frame, tag_column(names.TRIAL_ID_TAG))
    run_names = column(frame, "run_name")
    short = frame["run_id"].str[:8] if "run_id" in frame.columns else pd.Series("", index=frame.index)
    return ids.where(ids.notna() & (ids != ""), run_names.where(run_names.notna() & (run_names != ""), short))


def resolve_trial(client: MlflowClient, ref: str, experiment_ids: list[str] | None = None) -> Any:
    """The trial run named ``ref``: its trial id (as the sweep prints it), its MLflow run name, or its run id
    or a prefix of it (8 characters or more). A TrackingError lists close candidates when none or several match."""
    ref = ref.strip()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in all_pages(client.search_experiments)]
    if not ref or not experiment_ids:
        raise TrackingError(f"--trial {ref!r}: no such trial (no experiments at {client.tracking_uri})")
    role = tags_match({names.ROLE_TAG: "trial"})
    hits: dict[str, Any] = {}
    for clause in (tags_match({names.TRIAL_ID_TAG: ref}), f"attributes.run_name = {quote(ref)}"):
        for run in all_pages(client.search_runs, experiment_ids, f"{role} and {clause}", max_results=100):
            hits[run.info.run_id] = run
    if not hits and len(ref) >= 8 and re.fullmatch(r"[0-9a-f]+", ref):
        for run in all_pages(client.search_runs, experiment_ids, role, max_results=1000):
            if run.info.run_id.startswith(ref):
                hits[run.info.run_id] = run
    if len(hits) == 1:
        return next(iter(hits.values()))
    if hits:
        listed = ", ".join(f"{r.info.run_id} (experiment {r.info.experiment_id})" for r in hits.values())
        raise TrackingError(f"--trial {ref!r} names several trial runs: {listed}; pass the run id")
    recent = client.search_runs(experiment_ids, role, max_results=8, order_by=["attributes.start_time DESC"])
    known = ", ".join(r.data.tags.get(names.TRIAL_ID_TAG) or r.info.run_name for r in recent) or "none"
    raise TrackingError(
        f"--trial {ref!r}: no trial run has that trial id, run name or run id at {client.tracking_uri}; "
        f"the newest trials there: {known}"
    )


def client_for(tracking_uri: str | None) -> MlflowClient:
    """A client on ``tracking_uri`` (default: $MLFLOW_TRACKING_URI, else ./mlflow.db), which must exist."""
    uri = tracking_uri or names.default_tracking_uri()
    path = uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if path and path != ":memory:" and not Path(path).exists():  # connecting would create an empty one
        raise TrackingError(
            f"no MLflow database at {path} (tracking URI {uri}); pass --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    if uri.startswith(("http://", "https://")):  # MLflow's own client retries for minutes, silently
        check_mlflow_server(uri)
    elif is_server_url(uri):  # PostgreSQL, MySQL: one line for a server that is down, a login refused, no database
        probe_database(uri, f"tracking URI {redact_uri(uri)!r}", TrackingError)
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def all_pages(search: Any, *args: Any, **kwargs: Any) -> list:
    """Every item of a paged MLflow search."""
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
    runs = all_pages(client.search_runs, [experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=1000)
    # {"run_id": ..., "metrics": {"aa_acc": 0.5}, ...} -> columns "run_id", "metrics.aa_acc", ...
    return pd.json_normalize([{**dict(r.info), **r.data.to_dictionary()} for r in runs], max_level=1)


def _get_experiment(client: MlflowClient, name: str) -> Experiment:
    exp = client.get_experiment_by_name(name)
    if exp is None and name.isdigit():
        with contextlib.suppress(MlflowException):  # else not an id either: reported below
            exp = client.get_experiment(name)
    if exp is None or exp.lifecycle_stage != "active":
        known = ", ".join(sorted(e.name for e in all_pages(client.search_experiments))) or "none"
        state = "is deleted" if exp is not None else "not found"
        raise TrackingError(
            f"experiment {name!r} {state} at {redact_uri(client.tracking_uri)}; experiments there: {known}"
        )
    return exp


def quote(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def tags_match(tags: dict[str, str]) -> str:
    """The filter clause "every tag has this value", quoted."""
    return " and ".join(f"tags.`{tag}` = {quote(value)}" for tag, value in tags.items())


def _resolve_sweep(client: MlflowClient, exp: Experiment, sweep: str) -> str:
    """Full run id of the sweep (parent) run named by id, id prefix or run name."""
    sweeps = search_runs(client, exp.experiment_id, tags_match({names.ROLE_TAG: "sweep"}))
    runs = list(zip(sweeps["run_id"], sweeps["run_name"], strict=True)) if len(sweeps) else []
    hits = [(run_id, name) for run_id, name in runs if run_id.startswith(sweep) or name == sweep]
    if len(hits) == 1:
        return hits[0][0]
    listed = ", ".join(f"{run_id} ({name})" for run_id, name in (hits or runs)) or "none"
    if hits:
        raise TrackingError(f"sweep {sweep!r} is ambiguous in experiment {exp.name!r}: {listed}")
    raise TrackingError(f"sweep {sweep!r} not found in experiment {exp.name!r}; sweep runs: {listed}")


_QUOTED = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
_BARE_METHOD = re.compile(rf"({_QUOTED})|\b(params|param|parameters|parameter)\.(?:method|`method`)(?![\w.`])")


def translate_filter(filter_string: str) -> str:
    """Read a bare ``params.method`` as ``params.`method.name``` (the key the sweep logs); quoted values stay."""
    return _BARE_METHOD.sub(lambda m: m.group(1) or f"{m.group(2)}.`method.name`", filter_string)


def trial_filter(filter_string: str | None = None, sweep_id: str | None = None) -> str:
    """The MLflow filter for trial runs, ANDed with a user filter (MLflow filters only AND)."""
    clauses = [tags_match({names.ROLE_TAG: "trial", **({names.PARENT_TAG: sweep_id} if sweep_id else {})})]
    if filter_string and filter_string.strip():
        clauses.append(translate_filter(filter_string.strip()))
    return " and ".join(clauses)


def _explain_no_trials(client: MlflowClient, exp: Experiment, sweep_id: str | None, user_filter: str | None) -> str:
    scope = f"experiment {exp.name!r}" + (f", sweep {sweep_id}" if sweep_id else "")
    trials = search_runs(client, exp.experiment_id, trial_filter(None, sweep_id))
    if len(trials) and user_filter:
        keys = ", ".join(sorted(c.removeprefix("params.") for c in trials.columns if c.startswith("params.")))
        methods = ", ".join(sorted(set(column(trials, METHOD_COLUMN).fillna("?"))))
        return (
            f"no trial run in {scope} matches --filter {user_filter!r} (it has {len(trials)} trial runs; "
            f"method.name values: {methods}; param keys, written params.`key`: {keys})"
        )
    roles = Counter(column(search_runs(client, exp.experiment_id), tag_column(names.ROLE_TAG)).fillna("untagged"))
    held = ", ".join(f"{n} {role}" for role, n in sorted(roles.items())) or "no runs at all"
    return f"{scope} has no trial runs (runs tagged {names.ROLE_TAG}='trial'); it holds {held}"


def load_trials(
    experiment: str, *, tracking_uri: str | None = None, filter_string: str | None = None, sweep: str | None = None
) -> pd.DataFrame:
    """Trial runs of ``experiment`` (name or id) as `search_runs` gives them, of one ``sweep`` (run id, prefix
    or name) and filtered if asked; an unknown experiment or no trial run is a ValueError naming what exists."""
    client = client_for(tracking_uri)
    exp = _get_experiment(client, experiment)
    sweep_id = _resolve_sweep(client, exp, sweep) if sweep else None
    try:
        trials = search_runs(client, exp.experiment_id, trial_filter(filter_string, sweep_id))
    except MlflowException as err:
        raise ConfigError(f"invalid --filter {filter_string!r}: {one_line(err)}") from None
    if trials.empty:
        raise TrackingError(_explain_no_trials(client, exp, sweep_id, filter_string))
    return trials


def sweep_objectives(client: MlflowClient, trials: pd.DataFrame) -> tuple[Objective, ...] | None:
    """The objectives the trials' sweep recorded (param ``sweep.objectives`` of its parent run), or None
    where no sweep recorded any; a ValueError when the trials come from sweeps that optimised different ones."""
    found: dict[str, str] = {}
    for parent in sorted(set(column(trials, tag_column(names.PARENT_TAG)).dropna())):
        with contextlib.suppress(MlflowException):  # a parent deleted since: nothing recorded
            spec = client.get_run(parent).data.params.get(names.SWEEP_OBJECTIVES_PARAM)
            if spec:
                found[parent] = spec
    if len(set(found.values())) > 1:
        listed = "; ".join(f"{run_id[:8]}: {spec}" for run_id, spec in found.items())
        raise ConfigError(
            f"the trials come from sweeps with different objectives ({listed}); pass --sweep or --objectives"
        )
    if not found:
        return None
    return Objective.parse_all(next(iter(found.values())))
