"""The recorded trial table of the search benchmark: export from MLflow + Optuna, load for replay.

One row per completed trial of the recording sweep (benchmarks/record_search_table.py):

- the searched parameters, typed as Optuna suggested them (``param:<key>``; NaN where a
  conditional key did not apply), and the Tune trial id;
- the per-epoch curves, each column named after its MLflow metric (``val/clean_acc``,
  ``val/pgd10_acc``, ``time/epoch_s``; lists, epoch 1 first);
- the final ``clean_acc``, ``pgd20_acc``, ``cw_acc``, ``aa_acc`` on ``n_samples`` test images;
- seconds: ``eval_<attack>_s`` per attack (n_samples / the attack's logged images/s),
  ``eval_s`` (the whole final evaluation), ``worker_s`` (the Train worker, start to end),
  ``setup_s`` (worker_s minus epochs and evaluation: data, teacher and student set-up) and
  ``wall_s`` (the MLflow run's end minus start: the trial as the sweep saw it, Ray's start-up
  and tear-down included, plus the student's upload to MLflow on the driver).

The Parquet file's metadata holds the search space the recording drew from (its YAML text), so
the replay maps Optuna's suggestions onto the same distributions.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ATTACK_PARTS = ("clean", "pgd20", "cw", "aa")
CURVES = ("val/clean_acc", "val/pgd10_acc", "time/epoch_s")  # per-epoch metrics; the column is the key
SPACE_KEY = b"afm_ray.search_space"  # a key inside the Parquet files, not a module path
INFO_KEY = b"afm_ray.table_info"


def _snapshot(uri: str, folder: Path, name: str) -> str:
    """A consistent copy of a SQLite store through SQLite's backup API (reads only: safe while a
    recording writes to it); other URIs are used as they are."""
    if not uri.startswith("sqlite:///"):
        return uri
    source = uri[len("sqlite:///") :]
    target = folder / f"{name}.db"
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    return f"sqlite:///{target}"


def export_table(tracking_uri: str, optuna_url: str, experiment: str, study_name: str, out: Path) -> pd.DataFrame:
    """Read every completed trial of the recording and write the Parquet table to ``out``."""
    import optuna
    from mlflow.tracking import MlflowClient

    from afm_ray.names import ROLE_TAG, TRIAL_ID_TAG, TRIAL_STATUS_TAG

    with tempfile.TemporaryDirectory(prefix="afm_ray_search_export_") as tmp:
        tracking = _snapshot(tracking_uri, Path(tmp), "mlflow")
        storage = _snapshot(optuna_url, Path(tmp), "optuna")
        client = MlflowClient(tracking)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise SystemExit(f"no MLflow experiment {experiment!r} at {tracking_uri}")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'", max_results=5000)
        parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")
        space_text = ""
        if parents:
            space_text = client.download_artifacts(parents[0].info.run_id, "search_space.yaml", tmp)
            space_text = Path(space_text).read_text()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=study_name, storage=storage)
        suggested = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
        searched = sorted({k for t in study.trials for k in t.params})

        rows = []
        statuses: dict[str, int] = {}
        for run in runs:
            status = run.data.tags.get(TRIAL_STATUS_TAG, "?")
            statuses[status] = statuses.get(status, 0) + 1
            trial_id = run.data.tags.get(TRIAL_ID_TAG)
            m = run.data.metrics
            if status != "completed" or trial_id not in suggested or "aa_acc" not in m:
                continue
            row: dict[str, Any] = {"trial_id": trial_id, "optuna_number": suggested[trial_id].number}
            for key in searched:
                row[f"param:{key}"] = suggested[trial_id].params.get(key, np.nan)
            for key in CURVES:
                history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda h: (h.step, h.timestamp))
                by_epoch = {h.step: h.value for h in history}  # a resumed epoch keeps its last value
                row[key] = [by_epoch[e] for e in sorted(by_epoch)]
            for name in ("clean_acc", "pgd20_acc", "cw_acc", "aa_acc"):
                row[name] = m[name]
            n = m["eval/n_samples"]
            row["n_samples"] = n
            for part in ATTACK_PARTS:
                row[f"eval_{part}_s"] = n / m[f"eval/{part}_images_per_s"]
            row["eval_s"] = m["time/eval_s"]
            row["worker_s"] = m["time/worker_s"]
            row["setup_s"] = m["time/worker_s"] - m["time/eval_s"] - float(np.sum(row["time/epoch_s"]))
            row["wall_s"] = (run.info.end_time - run.info.start_time) / 1000.0
            row["started"] = run.info.start_time / 1000.0
            rows.append(row)
    table = pd.DataFrame(rows).sort_values("started").reset_index(drop=True)
    info = {
        "experiment": experiment,
        "study": study_name,
        "trials_by_status": statuses,
        "rows": len(table),
        "epochs": int(max(len(c) for c in table["val/clean_acc"])) if len(table) else 0,
    }
    write_table(table, out, space_text, info)
    return table


def write_table(table: pd.DataFrame, out: Path, space_text: str, info: Mapping[str, Any]) -> None:
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = dict(arrow.schema.metadata or {})
    meta[SPACE_KEY] = space_text.encode()
    meta[INFO_KEY] = json.dumps(dict(info)).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(arrow.replace_schema_metadata(meta), out, compression="zstd")


def read_table(path: Path) -> tuple[pd.DataFrame, str, dict[str, Any]]:
    """(table, the recording's search-space YAML, table info)."""
    arrow = pq.read_table(path)
    meta = arrow.schema.metadata or {}
    table = arrow.to_pandas()
    for column in CURVES:
        table[column] = [np.asarray(v, dtype=float) for v in table[column]]
    return table, meta.get(SPACE_KEY, b"").decode(), json.loads(meta.get(INFO_KEY, b"{}").decode())
