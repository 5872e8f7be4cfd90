"""The MLflow Model Registry side of a front: register its students.

`register_front` registers each Pareto-optimal student as a version of one registered model, with
aliases ``pareto-1``, ``pareto-2``, ... in rank order, so ``models:/NAME@pareto-1`` is the first.
Students load back with `afm_ray.tracking.student_model.fetch_student` (safetensors + JSON, checked against
the sha256 the tracking store recorded), never by unpickling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
from mlflow.entities.model_registry import ModelVersion

from afm_ray import names
from afm_ray.errors import TrackingError
from afm_ray.names import Objective
from afm_ray.tracking.mlflow_runs import METHOD_COLUMN, all_pages, client_for, quote, trial_names
from afm_ray.tracking.student_model import student_source

RANK_TAG = "afm_ray.pareto_rank"


def register_front(
    ranked: pd.DataFrame,
    objectives: Sequence[Objective | str],
    name: str,
    *,
    tracking_uri: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> list[ModelVersion]:
    """Register each Pareto-optimal student of ``ranked`` (`afm_ray.pareto.ranking.rank_trials`) as a version of
    model ``name``, aliased ``pareto-<rank>`` and tagged with its objective values, trial id (as the sweep printed
    it), run, rank, the objectives, its sha256 and ``extra_tags``. A run registered before keeps its version, and
    ``pareto-*`` aliases past this front go: ``models:/NAME@pareto-1`` is its rank 1."""
    objectives = Objective.parse_all(objectives)
    front = ranked[ranked["pareto"]].sort_values("rank")
    if front.empty:
        raise TrackingError("no Pareto-optimal trial to register (every trial is excluded)")
    client = client_for(tracking_uri)
    sources = [student_source(client, run_id) for run_id in front["run_id"]]  # all found before writing
    if not client.search_registered_models(filter_string=f"name = {quote(name)}"):
        client.create_registered_model(name, description="Pareto-optimal students registered by afm_ray.pareto")
    versions = []
    for (_, row), (source, model_id), trial in zip(front.iterrows(), sources, trial_names(front), strict=True):
        run_id, rank = row["run_id"], int(row["rank"])
        tags = {o.metric: repr(float(row[f"metrics.{o.metric}"])) for o in objectives}
        tags |= {RANK_TAG: str(rank), "afm_ray.objectives": ",".join(map(str, objectives)), **(extra_tags or {})}
        tags |= {"afm_ray.run_id": run_id, "method.name": "" if pd.isna(row.get(METHOD_COLUMN)) else row[METHOD_COLUMN]}
        tags[names.TRIAL_ID_TAG] = trial  # the name the sweep printed: `export --trial` takes it
        digest = client.get_run(run_id).data.tags.get(names.STUDENT_SHA_TAG)
        if digest:
            tags[names.STUDENT_SHA_TAG] = digest
        existing = client.search_model_versions(f"name = {quote(name)} and run_id = {quote(run_id)}")
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
    for mv in all_pages(client.search_model_versions, f"name = {quote(name)}"):
        if mv.version not in on_front and RANK_TAG in mv.tags:
            client.delete_model_version_tag(name, mv.version, RANK_TAG)
    return versions
