"""How many trials a sweep runs at once (afm_ray.sweep.capacity, issue 19): never unbounded, never more
than the cluster holds at its largest size.

- the shipped clusters, read with Ray's own parsers (the v2 autoscaler's config reader; Ray's
  translation of the RayCluster), hold 10 trials of every CIFAR space, the figure clusters/check.py
  computes and the spaces state;
- the arithmetic: node types and their maxima, the autoscaler's bound on workers, trials of several
  workers, memory, a cluster-wide bound, a group with no maximum;
- which number wins: a stated cap, what the cluster holds, the nodes alive now when no autoscaler
  config is readable; a cluster no trial fits is one line;
- `--dry-run --format json` prints an integer for every shipped space, and the sweep's flags override;
- on a real Ray head (slow): the nodes alive now, then `ray up`'s ~/ray_bootstrap_config.yaml, then a
  cluster config reported to the GCS, each found where Ray keeps it.

The simulated autoscaling cluster (tests/test_cluster_sim.py) shows the cap holding during a sweep.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray_head import ray_head

from afm_ray.errors import ClusterError
from afm_ray.search.space import load_search_space, shipped_spaces
from afm_ray.search.specs import GIB, TrialResources
from afm_ray.sweep.__main__ import main as sweep_main
from afm_ray.sweep.capacity import (
    UNBOUNDED,
    Capacity,
    NodeGroup,
    from_autoscaling_config,
    resolve_concurrency,
    trials_that_fit,
)
from afm_ray.sweep.trial import TRIAL_DRIVER_MEMORY, TrialRuntime, build_trainer

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
CIFAR_SPACES = ("cifar10_resnet18", "cifar100_mobilenetv2", "study_methods_cifar10")


def _load_fit_check():
    # clusters/ is not a package: load check.py by its path (it puts clusters/ on sys.path for checks.*).
    spec = importlib.util.spec_from_file_location("clusters_check", CLUSTERS / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CHECKS["fit"]


fit = _load_fit_check()


@pytest.fixture(autouse=True)
def _quiet_ray_config_logs():
    logger = logging.getLogger("ray.autoscaler")  # prepare_config logs a line per node type
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def shipped_clusters() -> dict[str, Capacity]:
    """Each shipped cluster as the sweep's driver reads it on its head."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    found = {
        name: from_autoscaling_config(yaml.safe_load((CLUSTERS / name).read_text()), name)
        for name in ("aws.yaml", "gcp.yaml")
    }
    docs = yaml.safe_load_all((CLUSTERS / "kuberay" / "raycluster.yaml").read_text())
    cr = copy.deepcopy(next(d for d in docs if d and d.get("kind") == "RayCluster"))
    cr["metadata"].setdefault("namespace", "default")
    found["kuberay/raycluster.yaml"] = from_autoscaling_config(_derive_autoscaling_config_from_ray_cr(cr), "kuberay")
    return found


def test_every_cifar_space_states_the_cap_every_shipped_cluster_holds():
    """The CIFAR spaces' max_concurrent_trials is what each shipped cluster holds at its largest size,
    read with Ray's own parsers, and what clusters/check.py computes from the same files."""
    clusters = shipped_clusters()
    for name in CIFAR_SPACES:
        space = load_search_space(name)
        assert space.max_concurrent_trials == 10, name
        for cluster, capacity in clusters.items():
            assert trials_that_fit(space.resources, capacity) == 10, (name, cluster, capacity.describe())
            resolved = resolve_concurrency(space.resources, 0, space.num_samples, capacity)
            assert resolved.trials == 10 and "at its largest size" in capacity.source or cluster.endswith(".yaml")
            assert fit.concurrency(fit.load_space(name), _fit_node_types(capacity)) == 10, (name, cluster)


def _fit_node_types(capacity: Capacity) -> list:
    return [
        fit.NodeType(
            g.name,
            g.resources.get("CPU", 0),
            g.resources.get("GPU", 0),
            g.resources["memory"] / GIB if "memory" in g.resources else None,
            g.count,
        )
        for g in capacity.groups
        if not g.head
    ]


def test_every_shipped_space_fits_every_shipped_cluster_as_check_py_says():
    """The package and clusters/check.py count the same trials for every space on every cluster, with
    the sweep's per-worker flags applied on both sides."""
    for cluster, capacity in shipped_clusters().items():
        for name in shipped_spaces():
            for flags in ({}, {"--cpus-per-worker": "2", "--memory-per-worker": "8"}, {"--num-workers": "3"}):
                space = load_search_space(name)
                resources = TrialResources(**{
                    **space.resources.__dict__,
                    **{fit.SPACE_FLAGS[f]: (int if f == "--num-workers" else float)(v) for f, v in flags.items()},
                })  # fmt: skip
                checked = fit.load_space(name, flags)
                ours = trials_that_fit(resources, capacity)
                if checked.num_samples is not None:  # a grid's size is known to the package only
                    ours = min(ours, space.num_samples)
                assert ours == fit.concurrency(checked, _fit_node_types(capacity)), (cluster, name, flags)


def test_the_trial_driver_reservation_is_the_head_allowance_check_py_sizes_heads_with():
    assert TRIAL_DRIVER_MEMORY == fit.TRIAL_DRIVER_GIB * GIB


GPU_NODE = {"CPU": 4, "GPU": 1, "memory": 16 * GIB}


def _cluster(*groups: NodeGroup, max_workers: int | None = None, largest: bool = True, **kw) -> Capacity:
    return Capacity(groups, "a test cluster", largest=largest, max_workers=max_workers, **kw)


@pytest.mark.parametrize(
    ("resources", "capacity", "trials"),
    [
        # one trial per GPU node, the head (no GPU) holds none
        (TrialResources(cpus_per_worker=4, gpus_per_worker=1),
         _cluster(NodeGroup("head", {"CPU": 0}, 1, head=True), NodeGroup("spot", GPU_NODE, 8),
                  NodeGroup("ondemand", GPU_NODE, 2)), 10),
        # the autoscaler starts at most 6 worker nodes, whatever the types allow
        (TrialResources(cpus_per_worker=4, gpus_per_worker=1),
         _cluster(NodeGroup("spot", GPU_NODE, 8), NodeGroup("ondemand", GPU_NODE, 2), max_workers=6), 6),
        # ... and fills them with the type whose nodes hold the most workers
        (TrialResources(cpus_per_worker=1),
         _cluster(NodeGroup("small", {"CPU": 1}, 4), NodeGroup("big", {"CPU": 8}, 2), max_workers=3), 17),
        # a CPU trial also fits the head's CPUs
        (TrialResources(cpus_per_worker=2),
         _cluster(NodeGroup("head", {"CPU": 4}, 1, head=True), NodeGroup("w", {"CPU": 8}, 2)), 10),
        # more nodes of the head's type, within the bound on workers
        (TrialResources(cpus_per_worker=4),
         _cluster(NodeGroup("head", {"CPU": 4}, 3, head=True), NodeGroup("w", {"CPU": 4}, 5), max_workers=4), 5),
        # trials of 3 workers: 10 workers' worth of nodes hold 3 of them
        (TrialResources(num_workers=3, cpus_per_worker=4, gpus_per_worker=1),
         _cluster(NodeGroup("spot", GPU_NODE, 10)), 3),
        # memory: 16 GiB nodes hold two workers of 8 GiB; a type that declares no memory holds none
        (TrialResources(cpus_per_worker=1, memory_per_worker=8),
         _cluster(NodeGroup("a", {"CPU": 4, "memory": 16 * GIB}, 2), NodeGroup("b", {"CPU": 4}, 5)), 4),
        # a cluster-wide bound (the GCS cluster config's max_resources)
        (TrialResources(cpus_per_worker=4, gpus_per_worker=1),
         _cluster(NodeGroup("spot", GPU_NODE, 8), max_resources={"GPU": 5}), 5),
        # a group with no maximum: as many trials as asked
        (TrialResources(cpus_per_worker=4, gpus_per_worker=1),
         _cluster(NodeGroup("spot", GPU_NODE, UNBOUNDED)), float("inf")),
    ],
)  # fmt: skip
def test_trials_that_fit(resources, capacity, trials):
    assert trials_that_fit(resources, capacity) == trials


ONE_GPU = TrialResources(cpus_per_worker=4, gpus_per_worker=1)
TEN_GPUS = _cluster(NodeGroup("spot", GPU_NODE, 10))
GPUS_NOW = _cluster(NodeGroup("node 1", GPU_NODE, 1), NodeGroup("node 2", GPU_NODE, 1), largest=False)
NO_GPU_NOW = _cluster(NodeGroup("head", {"CPU": 0}, 1, head=True), largest=False)


@pytest.mark.parametrize(
    ("stated", "num_samples", "capacity", "trials", "said"),
    [
        (0, 48, TEN_GPUS, 10, "what a test cluster holds"),
        (4, 48, TEN_GPUS, 4, "the stated cap 4"),
        (30, 48, TEN_GPUS, 10, "below the stated cap 30"),  # never more than the cluster holds
        (0, 6, TEN_GPUS, 6, "all 6 trials of the space"),
        (0, 48, GPUS_NOW, 2, "what a test cluster holds"),  # no autoscaler config: the nodes alive now
        (8, 48, GPUS_NOW, 8, "the stated cap 8"),  # ... which may grow: a stated cap wins
        (8, 48, NO_GPU_NOW, 8, "what a test cluster holds: 0"),
        (10, 48, None, 10, "the stated cap 10"),  # a dry run that reads no cluster
    ],
)
def test_which_number_wins(stated, num_samples, capacity, trials, said):
    resolved = resolve_concurrency(ONE_GPU, stated, num_samples, capacity)
    assert resolved.trials == trials and said in resolved.source, resolved


def test_no_number_is_one_line_naming_the_way_out():
    with pytest.raises(ClusterError, match=r"no node of a test cluster holds a Train worker of \{CPU 4, GPU 1\}"):
        resolve_concurrency(ONE_GPU, 10, 48, _cluster(NodeGroup("cpu", {"CPU": 8}, 4)))
    with pytest.raises(ClusterError, match="pass --max-concurrent-trials N"):
        resolve_concurrency(ONE_GPU, 0, 48, NO_GPU_NOW)


def _dry_run(capsys, *args: str) -> dict:
    assert sweep_main(["--dry-run", "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_prints_the_number_and_the_sweeps_flags_override_the_space(capsys):
    """(Every shipped space's number: tests/test_dry_run.py.) On this machine, the embedded default's
    trials at once are its CPUs; the flags replace the space's cap and each trial's resources."""
    plan = _dry_run(capsys)
    assert plan["max_concurrent_trials"] == min(os.cpu_count(), plan["num_samples"])
    assert "this machine" in plan["max_concurrent_trials_source"]
    assert _dry_run(capsys, "--max-concurrent-trials", "3")["max_concurrent_trials"] == 3
    plan = _dry_run(
        capsys, "--num-workers", "2", "--cpus-per-worker", "0.5", "--gpus-per-worker", "0", "--memory-per-worker", "1"
    )  # fmt: skip
    assert plan["resources"] == {
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "gpus_per_worker": 0.0,
        "memory_per_worker": 1.0,
    }
    assert plan["max_concurrent_trials"] == min(os.cpu_count() * 2 // 2, plan["num_samples"])  # 2 workers a trial


def test_train_workers_ask_ray_for_their_memory(tmp_path):
    runtime = TrialRuntime(TrialResources(cpus_per_worker=2, memory_per_worker=3), str(tmp_path), max_failures=0)
    trainer = build_trainer({}, runtime, name="t")
    assert trainer.scaling_config.resources_per_worker == {"CPU": 2.0, "memory": 3 * GIB}


# Reads the connected cluster's capacity as the sweep's driver does, from its own process.
READ = """
import json, sys
import ray
from afm_ray.sweep.capacity import cluster_capacity
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
c = cluster_capacity(started_here=False)
print(json.dumps({"source": c.source, "largest": c.largest, "max_workers": c.max_workers,
                  "groups": [[g.name, dict(g.resources), g.count, g.head] for g in c.groups]}))
"""


@pytest.mark.slow
def test_each_source_is_found_where_ray_keeps_it(tmp_path):
    """On a real head: the nodes alive now; then the config `ray up` leaves in ~/ray_bootstrap_config.yaml
    (aws.yaml, as the autoscaler parses it; the head as it runs); then a cluster config in the GCS, which
    wins (Ray 2.60's autoscalers write none: it is reported here as a platform would)."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_CLUSTER_NAME")}
    env.update(HOME=str(home), RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))

    def read(address: str) -> dict:
        proc = subprocess.run([sys.executable, "-c", READ, address], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ray_head(env, num_cpus=2) as head:
        alive = read(head["gcs"])
        assert not alive["largest"] and alive["source"].startswith("the nodes alive now")
        assert [g[1]["CPU"] for g in alive["groups"]] == [2.0] and alive["groups"][0][3]  # the head

        (home / "ray_bootstrap_config.yaml").write_text(json.dumps(yaml.safe_load((CLUSTERS / "aws.yaml").read_text())))
        bootstrap = read(head["gcs"])
        assert bootstrap["largest"] and "~/ray_bootstrap_config.yaml" in bootstrap["source"]
        assert bootstrap["max_workers"] == 10
        groups = {name: (resources, count, is_head) for name, resources, count, is_head in bootstrap["groups"]}
        assert groups["gpu_spot"][1:] == (8, False) and groups["gpu_ondemand"][1:] == (2, False)
        assert groups["head"][0]["CPU"] == 2.0 and groups["head"][2]  # as the head runs, not its declared 0

        config = autoscaler_pb2.ClusterConfig(
            node_group_configs=[
                autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 4, "GPU": 1}, max_count=3),
                autoscaler_pb2.NodeGroupConfig(name="cpu", resources={"CPU": 16}, max_count=-1),
            ],
            max_resources={"CPU": 40},
        )
        GcsClient(address=head["gcs"]).report_cluster_config(config.SerializeToString())
        gcs = read(head["gcs"])
        assert gcs["largest"] and "cluster config in Ray's GCS" in gcs["source"]
        assert [(name, count) for name, _, count, _ in gcs["groups"]] == [("gpu", 3), ("cpu", UNBOUNDED)]
