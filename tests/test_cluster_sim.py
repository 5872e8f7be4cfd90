"""The cluster path in motion, on a simulated autoscaling cluster (tests/fake_cluster.py): the node
types of clusters/aws.yaml (a head of 0 CPUs, gpu_spot and gpu_ondemand from 0, one CPU standing
for each GPU), Ray's real v2 autoscaler launching and terminating local raylets, the sweep sent
with `ray job submit` as on a real cluster (the installed package, no working dir), on digits
with tiny models.

- autoscaling: worker nodes come up from zero, every trial runs on a worker (its MLflow run's
  `ray.node_id` tag), and the cluster goes back to the head alone after the idle timeout;
- DDP across nodes: a trial of two workers, one per node (gloo over loopback, as NCCL would go over
  the network between GPU nodes), names both nodes and scores what a one-worker run of the same
  config scores, within the run-to-run noise measured by benchmarks/ddp_noise.py;
- node loss: a worker node's raylet killed mid-trial; the trial resumes on another node from its
  last checkpoint and the sweep finishes with one FINISHED MLflow run per trial;
- bounded concurrency (issue 19), on its own cluster of aws.yaml's node types with lower maxima (1 spot +
  1 on-demand: ten trials at once, as the shipped maxima give, overload 2 cores): a space with
  `max_concurrent_trials: 0` and twice as many trials as the cluster holds, sent while no worker
  node runs. The driver reads the autoscaler's node types where `ray up` puts them and runs at most 2
  trials at once; the trial drivers are counted and their memory on the head sampled all along.

The timings the tests see (scale-up, scale-down) are printed: `pytest -s -m slow tests/test_cluster_sim.py`.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from fake_cluster import FAKE_HEAD_NODE_ID, simulated_cluster
from mlflow.tracking import MlflowClient
from ray_head import RAY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_S = 20  # aws.yaml's 10 minutes, shortened
sys.path.insert(0, str(ROOT / "benchmarks"))
ddp_noise = importlib.import_module("ddp_noise")  # DDP_CONFIG and worker_config: one config for both
# benchmarks/ddp_noise.py, 12 seeds (docs/cluster_sim_cpu.md): the standard deviation of the paired
# difference between a two-worker and a one-worker run is 0.011 for clean and 0.048 for PGD-20
# accuracy (360 test images). The tolerance is four of those, rounded up.
DDP_TOLERANCE = {"clean_acc": 0.05, "pgd20_acc": 0.20}
SMALL = {"gpu_spot": 1, "gpu_ondemand": 1}  # aws.yaml's 8 + 2, lowered: 10 trials at once overload 2 cores
CAP = sum(SMALL.values())  # trials of one worker node each at the small cluster's largest size
DRIVER = "ray::ImplicitFunc"  # the title Ray gives the process of a trial's Tune function (reuse_actors is off)
# What each running trial adds beside its Train workers, wherever its driver landed: the Tune function, Train
# V2's controller (pinned to the driver's node), its placement-group cleaner and the queue of its reports.
PER_TRIAL = (DRIVER, "ray::TrainController", "ray::PlacementGroupCleaner", "ray::_QueueActor")


def _only_head(nodes: dict) -> bool:
    return set(nodes) == {FAKE_HEAD_NODE_ID}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from afm_ray.config import from_flat
    from afm_ray.teacher.training import ensure_teacher

    cache = tmp_path_factory.mktemp("teacher")
    cfg = from_flat({**ddp_noise.DDP_CONFIG, "teacher.cache_dir": str(cache)})
    return str(ensure_teacher(cfg, log=lambda line: None))


def _cluster_env(home: Path) -> dict[str, str]:
    """The head's environment: this one, with its own HOME (Ray keeps the token in ~/.ray/auth_token, `ray up`
    the autoscaler's config in ~/ray_bootstrap_config.yaml) and token authentication."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_CLUSTER_NAME")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token")
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with simulated_cluster(_cluster_env(tmp_path_factory.mktemp("home")), idle_timeout_s=IDLE_TIMEOUT_S) as sim:
        yield sim


@pytest.fixture
def small_cluster(tmp_path_factory):
    """aws.yaml's node types with lower maxima (SMALL), so that filling the cluster fits 2 cores."""
    home = tmp_path_factory.mktemp("home")
    with simulated_cluster(_cluster_env(home), idle_timeout_s=IDLE_TIMEOUT_S, maxima=SMALL) as sim:
        yield sim


def _space(path: Path, fixed: dict, **raw) -> Path:
    search = raw.pop("search", None) or {"run.seed": {"choice": [fixed.get("run.seed", 0)]}}  # one config
    space = {
        "name": "sim",
        "experiment": "sim-tests",
        "fixed": {k: v for k, v in fixed.items() if k not in search},  # a key is fixed or searched
        "search": search,
        "objectives": [{"metric": "clean_acc", "mode": "max"}, {"metric": "pgd20_acc", "mode": "max"}],
        "num_samples": 1,
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
        **raw,
    }
    path.write_text(yaml.safe_dump(space))
    return path


def _sweep_args(tmp: Path, space: Path, name: str) -> list[str]:
    return [
        "--space", str(space),
        "--storage", str(tmp / "ray_results"),
        "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--optuna-storage", f"sqlite:///{tmp / 'optuna.db'}",
        "--name", name,
    ]  # fmt: skip


def _job_env(tmp: Path) -> dict[str, str]:
    """What the job's driver and every worker get: the package on the test's path, a private cache."""
    env = {"AFM_RAY_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _epochs_logged(tmp: Path, run_id: str) -> int:
    return len(MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_metric_history(run_id, "time/epoch_s"))


def _trial_runs(tmp: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sim-tests")
    if experiment is None:  # the sweep has not created it yet
        return []
    return client.search_runs([experiment.experiment_id], filter_string="tags.`afm_ray.role` = 'trial'")


def _assert_succeeded(result: tuple[int, str], trials: int) -> None:
    status, out = result
    assert status == 0 and "succeeded" in out, out[-4000:]
    assert f"{trials}/{trials} trials completed" in out, out[-4000:]


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (one that ends as another starts does not overlap it)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_cap_from_the_autoscalers_node_types_bounds_trial_drivers_and_head_memory(small_cluster, teacher, tmp_path):
    """Issue 19: `max_concurrent_trials: 0` resolves to what the autoscaler's node types hold at their maxima;
    no more trial drivers than that ever run, and what they hold on the head stays within their reservation."""
    from afm_ray.sweep.trial import TRIAL_DRIVER_MEMORY

    cluster = small_cluster
    cluster.wait_for(_only_head, 300, "the cluster at rest")  # no worker node yet, as on a fresh cluster
    fixed = {
        **ddp_noise.worker_config(teacher, 0, 1),
        **{"optim.epochs": 1, "eval.samples": 64, "eval.attacks": "clean,pgd20", "eval.val_samples": 32},
    }
    trials = 2 * CAP
    space = _space(tmp_path / "space.yaml", fixed, num_samples=trials, max_concurrent_trials=0, search={
        "optim.lr": {"loguniform": [0.05, 0.2]}})  # fmt: skip
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # the store before the sweep
    at_rest = sum(p["pss"] for p in cluster.processes() if p["head"])
    samples = []  # trial drivers anywhere; on the head: the trials' processes (RSS, PSS), everything (PSS)
    started = time.monotonic()
    job = cluster.job(_sweep_args(tmp_path, space, "bounded"), env_vars=_job_env(tmp_path))
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(job.communicate(timeout=1500)[0]))
    reader.start()
    try:
        while reader.is_alive():
            procs = cluster.processes()
            on_head = [p for p in procs if p["head"]]
            trial_procs = [p for p in on_head if p["title"].startswith(PER_TRIAL)]
            samples.append((
                sum(p["title"].startswith(DRIVER) for p in procs),
                sum(p["title"].startswith(DRIVER) for p in on_head),
                sum(p["rss"] for p in trial_procs),
                sum(p["pss"] for p in trial_procs),
                sum(p["pss"] for p in on_head),
            ))  # fmt: skip
            time.sleep(0.5)
    finally:
        if job.poll() is None:
            job.kill()
        reader.join()
    wall = time.monotonic() - started
    out = output[0] if output else ""
    runs = _trial_runs(tmp_path)  # each trial's MLflow run spans its Tune trial: a record of every moment
    most_runs = _max_overlap([(r.info.start_time, r.info.end_time or r.info.start_time) for r in runs])
    most_drivers, most_on_head, peak_rss, peak_pss, peak_head = (max(column) for column in zip(*samples, strict=True))
    gb = 1e9
    print(
        f"\nbounded concurrency: {trials} trials, cap {CAP}, {len(samples)} samples every 0.5 s; at most "
        f"{most_drivers} trial drivers alive at once ({most_on_head} on the head), {most_runs} trial runs open at "
        f"once (MLflow); the trials' processes on the head peaked at {peak_pss / gb:.2f} GB PSS "
        f"({peak_rss / gb:.2f} GB RSS), {peak_pss / max(most_on_head, 1) / gb:.2f} GB PSS per trial "
        f"(reserved {TRIAL_DRIVER_MEMORY / gb:.2f} GB); the whole head peaked at {peak_head / gb:.2f} GB PSS "
        f"({at_rest / gb:.2f} GB at rest); wall {wall:.0f} s"
    )
    assert job.returncode == 0 and f"{trials}/{trials} trials completed" in out, out[-4000:]
    source = f"at most {CAP} trials at once: what the cluster at its largest size (the autoscaler's config "
    assert source + "~/ray_bootstrap_config.yaml) holds" in out, out[:4000]
    assert len(runs) == trials
    assert most_runs <= CAP and most_drivers == CAP, (most_runs, most_drivers)
    # What the trials hold on the head stays within what they reserve there (Ray places no more).
    assert peak_pss <= most_on_head * TRIAL_DRIVER_MEMORY, (peak_pss, most_on_head, TRIAL_DRIVER_MEMORY)


def test_autoscales_from_zero_runs_trials_on_workers_and_back(cluster, teacher, tmp_path):
    cluster.wait_for(_only_head, 120, "the cluster at rest")
    fixed = {**ddp_noise.worker_config(teacher, 0, 1), "optim.epochs": 2}
    space = _space(tmp_path / "space.yaml", fixed, num_samples=2, max_concurrent_trials=2, search={
        "optim.lr": {"loguniform": [0.05, 0.2]}})  # fmt: skip
    submitted = time.time()
    result = cluster.submit(_sweep_args(tmp_path, space, "scale"), env_vars=_job_env(tmp_path), timeout_s=900)
    finished = time.time()
    _assert_succeeded(result, 2)

    seen = cluster.workers()
    assert seen, f"no worker node was launched: {cluster.history()}"
    # Spot (priority 10) before on-demand (1): two trials fit the 8 spot nodes.
    assert set(seen.values()) == {"gpu_spot"}, seen
    first_up = cluster.wait_for(lambda nodes: len(nodes) > 1, 0, "a worker node", after=submitted)
    runs = _trial_runs(tmp_path)
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["afm_ray.trial_status"] == "completed"
        nodes = run.data.tags["ray.node_id"].split(",")
        assert nodes and set(nodes) <= set(seen) and FAKE_HEAD_NODE_ID not in nodes, (nodes, seen)

    gone = cluster.wait_for(_only_head, 4 * IDLE_TIMEOUT_S + 120, "back to the head alone", after=finished)
    print(
        f"\nscale-up: first worker node {first_up - submitted:.0f} s after `ray job submit`; "
        f"{len(seen)} worker node(s) {sorted(set(seen.values()))}; scale-down: head alone "
        f"{gone - finished:.0f} s after the job ended (idle timeout {IDLE_TIMEOUT_S} s)"
    )


def test_ddp_trial_spans_two_nodes_and_matches_one_worker(cluster, teacher, tmp_path):
    from afm_ray.train.loop import LocalReporter, train_fn_per_worker

    fixed = ddp_noise.worker_config(teacher, 0, 2)  # half the global batch per worker
    space = _space(tmp_path / "space.yaml", fixed, resources={"num_workers": 2, "cpus_per_worker": 1})
    result = cluster.submit(_sweep_args(tmp_path, space, "ddp"), env_vars=_job_env(tmp_path), timeout_s=900)
    _assert_succeeded(result, 1)
    (run,) = _trial_runs(tmp_path)
    nodes = run.data.tags["ray.node_id"].split(",")
    assert len(set(nodes)) == 2 and FAKE_HEAD_NODE_ID not in nodes, nodes  # one worker per node
    assert set(nodes) <= set(cluster.workers())
    assert run.data.metrics["run/world_size"] == 2

    with tempfile.TemporaryDirectory() as tmp:  # the same config on one worker, here
        one = train_fn_per_worker(ddp_noise.worker_config(teacher, 0, 1), LocalReporter(tmp, log=lambda line: None))
    two = run.data.metrics
    print(
        "\n1 vs 2 workers (360 test images): "
        + ", ".join(f"{m} {one[m]:.4f} vs {two[m]:.4f}" for m in ddp_noise.METRICS)
        + f" (tolerances {DDP_TOLERANCE})"
    )
    for metric in ddp_noise.METRICS:
        assert abs(two[metric] - one[metric]) <= DDP_TOLERANCE[metric], (metric, one[metric], two[metric])


def test_node_loss_mid_trial_resumes_on_another_node(cluster, teacher, tmp_path):
    # Long enough (about 2 s per epoch here) for the kill to land mid-training; a checkpoint every epoch.
    fixed = {**ddp_noise.worker_config(teacher, 0, 1), "optim.epochs": 30, "run.checkpoint_every": 1}
    space = _space(tmp_path / "space.yaml", fixed, max_failures=2)
    # The store exists before the sweep starts: polling a SQLite store while the sweep creates it
    # would race MLflow's schema migration between the two processes.
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    job = cluster.job(_sweep_args(tmp_path, space, "loss"), env_vars=_job_env(tmp_path))
    try:
        victim, deadline = None, time.monotonic() + 600
        while victim is None and time.monotonic() < deadline:  # the trial's node, once epoch 1 is checkpointed
            time.sleep(1)
            runs = _trial_runs(tmp_path)
            if runs and "ray.node_id" in runs[0].data.tags and _epochs_logged(tmp_path, runs[0].info.run_id) >= 2:
                victim = runs[0].data.tags["ray.node_id"].split(",")[0]
        assert victim, "the trial never reported its first epoch"
        os.kill(cluster.raylet_pid(victim), signal.SIGKILL)
        killed = time.time()
        out, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0 and "1/1 trials completed" in out, out[-4000:]
    cluster.wait_for(lambda nodes: victim not in nodes, 120, "the killed node gone", after=killed)

    (run,) = _trial_runs(tmp_path)  # one run: the trial was resumed, not repeated
    assert run.info.status == "FINISHED" and run.data.tags["afm_ray.trial_status"] == "completed"
    nodes = run.data.tags["ray.node_id"].split(",")
    assert nodes[0] == victim and len(nodes) == 2 and FAKE_HEAD_NODE_ID not in nodes, nodes
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    starts = [m.value for m in client.get_metric_history(run.info.run_id, "run/start_epoch")]
    assert max(starts) >= 1, f"the restarted worker did not resume from a checkpoint: {starts}"
    everything = client.search_runs([run.info.experiment_id])
    assert all(r.info.status == "FINISHED" for r in everything), [(r.info.run_name, r.info.status) for r in everything]
    print(
        f"\nnode loss: killed node {victim[-5:]} after epoch {int(min(s for s in starts if s >= 1))}; "
        f"resumed on node {nodes[1][-5:]}"
    )
