"""How many trials a sweep runs at once: never more than the cluster holds at its largest size.

Tune's `max_concurrent_trials` is never left unbounded. Every running trial keeps its Tune function
and the Train controller Ray pins beside it (afm_ray.sweep.trial.TRIAL_DRIVER_MEMORY) on whatever
node its driver landed, the head included, while its Train workers wait for a GPU node; and a
sampler that draws every point before any result comes back is random search. So the cap is the
number of trials whose Train workers fit the cluster at its largest size, or the cap the space (or
`--max-concurrent-trials`) states, whichever is lower.

What the cluster can provide is read where Ray's own code reads it; the first source found wins:

1. the cluster config in the GCS (`ray._private.state.state.get_cluster_config()`: node groups and
   their `max_count`, read by Ray Train V2 and Ray Data). Ray 2.60's own autoscalers never write
   it (ray-project/ray#63012); a platform that reports it is read first.
2. KubeRay: the RayCluster named by `$RAY_CLUSTER_NAME` (KubeRay sets it on every Ray container) in
   the pod's namespace, fetched and translated by Ray's `AutoscalingConfigProducer`, exactly what the
   in-tree autoscaler reads. It needs the head's service account, which KubeRay binds to the
   autoscaler's Role (get rayclusters); a `ray job submit` entrypoint runs in the head container.
3. `ray up`: `~/ray_bootstrap_config.yaml`, the config `ray up` puts on the head for its autoscaler
   (`ray start --autoscaling-config=~/ray_bootstrap_config.yaml`), parsed by the v2 autoscaler's
   own `FileConfigReader`.
4. Otherwise the nodes alive now: all there is for a fixed cluster, and for a local Ray the sweep
   started itself; for a cluster whose autoscaler could not be read, a stated cap wins.

The head is always counted as it runs (its live resources), whatever its node type declares.
Everything but `cluster_capacity` is Ray-free (the dry run uses `machine_capacity`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from afm_ray.errors import ClusterError, one_line
from afm_ray.search.specs import GIB, TrialResources

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the autoscaler's config on the head
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
HEAD_RESOURCE = "node:__internal_head__"  # Ray marks its head node with this resource
UNBOUNDED = -1  # a node group with no maximum (the GCS cluster config's max_count -1)


@dataclass(frozen=True)
class NodeGroup:
    """One node type: what each of its nodes offers Ray (memory in bytes), and how many it may have."""

    name: str
    resources: Mapping[str, float]
    count: int  # nodes of this type at the cluster's largest size (UNBOUNDED: no maximum)
    head: bool = False


@dataclass(frozen=True)
class Capacity:
    """What a cluster can provide, and where that was read."""

    groups: tuple[NodeGroup, ...]
    source: str  # what the groups are, said as "what {source} holds"
    largest: bool  # the cluster at its largest size (an autoscaler's config, a fixed cluster); else only its nodes now
    max_workers: int | None = None  # the autoscaler's bound on worker nodes, all types together
    max_resources: Mapping[str, float] = field(default_factory=dict)  # a bound on each resource, cluster-wide

    def describe(self) -> str:
        def shape(group: NodeGroup) -> str:
            parts = [
                f"{name} {amount / GIB:.1f} GiB" if name == "memory" else f"{name} {amount:g}"
                for name, amount in sorted(group.resources.items())
                if name in ("CPU", "GPU", "memory")
            ]
            count = "unbounded" if group.count == UNBOUNDED else f"{group.count} x"
            return f"{group.name} {count} {{{', '.join(parts) or 'nothing'}}}"

        return "; ".join(shape(g) for g in self.groups) or "no nodes"


class Concurrency(NamedTuple):
    """The number of trials a sweep runs at once, and where it came from (printed with it)."""

    trials: int
    source: str


def worker_slots(resources: TrialResources, node: Mapping[str, float]) -> float:
    """How many of the trial's Train workers one node holds (inf for a worker that asks nothing)."""
    return min(
        (math.floor(node.get(name, 0) / amount + 1e-9) for name, amount in resources.worker_bundle().items()),
        default=math.inf,
    )


def trials_that_fit(resources: TrialResources, capacity: Capacity) -> float:
    """The most trials of `resources` the cluster runs at once (a trial's workers may span nodes)."""
    # (workers per node, nodes, the head itself): the head is always there; more nodes of its type (a
    # config may allow them) and of the other types count against the autoscaler's bound on workers.
    nodes = []
    for group in capacity.groups:
        per_node = worker_slots(resources, group.resources)
        count = math.inf if group.count == UNBOUNDED else group.count
        if group.head:
            nodes.append((per_node, 1, True))
            count -= 1
        nodes.append((per_node, count, False))
    slots = 0.0
    workers_left = math.inf if capacity.max_workers is None else capacity.max_workers
    for per_node, count, head in sorted(nodes, key=lambda n: (not n[2], -n[0])):  # fill the roomiest types first
        if not head:
            count = min(count, workers_left)
            workers_left -= count
        if per_node and count:
            slots += per_node * count
    for name, amount in resources.worker_bundle().items():
        if name in capacity.max_resources:
            slots = min(slots, math.floor(capacity.max_resources[name] / amount + 1e-9))
    return slots if math.isinf(slots) else slots // resources.num_workers


def resolve_concurrency(
    resources: TrialResources, stated: int, num_samples: int, capacity: Capacity | None
) -> Concurrency:
    """The sweep's cap: `stated` (the space's max_concurrent_trials or --max-concurrent-trials; 0 for
    none), lowered to what `capacity` holds when that is the cluster at its largest size; never above
    `num_samples`. `capacity` None: the stated cap alone (a dry run that reads no cluster)."""
    said = f"the stated cap {stated} (max_concurrent_trials or --max-concurrent-trials)"
    if capacity is None:
        if not stated:
            raise ValueError("max_concurrent_trials 0 is resolved from a capacity")
        trials, source = float(stated), said
    else:
        fit = trials_that_fit(resources, capacity)
        where = f"{capacity.source}: {capacity.describe()}"
        held = f"what {capacity.source} holds ({capacity.describe()})"
        if capacity.largest:
            if fit < 1:
                raise ClusterError(
                    f"no node of {capacity.source} holds a Train worker of {_bundle(resources)} "
                    f"({capacity.describe()}): "
                    "its trials would wait forever; pass --cpus-per-worker, "
                    "--gpus-per-worker or --memory-per-worker, or run on a cluster whose nodes fit it"
                )
            if stated and stated <= fit:
                trials, source = float(stated), said
            else:
                trials = fit
                source = held + (f", below {said}" if stated else "")
        elif stated:
            trials, source = float(stated), f"{said}; what {capacity.source} holds: {fit:g} ({capacity.describe()})"
        elif fit >= 1:
            trials, source = fit, held
        else:
            raise ClusterError(
                f"cannot tell how many trials to run at once: no node alive now holds a Train worker of "
                f"{_bundle(resources)} ({where}); pass --max-concurrent-trials N (or state max_concurrent_trials "
                "in the space)"
            )
    if trials > num_samples:
        return Concurrency(num_samples, f"all {num_samples} trials of the space; {source}")
    return Concurrency(int(trials), source)


def _bundle(resources: TrialResources) -> str:
    parts = [f"{k} {v / GIB:g} GiB" if k == "memory" else f"{k} {v:g}" for k, v in resources.worker_bundle().items()]
    return "{" + ", ".join(parts) + "}"


def machine_capacity() -> Capacity:
    """This machine as a local Ray would see it, without starting one: CPUs (within a cgroup v2 quota),
    CUDA devices, and memory as Ray counts it (70 % of what is available; the rest is its object store)."""
    import torch

    cpus = float(os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    memory = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                memory = 0.7 * int(line.split()[1]) * 1024
    except OSError:
        pass
    resources = {"CPU": cpus, "GPU": float(torch.cuda.device_count()), "memory": memory}
    where = "this machine (a sweep without --address runs its own Ray here)"
    return Capacity((NodeGroup("this machine", resources, 1, head=True),), where, largest=True)


def from_autoscaling_config(raw: Mapping[str, Any], source: str) -> Capacity:
    """The node types of an autoscaler config (a `ray up` YAML, or Ray's translation of a RayCluster),
    read with the v2 autoscaler's own parser: each type's resources and maximum (the head: one)."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    config = AutoscalingConfig(dict(raw), skip_content_hash=True)
    head = config.get_head_node_type()
    groups = tuple(
        NodeGroup(name, dict(node.resources), node.max_worker_nodes, head=name == head)
        for name, node in (config.get_node_type_configs() or {}).items()
    )
    return Capacity(groups, source, largest=True, max_workers=config.get_max_num_worker_nodes())


def cluster_capacity(started_here: bool) -> Capacity:
    """What the connected Ray cluster can provide (see the module's docstring for the order).

    `started_here`: the sweep started this Ray itself (no --address), so its nodes are all it has.
    """
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if started_here:
        return _alive(alive, "the local Ray this sweep started", largest=True)
    unread = []
    for read in (_gcs_cluster_config, _kuberay_cluster, _ray_up_config):
        found = read()
        if isinstance(found, Capacity):
            return _with_live_head(found, alive)
        if found:
            unread.append(found)
    why = f": {'; '.join(unread)}" if unread else ""
    return _alive(alive, f"the nodes alive now (no autoscaler config found{why})", largest=False)


def read_capacity(address: str) -> Capacity:
    """`cluster_capacity` of the cluster at `address`, for a dry run: joined, read, left."""
    import ray

    from afm_ray.sweep.local_ray import connect_or_start

    try:
        connect_or_start(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:  # auth, version mismatch, a head that went away
        raise ClusterError(f"Ray at {address}: {one_line(exc)}") from None
    try:
        return cluster_capacity(started_here=False)
    finally:
        ray.shutdown()


def _gcs_cluster_config() -> Capacity | str | None:
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    groups = tuple(
        NodeGroup(g.name or f"group {i}", dict(g.resources), UNBOUNDED if g.max_count == -1 else int(g.max_count))
        for i, g in enumerate(config.node_group_configs)
    )
    source = "the cluster at its largest size (the cluster config in Ray's GCS)"
    return Capacity(groups, source, largest=True, max_resources=dict(config.max_resources))


def _kuberay_cluster() -> Capacity | str | None:
    name = os.environ.get("RAY_CLUSTER_NAME")
    if not name or not SERVICE_ACCOUNT_NAMESPACE.is_file():
        return None
    namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer

    try:
        raw = AutoscalingConfigProducer(name, namespace)()
    except Exception as exc:  # no API access, RBAC, a CR gone: fall back to the nodes alive now
        return f"RayCluster {namespace}/{name}: {one_line(exc)[:200]}"
    return from_autoscaling_config(
        raw, f"the cluster at its largest size (RayCluster {namespace}/{name}, as Ray's autoscaler reads it)"
    )


def _ray_up_config() -> Capacity | str | None:
    path = Path(BOOTSTRAP_CONFIG).expanduser()
    if not path.is_file():
        return None
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
        where = f"the cluster at its largest size (the autoscaler's config {BOOTSTRAP_CONFIG})"
        return from_autoscaling_config(raw, where)
    except Exception as exc:  # a config the autoscaler could not have started from either
        return f"{BOOTSTRAP_CONFIG}: {one_line(exc)[:200]}"


def _resources(node: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in (node.get("Resources") or {}).items()}


def _alive(nodes: list[Mapping[str, Any]], source: str, *, largest: bool) -> Capacity:
    groups = tuple(
        NodeGroup(f"node {n.get('NodeManagerAddress', '?')}", _resources(n), 1, head=HEAD_RESOURCE in _resources(n))
        for n in nodes
    )
    return Capacity(groups, source, largest=largest)


def _with_live_head(capacity: Capacity, alive: list[Mapping[str, Any]]) -> Capacity:
    """The head group as the head runs (a config may declare none of its resources)."""
    head = next((_resources(n) for n in alive if HEAD_RESOURCE in _resources(n)), None)
    if head is None:
        return capacity
    groups = tuple(NodeGroup(g.name, head, g.count, head=True) if g.head else g for g in capacity.groups)
    return Capacity(groups, capacity.source, capacity.largest, capacity.max_workers, capacity.max_resources)
