"""Running `python -m afm_ray.sweep` from tests: a tiny space on sklearn digits, its own Ray, a
real MLflow and Optuna store in the test's folder (a whole sweep takes tens of seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

TINY_SPACE = {
    "name": "tiny",
    "description": "two digits trials for tests",
    "experiment": "tiny-tests",
    "fixed": {
        "data.name": "digits",
        "student.width": 8,
        "teacher.width": 16,
        "teacher.epochs": 1,
        "teacher.checkpoint": "train",
        "method.name": "advfunmatch",
        "optim.epochs": 2,
        "optim.batch_size": 64,
        "attack.steps": 1,
        "eval.samples": 24,
        "eval.attacks": "clean,pgd20,aa",
        "eval.val_samples": 64,
    },
    "search": {
        "attack.eps": {"uniform": [0.05, 0.15]},
        "method.tau": {"loguniform": [1.0, 4.0]},
        "optim.lr": {"loguniform": [0.02, 0.2]},
    },
    "objectives": [{"metric": "clean_acc", "mode": "max"}, {"metric": "aa_acc", "mode": "max"}],
    "num_samples": 2,
    "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
}


def write_space(tmp_path: Path, **changes) -> Path:
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    for key, value in changes.items():
        if key == "fixed":
            space["fixed"].update(value)
        else:
            space[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def sweep_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["AFM_RAY_CACHE"] = str(tmp_path / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def sweep_args(tmp_path: Path, space: Path, *extra: str, tracking: str | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "afm_ray.sweep",
        "--space",
        str(space),
        "--storage",
        str(tmp_path / "ray_results"),
        "--tracking-uri",
        tracking or f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--optuna-storage",
        f"sqlite:///{tmp_path / 'optuna.db'}",
        *extra,
    ]


def run_sweep(tmp_path: Path, space: Path, *extra: str, tracking: str | None = None, timeout: int = 420):
    proc = subprocess.run(
        sweep_args(tmp_path, space, *extra, tracking=tracking),
        cwd=tmp_path,
        env=sweep_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def trial_runs(tracking: str, experiment: str = "tiny-tests"):
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.`afm_ray.role` = 'trial'")
