"""The sweep end to end against a real local Ray, a real MLflow and a real Optuna storage.

Each sweep runs as `python -m afm_ray.sweep` in a subprocess (its own Ray, started and torn
down like a user's), on sklearn digits with tiny models, so a whole sweep takes tens of
seconds on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from ray_head import RAY, free_port, ray_head, session_processes, wait_http
from sweeps import run_sweep, sweep_args, sweep_env, trial_runs, write_space

from afm_ray.stats import wilson_interval
from afm_ray.tracking.student_model import fetch_student

pytestmark = pytest.mark.slow


# What the libraries print, seen in a default sweep before it was quiet (issue 23): Ray's token-auth warning,
# the raylet's worker-process warning, Tune's config box and TensorBoard hint, Optuna's ExperimentalWarning
# and INFO lines, Tune's "performance bottleneck" warnings, MLflow's INFO lines, the raw Ray resources dict.
LIBRARY_LINES = re.compile(
    r"Token authentication|\(raylet\)|PYTHON worker processes|Configuration for experiment|TensorBoard|"
    r"View detailed results|ExperimentalWarning|\[[IW] \d{4}-|performance bottleneck|\bINFO\b|WARNING|"
    r"'node:|object_store_memory|[╭│╰]"
)
# The sweep's own lines: preflight, the sweep and teacher, one per trial event, the summary, the next commands.
OWN_LINE = re.compile(
    r"(preflight|sweep|teacher): .*|sweep \S+: .*|\[\d\d:\d\d:\d\d\] trial [0-9a-f]{8}: .*|"
    r"Pareto-optimal trials:|  trial [0-9a-f]{8}: .*|(MLflow|Pareto|Optuna|log): +.*|"
)


def test_two_trial_sweep_end_to_end(tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_sweep(tmp_path, write_space(tmp_path), "--name", "s1")
    out = proc.stdout
    assert "2/2 trials completed" in out and "Pareto-optimal trials" in out and "mlflow ui" in out
    assert out.count("started") >= 2 and "Ray overhead" in out  # one line per trial event
    assert "at most 2 trials at once: " in out and "what the local Ray this sweep started holds" in out
    # Quiet by default: nothing on the terminal but the sweep's own lines; the libraries' output is in the
    # log the last line names (Optuna announces every study it creates, so the log cannot be empty).
    for line in (proc.stdout + proc.stderr).splitlines():
        assert OWN_LINE.fullmatch(line) and not LIBRARY_LINES.search(line), f"not the sweep's own line: {line!r}"
    log = tmp_path / "ray_results" / "s1" / "sweep.log"
    assert out.splitlines()[-1].startswith(f"log:     {log} ") and "A new study created" in log.read_text()
    started = re.findall(r"trial ([0-9a-f]{8}): started .*", out)
    assert len(started) == 2 and "optim.weight_decay=" in out and "optim.lr=" in out

    runs = trial_runs(tracking)
    assert len(runs) == 2
    client = MlflowClient(tracking)
    parent = client.search_runs([runs[0].info.experiment_id], filter_string="tags.`afm_ray.role` = 'sweep'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.params["sweep.study_name"] == "s1" and parent[0].data.params["teacher.checkpoint"]
    assert "teacher/clean_acc" in parent[0].data.metrics

    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.metric_names == ["clean_acc", "aa_acc"]  # what optuna-dashboard shows
    suggested = {t.user_attrs["tune_trial_id"]: t.params for t in study.trials}
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert run.data.tags["afm_ray.trial_status"] == "completed" and run.info.status == "FINISHED"
        for metric in ("clean_acc", "pgd20_acc", "aa_acc", "params", "latency_ms"):
            assert metric in run.data.metrics
        assert (
            run.data.metrics["aa_acc"] <= run.data.metrics["pgd20_acc"] + 1e-9 <= run.data.metrics["clean_acc"] + 1e-9
        )
        # every accuracy with its Wilson 95% interval on the images it was measured on
        n = run.data.metrics["eval/n_samples"]
        assert n == 24
        for metric in ("clean_acc", "pgd20_acc", "aa_acc"):
            low, high = wilson_interval(run.data.metrics[metric], n)
            assert run.data.metrics[f"{metric}_ci_low"] == pytest.approx(low, abs=1e-12)
            assert run.data.metrics[f"{metric}_ci_high"] == pytest.approx(high, abs=1e-12)
        # One name per trial: the MLflow run is named by the trial id the sweep printed.
        assert run.info.run_name == run.data.tags["afm_ray.trial_id"] and run.info.run_name in started
        assert run.data.metrics["time/trial_s"] > run.data.metrics["time/worker_s"] > 0  # for confirm's estimate
        # Params are what Optuna suggested, under the same dotted names, plus the full config.
        for key, value in suggested[run.data.tags["afm_ray.trial_id"]].items():
            assert float(run.data.params[key]) == pytest.approx(value)
        assert run.data.params["method.name"] == "advfunmatch" and run.data.params["optim.momentum"] == "0.9"
        history = client.get_metric_history(run.info.run_id, "val/clean_acc")
        assert [m.step for m in history] == [1, 2]
    # The student is safetensors + a JSON spec (no pickle) that reproduces its logged clean accuracy.
    best = max(runs, key=lambda r: r.data.metrics["clean_acc"])
    student, spec = fetch_student(client, f"runs:/{best.info.run_id}")
    assert spec["input_shape"] == [1, 8, 8] and spec["model"]["arch"] == "small_cnn"
    from afm_ray.config import from_flat
    from afm_ray.data import load_run_data
    from afm_ray.evaluate.protocol import evaluate_model

    cfg = from_flat({k: v for k, v in best.data.params.items() if k != "eval.protocol"})
    clean = evaluate_model(student, cfg, load_run_data(cfg), attack_names=("clean",), log=lambda line: None)
    assert clean["eval/n_samples"] == n and clean["clean_acc"] == pytest.approx(best.data.metrics["clean_acc"])


def test_unreachable_tracking_fails_before_any_trial(tmp_path):
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        sweep_args(tmp_path, write_space(tmp_path), tracking=f"http://127.0.0.1:{port}"),
        cwd=tmp_path,
        env=sweep_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in proc.stderr
    assert not (tmp_path / "ray_results").exists()  # nothing was reserved or written


def test_bad_space_fails_before_ray_starts(tmp_path):
    space = write_space(tmp_path, fixed={"attack.steps": -3})
    proc = subprocess.run(
        sweep_args(tmp_path, space), cwd=tmp_path, env=sweep_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "attack.steps: got -3, expected steps >= 0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("problem", ["read-only storage", "missing dataset", "no teacher", "missing teacher"])
def test_unusable_storage_or_data_fails_in_seconds_before_ray(tmp_path, problem):
    """Preflight: a storage that refuses writes, data that is not where the workers will read it,
    or a teacher neither given nor explicitly to be trained, is one line and exit 2 before Ray
    starts, the teacher trains, or anything is recorded."""
    extra = []
    if problem == "read-only storage":
        space = write_space(tmp_path)
        storage = tmp_path / "readonly"
        storage.mkdir()
        storage.chmod(0o500)
        if os.access(storage, os.W_OK):  # root ignores permission bits: use a path under a file
            storage = tmp_path / "space.yaml" / "results"
        expected = f"--storage {storage}: not writable"
    elif problem == "missing dataset":
        space = write_space(tmp_path, fixed={"data.name": "cifar10", "data.root": str(tmp_path / "nowhere")})
        storage = tmp_path / "ray_results"
        expected = "data.root: cifar10: data_batch_1"
    elif problem == "no teacher":
        space = write_space(tmp_path, fixed={"teacher.checkpoint": ""})
        storage = tmp_path / "ray_results"
        expected = "teacher.checkpoint is empty but advfunmatch distils a teacher: give a checkpoint"
    else:
        space = write_space(tmp_path, fixed={"teacher.checkpoint": str(tmp_path / "gone.pt")})
        storage = tmp_path / "ray_results"
        expected = f"teacher.checkpoint: nothing at '{tmp_path / 'gone.pt'}'"
    args = sweep_args(tmp_path, space, *extra)
    args[args.index("--storage") + 1] = str(storage)
    started = time.monotonic()
    proc = subprocess.run(args, cwd=tmp_path, env=sweep_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 60  # seconds of imports, nothing trained
    assert "Ray" not in proc.stdout and not (tmp_path / "ray_results").exists()
    assert not (tmp_path / "optuna.db").exists()
    if (tmp_path / "mlflow.db").exists():  # the tracking check may create the empty store, nothing in it
        assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["0"]) == []


def test_interrupted_sweep_resumes_without_duplicate_runs(tmp_path):
    """The SIGTERM of `kill`, a preemption or `ray job stop`: Tune saves its state, the parent run is
    marked KILLED (never left RUNNING), and --resume finishes the sweep. (Ctrl-C, SIGINT: the same path,
    run by tests/test_sweep_postgres.py's interrupted sweep.)"""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, num_samples=3, max_concurrent_trials=1, fixed={"optim.epochs": 3})
    proc = subprocess.Popen(
        sweep_args(tmp_path, space, "--name", "res"),
        cwd=tmp_path,
        env=sweep_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # interrupt once the first trial is done and the second has started
        lines.append(line)
        if "completed in" in line:
            break
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "epoch   1" in line:
            break
    proc.send_signal(signal.SIGTERM)  # Tune saves its state and stops (SIGTERM takes the same path as Ctrl-C)
    rest, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "--resume --name res" in rest
    client = MlflowClient(tracking)
    parent = client.search_runs(
        [client.get_experiment_by_name("tiny-tests").experiment_id], filter_string="tags.`afm_ray.role` = 'sweep'"
    )
    assert [p.info.status for p in parent] == ["KILLED"]
    study = optuna.load_study(study_name="res", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) >= 1
    before = trial_runs(tracking)
    assert 1 <= sum(r.data.tags.get("afm_ray.trial_status") == "completed" for r in before) < 3

    out = run_sweep(tmp_path, space, "--resume", "--name", "res").stdout
    assert "3/3 trials completed" in out
    after = trial_runs(tracking)
    trial_ids = [r.data.tags["afm_ray.trial_id"] for r in after]
    assert len(after) == 3 and len(set(trial_ids)) == 3  # no MLflow run duplicated
    assert all(r.data.tags["afm_ray.trial_status"] == "completed" for r in after)
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in after}


def _assert_nothing_recorded(tmp_path: Path, name: str) -> None:
    assert not (tmp_path / "ray_results" / name).exists()
    if (tmp_path / "optuna.db").exists():
        assert optuna.get_all_study_names(storage=f"sqlite:///{tmp_path / 'optuna.db'}") == []
    if (tmp_path / "mlflow.db").exists():
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert [r for r in client.search_runs(experiments) if r.info.status == "RUNNING"] == []
    cache = tmp_path / "cache"
    assert not list(cache.rglob("checkpoint.pt")) and not list(cache.rglob(".staging-*"))


def test_sigterm_while_the_teacher_trains_leaves_nothing(tmp_path):
    """A kill (SIGTERM) while the teacher trains as a Ray task: the task is cancelled, its staging
    folder removed, no parent run, study or sweep folder exists, and no process of the sweep is left."""
    space = write_space(tmp_path, fixed={"teacher.epochs": 30})  # still training when the signal comes
    proc = subprocess.Popen(
        sweep_args(tmp_path, space, "--name", "teach"),
        cwd=tmp_path,
        env=sweep_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "teacher: training" in line:
            break
    deadline = time.monotonic() + 120  # until the task has begun its first epoch
    while time.monotonic() < deadline and not list((tmp_path / "cache").rglob(".staging-*")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=180)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "interrupted before its first trial; nothing was kept" in out and "Traceback" not in out
    _assert_nothing_recorded(tmp_path, "teach")
    deadline = time.monotonic() + 30  # Ray's own processes end with the driver
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not session_processes(proc.pid)


def test_crafted_data_stops_the_sweep_in_the_teacher_task_with_one_line(tmp_path):
    """A CIFAR folder whose first batch would run a command: the check before Ray only lists the
    files, so the teacher task meets it; the sweep reports it in one line and records nothing."""
    import pickle

    import numpy as np

    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
        (folder / name).write_bytes(pickle.dumps({**batch, b"data": Evil()} if name == "data_batch_1" else batch))
    space = write_space(tmp_path, fixed={"data.name": "cifar10", "data.root": str(tmp_path / "cifar")})
    proc = subprocess.run(
        sweep_args(tmp_path, space, "--name", "evil"),
        cwd=tmp_path,
        env=sweep_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: teacher: ") and "refused to unpickle posix.system" in last, proc.stderr
    assert "Traceback" not in proc.stderr and "failed before its first trial" in proc.stdout
    assert not marker.exists()
    _assert_nothing_recorded(tmp_path, "evil")


def _train_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "RayTrainWorker" in line and "ps -eo" not in line]


def test_killed_worker_resumes_from_its_checkpoint_under_ddp(tmp_path):
    """Two gloo (DDP) workers; one is killed after the first checkpoint; the trial finishes."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(
        tmp_path,
        num_samples=1,
        fixed={"optim.epochs": 4, "eval.attacks": "clean,pgd20"},
        objectives=[{"metric": "clean_acc", "mode": "max"}, {"metric": "pgd20_acc", "mode": "max"}],
        resources={"num_workers": 2, "cpus_per_worker": 0.5, "gpus_per_worker": 0},
    )
    proc = subprocess.Popen(
        sweep_args(tmp_path, space, "--name", "kill"),
        cwd=tmp_path,
        env=sweep_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch   1" in line:
            pids = _train_worker_pids()
            assert pids, "no Ray Train worker process found"
            os.kill(pids[0], signal.SIGKILL)
            break
    rest, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, "".join(lines) + rest
    runs = trial_runs(tracking)
    assert len(runs) == 1 and runs[0].data.tags["afm_ray.trial_status"] == "completed"
    client = MlflowClient(tracking)
    starts = [m.value for m in client.get_metric_history(runs[0].info.run_id, "run/start_epoch")]
    assert max(starts) >= 1, f"the restarted workers did not resume from a checkpoint: {starts}"
    assert runs[0].data.metrics["run/world_size"] == 2


@contextlib.contextmanager
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, served artifacts): its URI."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(uri + "/health")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_ray_job_submit_to_a_token_authenticated_head(tmp_path):
    """The README's cluster path: `ray start --head` with token auth, then `ray job submit`, tracking
    through a real MLflow server (students uploaded as served artifacts), with --verbose."""
    home = tmp_path / "home"  # Ray keeps the token in ~/.ray/auth_token
    home.mkdir()
    env = {**sweep_env(tmp_path), "HOME": str(home), "RAY_AUTH_MODE": "token"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    with ray_head(env) as head, mlflow_server(tmp_path) as tracking:
        workdir = tmp_path / "job"
        workdir.mkdir()
        space = write_space(workdir, num_samples=1)
        proc = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                head["dashboard"],
                "--working-dir",
                str(workdir),
                "--",
                "python",
                "-m",
                "afm_ray.sweep",
                "--space",
                space.name,
                "--storage",
                str(tmp_path / "ray_results"),
                "--tracking-uri",
                tracking,
                "--optuna-storage",
                f"sqlite:///{tmp_path / 'optuna.db'}",
                "--name",
                "job",
                "--verbose",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
        assert proc.returncode == 0 and "succeeded" in proc.stdout + proc.stderr, (
            proc.stdout[-3000:] + proc.stderr[-2000:]
        )
        assert "1/1 trials completed" in proc.stdout
        # --verbose: the libraries print here again (Optuna announces its study), and no log file is kept
        assert "A new study created" in proc.stdout + proc.stderr
        assert not (tmp_path / "ray_results" / "job" / "sweep.log").exists()
        runs = trial_runs(tracking)
        assert len(runs) == 1 and runs[0].data.tags["afm_ray.trial_status"] == "completed"
        assert "aa_acc" in runs[0].data.metrics
        assert fetch_student(MlflowClient(tracking), f"runs:/{runs[0].info.run_id}")  # uploaded through the server

        # --dry-run --address: joins the cluster as a driver, reports what it has now, starts nothing. A GPU
        # space on a cluster with no GPU node and no autoscaler config to read: with a stated cap the trials
        # wait for workers; without one the real run could not bound its trial drivers, and the dry run says so.
        gpu = {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1}
        (tmp_path / "capped").mkdir()
        capped = write_space(tmp_path / "capped", resources=gpu, max_concurrent_trials=2)
        uncapped = write_space(tmp_path, resources=gpu, max_concurrent_trials=0)
        for space_file, code, expected in (
            (space, 0, "resources: 1 node(s) with 2 CPUs, 0 GPUs now; a trial takes 1 CPU(s): 2 trial(s) at a time"),
            (capped, 0, "none fits now; trials wait until the autoscaler adds workers"),
            (uncapped, 2, "error: cannot tell how many trials to run at once"),
        ):
            dry = subprocess.run(
                sweep_args(tmp_path, space_file, "--address", head["gcs"], "--dry-run", "--name", "dry"),
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            said = dry.stdout + dry.stderr
            assert dry.returncode == code and expected in said, said[-4000:]
        errors = [line for line in dry.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--max-concurrent-trials N" in errors[0], dry.stderr
        assert not (tmp_path / "ray_results" / "dry").exists()
