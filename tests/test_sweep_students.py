"""A sweep end to end with the paper-grade student choices: a two-teacher ensemble read by every trial,
student.average searched like any key, and every trial's MLflow run carrying which epoch is its student."""

from __future__ import annotations

import pytest
from sweeps import run_sweep, trial_runs, write_space

from afm_ray.config import from_flat
from afm_ray.names import AVERAGED_METRIC, SELECTED_EPOCH_METRIC, SELECTED_VAL_METRIC
from afm_ray.teacher.members import resolve_member
from afm_ray.teacher.training import ensure_teacher

pytestmark = pytest.mark.slow


def test_sweep_with_a_two_teacher_ensemble_logs_the_selected_epoch(tmp_path):
    teachers = [
        str(
            ensure_teacher(
                from_flat(
                    {
                        "data.name": "digits",
                        "teacher.width": 8,
                        "teacher.epochs": 1,
                        "teacher.method": method,
                        "teacher.cache_dir": str(tmp_path / "teachers"),
                    }
                ),
                log=lambda line: None,
            )
        )
        for method in ("pgd_at", "trades")
    ]
    ensemble = ",".join(teachers)
    space = write_space(
        tmp_path,
        fixed={
            "teacher.checkpoint": ensemble,
            "teacher.width": 8,
            "student.select": "best_pgd",
            "eval.attacks": "clean,pgd20",
        },
        search={"student.average": {"choice": ["ema", "swa"]}, "attack.eps": {"uniform": [0.05, 0.15]}},
    )
    proc = run_sweep(tmp_path, space, "--name", "ensemble")
    assert "an ensemble of 2" in proc.stdout  # the preflight's teacher line
    runs = trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(runs) == 2
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        assert params["teacher.checkpoint"] == ensemble and params["student.select"] == "best_pgd"
        assert params["student.average"] in ("ema", "swa")
        assert metrics[SELECTED_EPOCH_METRIC] in (1.0, 2.0)
        assert 0 <= metrics[SELECTED_VAL_METRIC] <= 1
        assert metrics[AVERAGED_METRIC] >= 1  # SWA from epoch 2 of 2, or EMA every step
        assert 0 <= metrics["pgd20_acc"] <= metrics["clean_acc"] <= 1


def test_sweep_trains_its_teacher_once_and_each_trial_picks_the_epoch(tmp_path):
    """teacher.checkpoint: train with teacher.select searched: the teacher's epochs go to the sweep's
    storage with it, and each trial loads the epoch its teacher.select names."""
    space = write_space(
        tmp_path,
        fixed={"teacher.epochs": 2, "eval.attacks": "clean", "student.average": "swa"},
        search={"teacher.select": {"choice": ["epoch:1", "best_pgd"]}, "attack.eps": {"uniform": [0.05, 0.15]}},
    )
    run_sweep(tmp_path, space, "--name", "early")
    folder = tmp_path / "ray_results" / "early" / "teacher"
    assert sorted(p.name for p in (folder / "epochs").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt", "index.json"]
    for run in trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        params = run.data.params
        assert params["teacher.checkpoint"] == str(folder)
        chosen = resolve_member(params["teacher.checkpoint"], params["teacher.select"])
        assert chosen.endswith(".pt") and (params["teacher.select"] != "epoch:1" or chosen.endswith("epoch_0001.pt"))
        assert run.data.metrics[AVERAGED_METRIC] == 1  # SWA over the last of 2 epochs
