"""Every shipped search space fits every shipped cluster, and the head holds the trials' drivers.

A space's `resources` (afm_ray/search_spaces/*.yaml, read as YAML: afm-ray is not imported) ask for
`num_workers` Ray Train workers of {CPU: cpus_per_worker, GPU: gpus_per_worker, memory:
memory_per_worker GiB} each; `python -m afm_ray.sweep --num-workers/--cpus-per-worker/--gpus-per-worker/
--memory-per-worker` override them. The autoscaler starts a worker node only for a bundle that fits one
of its node types, so a space no type fits waits forever (its trials stay PENDING, `ray status` shows
the demand as infeasible). The node types are read as Ray reads them: a launcher config's declared
`resources` (memory: declared, else what Ray's AWS provider detects, 70 % of the instance's; GCP
detects none), a RayCluster through Ray's own translation of the CR (container limits, rayStartParams).

Each running trial also keeps a Tune function and its Train controller on the head (they ask for no
CPU; measured at 0.77 GB of PSS per trial on the simulated cluster, tests/test_cluster_sim.py): the
head's memory must hold HEAD_BASE_GIB for Ray's own processes, the sweep driver and MLflow plus
TRIAL_DRIVER_GIB per trial the cluster can run at once (bounded by the number of GPUs at the cluster's
largest size, or by the space's num_samples). Both allowances are rounded up from local measurements,
not measurements of a cloud head.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from checks.common import ROOT

SPACES = ROOT / "afm_ray" / "search_spaces"
HEAD_BASE_GIB = 4.0
TRIAL_DRIVER_GIB = 1.0  # afm_ray.sweep.trial.TRIAL_DRIVER_MEMORY (a test keeps them equal)
GIB = 1024**3
SPACE_FLAGS = {  # sweep flag -> the space's resources key it overrides
    "--num-workers": "num_workers",
    "--cpus-per-worker": "cpus_per_worker",
    "--gpus-per-worker": "gpus_per_worker",
    "--memory-per-worker": "memory_per_worker",
}


class Space(NamedTuple):
    name: str
    num_workers: int
    cpus: float
    gpus: float
    memory_gib: float
    num_samples: int | None  # None: a grid, as many trials as points

    def bundle(self) -> str:
        parts = [f"CPU {self.cpus:g}", f"GPU {self.gpus:g}"] + ([f"{self.memory_gib:g} GiB"] if self.memory_gib else [])
        workers = f"{self.num_workers} Train workers of " if self.num_workers != 1 else "a Train worker of "
        return workers + ", ".join(parts)


class NodeType(NamedTuple):
    name: str
    cpus: float
    gpus: float
    memory_gib: float | None  # None: the autoscaler knows no memory for this type
    max_workers: int

    def shape(self) -> str:
        memory = "no memory resource" if self.memory_gib is None else f"{self.memory_gib:.1f} GiB"
        return f"{self.name} (CPU {self.cpus:g}, GPU {self.gpus:g}, {memory}, up to {self.max_workers})"


def shipped_spaces() -> dict[str, Path]:
    """The spaces shipped inside the package, by the name `--space` takes."""
    return {p.stem: p for p in sorted(SPACES.glob("*.yaml"))}


def load_space(name: str, overrides: dict[str, str] | None = None) -> Space | None:
    """A shipped space's resources and budget, with the sweep's per-worker flags applied; None if unknown."""
    path = shipped_spaces().get(name.removesuffix(".yaml"))
    if path is None:
        return None
    raw = yaml.safe_load(path.read_text()) or {}
    resources = {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "memory_per_worker": 0}
    resources.update(raw.get("resources") or {})
    for flag, key in SPACE_FLAGS.items():
        if overrides and flag in overrides:
            resources[key] = float(overrides[flag])
    samples = raw.get("num_samples")
    return Space(
        path.stem,
        int(resources["num_workers"]),
        float(resources["cpus_per_worker"]),
        float(resources["gpus_per_worker"]),
        float(resources["memory_per_worker"]),
        None if (raw.get("sampler") or {}).get("name") == "grid" and samples is None else int(samples or 1),
    )


def slots(space: Space, node: NodeType) -> int:
    """How many of the space's Train workers one node of this type holds."""
    fits = [math.inf]
    for need, have in ((space.cpus, node.cpus), (space.gpus, node.gpus)):
        if need:
            fits.append(math.floor(have / need + 1e-9))
    if space.memory_gib:
        fits.append(0 if node.memory_gib is None else math.floor(node.memory_gib / space.memory_gib + 1e-9))
    found = min(fits)
    return 0 if found == math.inf and not (space.cpus or space.gpus or space.memory_gib) else int(found)


def concurrency(space: Space, workers: list[NodeType]) -> int:
    """The most trials of `space` the cluster runs at once at its largest size."""
    total = sum(slots(space, node) * node.max_workers for node in workers)
    trials = total // max(space.num_workers, 1)
    return trials if space.num_samples is None else min(trials, space.num_samples)


def fit_problems(
    workers: list[NodeType], head_memory_gib: float | None, spaces: list[Space] | None = None
) -> list[str]:
    """Each space fits some worker type; the head holds the drivers of each GPU space's trials."""
    if spaces is None:
        spaces = [s for name in shipped_spaces() if (s := load_space(name))]
    problems = []
    shapes = "; ".join(node.shape() for node in workers) or "none"
    for space in spaces:
        if not any(slots(space, node) for node in workers):
            problems.append(
                f"space {space.name} asks for {space.bundle()}, which no worker type of this cluster holds "
                f"({shapes}): its trials would stay pending; enlarge the types or pass the sweep "
                "--cpus-per-worker/--gpus-per-worker/--memory-per-worker"
            )
            continue
        largest = sum(slots(space, node) * node.max_workers for node in workers)
        if largest < space.num_workers:
            problems.append(
                f"space {space.name} asks for {space.bundle()}; this cluster at its largest holds {largest} of them"
            )
            continue
        if space.gpus and head_memory_gib is not None:
            trials = concurrency(space, workers)
            need = HEAD_BASE_GIB + TRIAL_DRIVER_GIB * trials
            if head_memory_gib < need:
                problems.append(
                    f"the head has {head_memory_gib:g} GiB; space {space.name} runs up to {trials} trials at once "
                    f"here, whose drivers stay on the head: it needs about {need:g} GiB ({HEAD_BASE_GIB:g} + "
                    f"{TRIAL_DRIVER_GIB:g} per trial)"
                )
    return problems


def kuberay_node_types(raycluster: dict) -> tuple[list[NodeType], float | None]:
    """(worker types, the head's memory in GiB) as Ray's autoscaler reads the RayCluster."""
    import copy

    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = copy.deepcopy(raycluster)
    cr["metadata"].setdefault("namespace", "default")
    config = _derive_autoscaling_config_from_ray_cr(cr)
    head, workers = None, []
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources", {})
        memory = resources.get("memory")
        if name == config["head_node_type"]:
            head = memory / GIB if memory is not None else None
            continue
        workers.append(
            NodeType(
                name,
                resources.get("CPU", 0),
                resources.get("GPU", 0),
                None if memory is None else memory / GIB,
                node_type.get("max_workers", 0),
            )
        )
    return workers, head


def launcher_node_types(cfg: dict, machines: dict[str, Any]) -> tuple[list[NodeType], float | None]:
    """(worker types, the head machine's memory in GiB) of a launcher config, `machines` by node type name."""
    provider = cfg["provider"]["type"]
    head_name = cfg.get("head_node_type")
    workers, head = [], None
    for name, node_type in (cfg.get("available_node_types") or {}).items():
        found = machines.get(name)
        if name == head_name:
            head = found.memory_gib if found else None
            continue
        resources = node_type.get("resources") or {}
        memory = resources.get("memory")
        if memory is not None:
            memory = memory / GIB
        elif provider == "aws" and found:
            memory = 0.7 * found.memory_gib  # Ray's AWS provider: the instance's memory less the object store
        workers.append(
            NodeType(
                name,
                resources.get("CPU", found.vcpus if found else 0),
                resources.get("GPU", 0),
                memory,
                node_type.get("max_workers", cfg.get("max_workers", 2)),
            )
        )
    return workers, head
