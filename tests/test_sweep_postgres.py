"""Sweeps whose MLflow backend store and Optuna study live on a real PostgreSQL server (tests/postgres.py),
end to end and mocking nothing: `python -m afm_ray.sweep` as a user runs it (its own local Ray),
interrupted and resumed, two sweeps writing the same databases at once, `python -m afm_ray.pareto`
reading the result. The test role's password holds '/', '#', '?' and ':' (percent-encoded in the
URLs) and the marker S3CRET, which must appear in no output, MLflow param or tag, Optuna attribute,
nor any file the sweeps leave (Tune's pickles, Ray's session folder, MLflow's artifacts).

MLflow's artifacts (the students) go where the SQL store puts them by default: ./mlruns of the
sweep's working directory, as with SQLite; a cluster gives the experiment a bucket instead."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from postgres import ROLE_PASSWORD
from sweeps import sweep_env, write_space

pytestmark = pytest.mark.slow

SECRET = "S3CRET"
assert SECRET in ROLE_PASSWORD


def sweep_command(tmp_path: Path, space: Path, *extra: str) -> list[str]:
    storage = str(tmp_path / "ray_results")
    return [sys.executable, "-m", "afm_ray.sweep", "--space", str(space), "--storage", storage, *extra]


def files_holding(root: Path, secret: str) -> list[str]:
    """Every regular file under `root` whose bytes contain `secret`."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if secret.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:  # a socket or a file removed meanwhile
                continue
    return found


def ray_temp_dirs(output: str) -> set[Path]:
    """The private temp folders of the local Rays a sweep printed (afm_ray.sweep.local_ray)."""
    return {Path(m) for m in re.findall(r"(/\S*?/afm-ray-[^/\s]+)/ray/session", output)}


def assert_no_secret_recorded(tracking: str, optuna_url: str, experiment: str = "tiny-tests") -> list:
    """No param or tag of any run of `experiment`, and no attribute of any Optuna trial, holds the secret."""
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    for run in runs:
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert SECRET not in value and "%2F" not in value, (run.info.run_name, key, value)
    for summary in optuna.get_all_study_summaries(storage=optuna_url):
        for trial in optuna.load_study(study_name=summary.study_name, storage=optuna_url).trials:
            assert SECRET not in repr(trial.user_attrs) + repr(trial.system_attrs)
    return runs


def test_sweep_interrupted_resumed_and_read_by_pareto_on_postgresql(postgres, tmp_path):
    """Both stores on PostgreSQL, their URLs from a file and the environment (so the command line holds
    no password); interrupted (SIGINT) after one trial, resumed with the URLs given differently;
    then pareto reads the front and export writes a student, both through $MLFLOW_TRACKING_URI. Every
    trial once in MLflow and Optuna."""
    tracking, optuna_url = postgres.url(postgres.create_database()), postgres.url(postgres.create_database())
    (tmp_path / "tracking-uri").write_text(tracking + "\n")
    (tmp_path / "optuna-url").write_text(optuna_url + "\n")
    space = write_space(tmp_path, num_samples=3, max_concurrent_trials=1, fixed={"optim.epochs": 3})
    first = sweep_command(tmp_path, space, "--name", "res", "--tracking-uri-file", str(tmp_path / "tracking-uri"))
    assert SECRET not in " ".join(first)
    proc = subprocess.Popen(
        first,
        cwd=tmp_path,
        env={**sweep_env(tmp_path), "AFM_RAY_OPTUNA_STORAGE": optuna_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # interrupt once the first trial is done and the second has begun
        lines.append(line)
        if "completed in" in line:
            break
    for line in proc.stdout:
        lines.append(line)
        if "epoch   1" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=300)
    interrupted = "".join(lines) + rest
    assert proc.returncode == 130 and "--resume --name res" in interrupted, interrupted[-3000:]
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("tiny-tests").experiment_id
    before = client.search_runs([experiment], filter_string="tags.`afm_ray.role` = 'trial'")
    assert 1 <= sum(r.data.tags.get("afm_ray.trial_status") == "completed" for r in before) < 3

    resumed = subprocess.run(
        sweep_command(
            tmp_path, space, "--resume", "--name", "res", "--tracking-uri", tracking,
            "--optuna-storage-file", str(tmp_path / "optuna-url"),
        ),
        cwd=tmp_path, env=sweep_env(tmp_path), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    output = interrupted + resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "3/3 trials completed" in resumed.stdout and "postgresql://afm:***@127.0.0.1" in resumed.stdout

    runs = assert_no_secret_recorded(tracking, optuna_url)
    trials = [r for r in runs if r.data.tags.get("afm_ray.role") == "trial"]
    assert len(trials) == 3 and len({r.data.tags["afm_ray.trial_id"] for r in trials}) == 3  # none duplicated
    assert all(r.data.tags["afm_ray.trial_status"] == "completed" and "aa_acc" in r.data.metrics for r in trials)
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in trials}
    parent = [r for r in runs if r.data.tags.get("afm_ray.role") == "sweep"]
    assert [p.info.status for p in parent] == ["FINISHED"]
    assert parent[0].data.params["sweep.optuna_storage"].startswith("postgresql://afm:***@127.0.0.1:")
    study = optuna.load_study(study_name="res", storage=optuna_url)
    assert study.metric_names == ["clean_acc", "aa_acc"]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert {t.user_attrs["tune_trial_id"] for t in study.trials} == {r.data.tags["afm_ray.trial_id"] for r in trials}

    pareto = subprocess.run(
        [sys.executable, "-m", "afm_ray.pareto", "--experiment", "tiny-tests", "--sweep", "res"],
        cwd=tmp_path,
        env={**sweep_env(tmp_path), "MLFLOW_TRACKING_URI": tracking},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pareto.returncode == 0, pareto.stdout[-2000:] + pareto.stderr[-2000:]
    assert "Pareto-optimal of 3 eligible trials" in pareto.stdout, pareto.stdout
    output += pareto.stdout + pareto.stderr
    exported = subprocess.run(
        [sys.executable, "-m", "afm_ray.export", "--model", f"runs:/{trials[0].info.run_id}", "--format", "safetensors",
         "--out", str(tmp_path / "export")],
        cwd=tmp_path, env={**sweep_env(tmp_path), "MLFLOW_TRACKING_URI": tracking}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert exported.returncode == 0 and "verified on" in exported.stdout, exported.stdout + exported.stderr[-2000:]
    output += exported.stdout + exported.stderr

    assert SECRET not in output and "%2F" not in output
    for root in (tmp_path, *ray_temp_dirs(output)):
        holding = [f for f in files_holding(root, SECRET) if Path(f).name not in ("tracking-uri", "optuna-url")]
        assert holding == [], holding


def test_two_sweeps_write_the_same_databases_at_once(postgres, tmp_path):
    """Two sweeps start together on new databases (the URLs with their password on the command line):
    one creates the tables, the other waits for it; both record all their trials in one experiment."""
    tracking, optuna_url = postgres.url(postgres.create_database()), postgres.url(postgres.create_database())
    procs = {}
    for name in ("left", "right"):
        folder = tmp_path / name
        folder.mkdir()
        command = sweep_command(
            tmp_path, write_space(folder), "--name", name, "--tracking-uri", tracking, "--optuna-storage", optuna_url
        )
        procs[name] = subprocess.Popen(
            command, cwd=folder, env=sweep_env(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    outputs = {name: proc.communicate(timeout=900) for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, outputs[name][0][-3000:] + outputs[name][1][-3000:]
        assert "2/2 trials completed" in outputs[name][0]
        assert SECRET not in "".join(outputs[name]) and "%2F" not in "".join(outputs[name])

    client = MlflowClient(tracking)
    assert [e.name for e in client.search_experiments()] == ["tiny-tests", "Default"]
    runs = assert_no_secret_recorded(tracking, optuna_url)
    for name in ("left", "right"):
        (parent,) = [r for r in runs if r.data.tags.get("afm_ray.role") == "sweep" and r.info.run_name == name]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 2 and all(r.data.tags["afm_ray.trial_status"] == "completed" for r in children)
        study = optuna.load_study(study_name=name, storage=optuna_url)
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sorted(optuna.get_all_study_names(storage=optuna_url)) == ["left", "right"]
    assert os.listdir(tmp_path / "ray_results") and files_holding(tmp_path / "ray_results", SECRET) == []
