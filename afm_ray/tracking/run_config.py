"""What a recorded run trained, read back from MLflow: a trial's whole config from its params (a sweep
logs every resolved key, afm_ray.tracking.trial_tracker, so its params alone re-run it), and the
search space and storage its sweep logged (resources, max_failures, where its Train runs live)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient

from afm_ray.config import from_flat, to_flat
from afm_ray.search.space import SearchSpace, parse_search_space
from afm_ray.yaml_loading import parse_yaml


def trial_config(row: pd.Series) -> dict[str, Any]:
    """The whole resolved flat config of a run (a row of `afm_ray.tracking.mlflow_runs.search_runs`),
    from its ``params.*`` columns; keys this build does not know are left out."""
    params = {k.removeprefix("params."): v for k, v in row.items() if k.startswith("params.") and pd.notna(v)}
    return to_flat(from_flat(params, ignore_unknown=True))


def sweep_space(client: MlflowClient, sweep_run: str) -> tuple[SearchSpace, str]:
    """(the search space a sweep logged, its storage folder) from the sweep's parent run."""
    run = client.get_run(sweep_run)
    storage = run.data.params.get("sweep.storage") or str(Path("ray_results").resolve())
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a bar for one small file is noise
    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(client.download_artifacts(sweep_run, "search_space.yaml", tmp)).read_text()
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous
    return parse_search_space(parse_yaml(text, f"run {sweep_run}: search_space.yaml")), storage.rstrip("/")
