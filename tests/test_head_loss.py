"""Losing the head loses nothing (issue 20), on the simulated autoscaling cluster (tests/fake_cluster.py).

A sweep's memory lives off the cluster: MLflow and the Optuna study on PostgreSQL (a database each on
the `postgres` fixture's server, their URLs read from files so no password reaches `ray job submit`'s
entrypoint), Ray's storage in a folder that outlives the cluster (it stands for the bucket, and so does
the experiment's artifact location). The sweep (3 trials, 2 at once, a checkpoint every epoch) is sent
with `ray job submit`; once a trial has completed and another has logged 2 epochs, every process of the
cluster, head and fake worker nodes, is killed (SIGKILL, no goodbye). A fresh cluster gets the same
command with `--resume --name <same>` (a same-named sweep without --resume is refused, on purpose:
afm_ray.sweep.plan.check_sweep_name). Then every trial is in MLflow and in Optuna exactly once and
complete, the trials finished before the kill were not rerun (their epoch curves are what they were at
the kill), the trials running at the kill resumed from their last checkpoint (`run/start_epoch` >= 1),
and `python -m afm_ray.pareto` reads all of them. The compute lost is printed: `pytest -s`.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from fake_cluster import simulated_cluster
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from postgres import ROLE_PASSWORD
from ray_head import RAY, session_processes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
ddp_noise = importlib.import_module("ddp_noise")  # the simulated cluster's tiny config (digits, width-8 CNN)
IDLE_TIMEOUT_S = 20
EXPERIMENT, NAME = "headloss-tests", "headloss"
TRIALS, AT_ONCE = 3, 2
# Trials of unequal length, so that one completes while another is mid-training (the sampler, seed 0, gives
# 8, 3, 8; with other draws the test waits longer and holds the same).
EPOCHS = [3, 8]
EPOCH_KEY = "val/clean_acc"  # logged once per epoch, at step = the epoch (time/epoch_s comes again with the finals)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from afm_ray.config import from_flat
    from afm_ray.teacher.training import ensure_teacher

    cache = tmp_path_factory.mktemp("teacher")
    cfg = from_flat({**ddp_noise.DDP_CONFIG, "teacher.cache_dir": str(cache)})
    return str(ensure_teacher(cfg, log=lambda line: None))


def _cluster_env(home: Path) -> dict[str, str]:
    """The head's environment: its own HOME (token, autoscaler config) and token authentication."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_CLUSTER_NAME")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token")
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    return env


def _job_env(tmp: Path) -> dict[str, str]:
    env = {"AFM_RAY_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _space(path: Path, teacher: str) -> Path:
    fixed = {
        **ddp_noise.worker_config(teacher, 0, 1),
        "run.checkpoint_every": 1,
        **{"eval.samples": 64, "eval.attacks": "clean,pgd20", "eval.val_samples": 32},
    }
    search = {"optim.lr": {"loguniform": [0.05, 0.2]}, "optim.epochs": {"choice": EPOCHS}}
    space = {
        "name": "headloss",
        "experiment": EXPERIMENT,
        "fixed": {k: v for k, v in fixed.items() if k not in search},
        "search": search,
        "objectives": [{"metric": "clean_acc", "mode": "max"}, {"metric": "pgd20_acc", "mode": "max"}],
        "num_samples": TRIALS,
        "max_concurrent_trials": AT_ONCE,
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
    }
    path.write_text(yaml.safe_dump(space))
    return path


def _trial_runs(client: MlflowClient, experiment_id: str) -> list:
    return client.search_runs([experiment_id], filter_string="tags.`afm_ray.role` = 'trial'")


def _epochs(client: MlflowClient, run_id: str) -> list[tuple[int, float, int]]:
    """A run's per-epoch curve as (epoch, value, timestamp), in logging order."""
    return [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, EPOCH_KEY)]


def _finals(client: MlflowClient, run_id: str) -> list[tuple[str, float, int]]:
    """Every value a run logged for its final evaluation (and its wall time), with its timestamp."""
    keys = ("clean_acc", "pgd20_acc", "time/trial_s")
    return [(key, m.value, m.timestamp) for key in keys for m in client.get_metric_history(run_id, key)]


def _kill_session(sid: int, head_pid: int) -> int:
    """SIGKILL every process of the cluster's session (the head's processes and every fake node's) until
    none is left; the head's `ray start` is this process's child: reaped, so no zombie stays in the
    session. Returns how many processes were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = [p for p in session_processes(sid) if not _zombie(p)]
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        time.sleep(0.2)
    try:
        os.waitpid(head_pid, os.WNOHANG)
    except ChildProcessError:
        pass
    left = [p for p in session_processes(sid) if not _zombie(p)]
    assert not left, f"processes of the killed cluster still running: {left}"
    return len(killed)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True  # gone


def test_losing_the_whole_cluster_mid_sweep_loses_no_trial(postgres, teacher, tmp_path):
    started = time.monotonic()
    tracking, optuna_url = postgres.url(postgres.create_database()), postgres.url(postgres.create_database())
    (tmp_path / "tracking-uri").write_text(tracking + "\n")
    (tmp_path / "optuna-url").write_text(optuna_url + "\n")
    client = MlflowClient(tracking)
    # Artifacts in the "bucket" too: the experiment's location is set before any cluster runs.
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "bucket").as_uri())
    space = _space(tmp_path / "space.yaml", teacher)
    args = [
        "--space", str(space), "--storage", str(tmp_path / "ray_results"),
        "--tracking-uri-file", str(tmp_path / "tracking-uri"), "--optuna-storage-file", str(tmp_path / "optuna-url"),
        "--name", NAME,
    ]  # fmt: skip
    assert ROLE_PASSWORD not in " ".join(args)

    # The first cluster: the sweep runs until a trial completed and another is mid-training; then it dies.
    with simulated_cluster(_cluster_env(tmp_path / "home1"), idle_timeout_s=IDLE_TIMEOUT_S) as first:
        job = first.job(args, env_vars=_job_env(tmp_path))
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.append(job.communicate()[0]))
        reader.start()
        try:
            deadline = time.monotonic() + 1200
            while True:
                assert time.monotonic() < deadline, "no trial completed while another ran"
                assert reader.is_alive(), f"the sweep ended before the kill:\n{''.join(output)[-4000:]}"
                runs = _trial_runs(client, experiment_id)
                done = [r for r in runs if r.data.tags.get("afm_ray.trial_status") == "completed"]
                running = [  # mid-training: 2 epochs or more logged, and more to go
                    r
                    for r in runs
                    if r.data.tags.get("afm_ray.trial_status") == "running"
                    and 2 <= len(_epochs(client, r.info.run_id)) < int(r.data.params.get("optim.epochs", 0))
                ]
                if done and running:
                    break
                time.sleep(1)
            killed = _kill_session(first.session, first.session)
            killed_at = time.time()
        finally:
            if job.poll() is None:
                job.kill()  # `ray job submit` on the user's side: its cluster is gone
            reader.join(timeout=60)
    first_output = "".join(output)
    # What the records held when the cluster died (nothing wrote to them after the kill).
    before = {
        r.data.tags["afm_ray.trial_id"]: {
            "run_id": r.info.run_id,
            "status": r.data.tags.get("afm_ray.trial_status"),
            "epochs": _epochs(client, r.info.run_id),
            "finals": _finals(client, r.info.run_id),
        }
        for r in _trial_runs(client, experiment_id)
    }
    study_before = optuna.load_study(study_name=NAME, storage=optuna_url).trials
    lost_at = time.monotonic()

    # A fresh cluster, the same command with --resume.
    with simulated_cluster(_cluster_env(tmp_path / "home2"), idle_timeout_s=IDLE_TIMEOUT_S) as second:
        status, out = second.submit([*args, "--resume"], env_vars=_job_env(tmp_path), timeout_s=1200)
    assert status == 0 and f"{TRIALS}/{TRIALS} trials completed" in out, first_output[-3000:] + out[-5000:]
    wall, recovered = time.monotonic() - started, time.monotonic() - lost_at

    # Every trial exactly once in MLflow, finished; one sweep run, finished.
    runs = _trial_runs(client, experiment_id)
    ids = [r.data.tags["afm_ray.trial_id"] for r in runs]
    assert len(runs) == TRIALS and len(set(ids)) == TRIALS, ids
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["afm_ray.trial_status"] == "completed", run.info
        assert {"clean_acc", "pgd20_acc"} <= set(run.data.metrics), run.data.metrics
    parents = client.search_runs([experiment_id], filter_string="tags.`afm_ray.role` = 'sweep'")
    assert [p.info.status for p in parents] == ["FINISHED"], [(p.info.run_name, p.info.status) for p in parents]
    # A trial that Tune started after it last saved its state is unknown to the resumed sweep: its run is deleted
    # and its Optuna trial runs again under a new id. Every other run at the kill is continued, not replaced.
    orphans = client.search_runs(
        [experiment_id], filter_string="tags.`afm_ray.role` = 'trial'", run_view_type=ViewType.DELETED_ONLY
    )
    assert all(before[r.data.tags["afm_ray.trial_id"]]["status"] == "running" for r in orphans), orphans
    assert {b["run_id"] for b in before.values()} == {r.info.run_id for r in runs if r.data.tags["afm_ray.trial_id"]
        in before} | {r.info.run_id for r in orphans}  # fmt: skip

    # Every trial exactly once in Optuna, complete, and the same trials as MLflow's.
    study = optuna.load_study(study_name=NAME, storage=optuna_url)
    assert len(study.trials) == TRIALS, [(t.number, t.state) for t in study.trials]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials), [t.state for t in study.trials]
    assert sorted(t.user_attrs["tune_trial_id"] for t in study.trials) == sorted(ids)

    # Finished before the kill: not rerun (its curve and its final evaluation are what they were at the kill).
    # Running at the kill: resumed from its last checkpoint (one per epoch: at or after its last logged epoch).
    # Compute lost: the epochs logged before the kill past the checkpoint it resumed from.
    lost: dict[str, int] = {}
    resumed: dict[str, str] = {}
    for run in runs:
        trial_id, after = run.data.tags["afm_ray.trial_id"], _epochs(client, run.info.run_id)
        epochs = int(run.data.params["optim.epochs"])
        steps = sorted({step for step, _, _ in after})
        was = before.get(trial_id, {"status": "not started", "epochs": []})
        if was["status"] == "completed":
            assert after == was["epochs"], f"trial {trial_id} finished before the kill and was rerun: {after}"
            finals = _finals(client, run.info.run_id)
            assert finals == was["finals"], f"trial {trial_id} finished before the kill, evaluated again: {finals}"
            assert steps == list(range(1, epochs + 1)), (trial_id, after)
            lost[trial_id] = 0
            continue
        logged = max((step for step, _, _ in was["epochs"]), default=0)
        assert after[: len(was["epochs"])] == was["epochs"], (trial_id, after, was["epochs"])  # kept, not replaced
        again = sorted(step for step, _, t in after if t > killed_at * 1000)
        starts = client.get_metric_history(run.info.run_id, "run/start_epoch")
        # No epoch reported after the kill: its last checkpoint was its last epoch; its final evaluation ran again.
        restarted = min((int(m.value) for m in starts if m.timestamp > killed_at * 1000), default=epochs)
        if logged >= 1:
            assert restarted >= logged, f"trial {trial_id} did not resume from its last checkpoint: {starts}"
        assert again == list(range(restarted + 1, epochs + 1)), (trial_id, again, restarted)
        # An epoch checkpointed but not yet logged when the head died is neither trained again nor logged.
        assert steps == sorted(set(range(1, logged + 1)) | set(again)), (trial_id, steps, logged, again)
        lost[trial_id] = max(0, logged - restarted)
        since = killed_at - max((t for _, _, t in was["epochs"]), default=killed_at * 1000) / 1000
        resumed[trial_id] = f"{logged}/{epochs} epochs logged, resumed at epoch {restarted}" + (
            f", {since:.0f} s after its last logged epoch" if logged else ""
        )
    for run in orphans:  # what its lost run had trained is lost
        trial_id = run.data.tags["afm_ray.trial_id"]
        lost[trial_id] = len(before[trial_id]["epochs"])
        resumed[trial_id] = f"started after Tune's last save: {lost[trial_id]} epochs lost, its Optuna trial rerun"
    assert any(b["status"] == "completed" for b in before.values()) and any(
        " resumed at epoch " in r and not r.startswith("0/") for r in resumed.values()
    ), f"the kill did not land with a trial completed and another mid-training: {before}"

    # The front reads every trial.
    pareto = subprocess.run(
        [sys.executable, "-m", "afm_ray.pareto", "--experiment", EXPERIMENT, "--sweep", NAME],
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "MLFLOW_TRACKING_URI": tracking},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pareto.returncode == 0, pareto.stdout[-2000:] + pareto.stderr[-2000:]
    assert f"Pareto-optimal of {TRIALS} eligible trials" in pareto.stdout, pareto.stdout
    assert ROLE_PASSWORD not in first_output + out + pareto.stdout + pareto.stderr

    done_before = sorted(t for t, b in before.items() if b["status"] == "completed")
    print(
        f"\nhead loss: {TRIALS} trials ({AT_ONCE} at once, a checkpoint every epoch); killed {killed} processes of "
        f"the first cluster with {len(done_before)} trial(s) completed ({', '.join(done_before)}); at the kill: "
        f"{resumed}; Optuna at the kill: {[t.state.name for t in study_before]}; the fresh cluster finished the sweep "
        f"in {recovered:.0f} s; epochs redone per trial {lost} (total {sum(lost.values())}); wall {wall:.0f} s"
    )
