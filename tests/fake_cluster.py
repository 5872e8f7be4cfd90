"""An autoscaling Ray cluster on one machine, shaped like clusters/aws.yaml, for tests.

Ray's fake multi-node provider (`FakeMultiNodeProvider`, with `RAY_FAKE_CLUSTER=1`) lets the real
autoscaler (v2, as `ray up` runs it) launch and terminate worker nodes that are local raylets.
`simulated_config` derives its node types from the shipped AWS config: the same type names,
min/max workers and priorities, GPUs replaced by one CPU each (none exist here, and a Train worker
that asks for a GPU uses NCCL and CUDA), memory left to what `ray start` detects, the idle timeout
shortened, a head of 0 CPUs. Ray's `AutoscalingCluster` would read an example YAML its wheel does
not ship, so the config is written here: where `ray up` puts it on a head, `~/ray_bootstrap_config.yaml`
(the `HOME` of `env`), so a sweep's driver finds the autoscaler's node types where it finds them on AWS
or GCP (afm_ray.sweep.capacity).

The provider's nodes dial the GCS at `provider.gcs_address` (else the default port 6379, which
another Ray on the machine may hold): it is set to the head's own free port. Every fake node shares
the head's temp dir, which is the head's own (`ray_head` gives it one). The nodes are started by
the head's autoscaler process, so they belong to the head's session and are stopped with it;
`simulated_cluster` checks that no process of its temp dir outlives the cluster, and stops any it
finds (they are its own: nothing else uses that temp dir).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from ray_head import RAY, free_port, ray_head, session_processes

ROOT = Path(__file__).resolve().parents[1]
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the fake provider's own
FAKE_HEAD_NODE_TYPE = "ray.head.default"  # the type the fake provider gives its head, whatever the config says


def simulated_config(
    aws: Mapping[str, Any], *, gcs_address: str, idle_timeout_s: float, maxima: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """clusters/aws.yaml's node types on the fake multi-node provider (its head under the fake
    provider's own type name, which the autoscaler must find among the node types); `maxima` lowers
    some types' max_workers (and the cluster's) for a test that fills the cluster on 2 cores."""
    maxima = maxima or {}
    head = FAKE_HEAD_NODE_TYPE
    types: dict[str, Any] = {head: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, node_type in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            continue
        # The fake provider starts a node with every resource but CPU and GPU as a custom one, which
        # Ray refuses for `memory`: a fake node has this machine's memory, as `ray start` detects it.
        resources = {k: v for k, v in node_type["resources"].items() if k not in ("CPU", "GPU", "memory")}
        types[name] = {
            "resources": {**resources, "CPU": 1},  # one CPU stands for the GPU a trial asks for
            "node_config": {},
            "min_workers": node_type.get("min_workers", 0),
            "max_workers": maxima.get(name, node_type["max_workers"]),
            "priority": node_type.get("priority", 0),
        }
    return {
        "cluster_name": f"{aws['cluster_name']}-simulated",
        "max_workers": min(
            aws["max_workers"],
            sum(
                maxima.get(n, t.get("max_workers", 0))
                for n, t in aws["available_node_types"].items()
                if n != aws["head_node_type"]
            ),
        ),
        "upscaling_speed": aws.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            # The fake provider's class, loaded as an external provider: as type fake_multinode, the
            # autoscaler would first read the provider's default config, the example YAML that the
            # Ray wheel does not ship, and die.
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "gcs_address": gcs_address,
            "head_node_id": FAKE_HEAD_NODE_ID,
            "launch_multiple": True,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": types,
        "head_node_type": head,
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{key: [] for key in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def node_ip() -> str:
    """The address Ray's nodes advertise on this machine (what the fake nodes dial)."""
    code = "import ray._private.services as s; print(s.get_node_ip_address())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


# Polls the cluster from its own process (Ray reads RAY_AUTH_MODE once per process): one JSON line
# per change of the alive nodes, with the autoscaler's instance types.
POLLER = """
import json, sys, time
import ray
from ray.autoscaler.v2.sdk import get_cluster_status
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
last = None
while True:
    alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    try:
        status = get_cluster_status(sys.argv[1])
        types = {n.node_id: n.ray_node_type_name for n in status.active_nodes + status.idle_nodes}
    except Exception:
        types = {}
    state = {node: types.get(node, "?") for node in sorted(alive)}
    if state != last and "?" not in state.values():
        print(json.dumps({"t": time.time(), "nodes": state}), flush=True)
        last = state
    time.sleep(0.5)
"""


class Cluster:
    """A running simulated cluster: its addresses, and what its nodes did."""

    def __init__(self, head: dict[str, str], env: dict[str, str], log: Path):
        self.gcs, self.dashboard, self.temp_dir = head["gcs"], head["dashboard"], head["temp_dir"]
        self.session = int(head["pid"])  # every process of the cluster, fake nodes included, is in its session
        self.env, self.log = env, log

    def history(self) -> list[dict[str, Any]]:
        """Every change of the alive nodes so far: {"t": unix time, "nodes": {node id: type name}}."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def workers(self) -> dict[str, str]:
        """Every worker node seen alive so far, with its type."""
        return {n: t for state in self.history() for n, t in state["nodes"].items() if n != FAKE_HEAD_NODE_ID}

    def alive(self) -> dict[str, str]:
        history = self.history()
        return history[-1]["nodes"] if history else {}

    def wait_for(self, predicate: Any, timeout_s: float, what: str, *, after: float = 0.0) -> float:
        """Wait until predicate(alive nodes) holds at or after unix time `after`; returns when it began
        to hold (`after` itself if it already held then)."""
        deadline = time.monotonic() + timeout_s
        while True:
            history = self.history()
            before = [s for s in history if s["t"] < after]
            if before and predicate(before[-1]["nodes"]):
                return after
            for state in history:
                if state["t"] >= after and predicate(state["nodes"]):
                    return state["t"]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout_s:.0f} s; nodes seen: {history}")
            time.sleep(0.5)

    def raylet_pid(self, node_id: str) -> int:
        """The raylet process of one node (its node id is on its command line)."""
        for pid in _pids_of(self.temp_dir):
            cmdline = _cmdline(pid)
            if "raylet" in cmdline.split(" ", 1)[0] and f"--node_id={node_id}" in cmdline:
                return pid
        raise LookupError(f"no raylet of node {node_id} running")

    def processes(self) -> list[dict[str, Any]]:
        """Every process of the cluster now: {"pid", "title" (its command line, or the `ray::Class.method`
        title Ray gives a worker), "head" (on the head node, not on a fake worker node), "rss" and "pss"
        (bytes: resident, and resident with each shared page divided among the processes that map it)}."""
        pids = session_processes(self.session)
        worker_nodes: set[int] = set()
        for pid in pids:  # a fake node's raylet, and what it started (its workers and agents)
            cmdline = _cmdline(pid)
            if "raylet" in cmdline.split(" ", 1)[0] and f"--node_id={FAKE_HEAD_NODE_ID}" not in cmdline:
                worker_nodes |= {pid} | _descendants(pid)
        found = []
        for pid in pids:
            title, rss = _cmdline(pid).strip(), _rss(pid)
            if title and rss is not None:
                found.append(
                    {"pid": pid, "title": title, "head": pid not in worker_nodes, "rss": rss, "pss": _pss(pid)}
                )
        return found

    def job(self, args: list[str], *, env_vars: Mapping[str, str]) -> subprocess.Popen:
        """`ray job submit -- python -m afm_ray.sweep ...`, running (stdout and stderr in one pipe), with
        no working dir: the job runs the installed package, as on a cluster of the afm-ray image."""
        runtime_env = json.dumps({"env_vars": dict(env_vars)})
        command = [RAY, "job", "submit", "--address", self.dashboard, "--runtime-env-json", runtime_env, "--"]
        return subprocess.Popen(
            [*command, "python", "-m", "afm_ray.sweep", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def submit(self, args: list[str], *, env_vars: Mapping[str, str], timeout_s: float) -> tuple[int, str]:
        """The job to its end: (exit status of `ray job submit`, its output: the driver's log)."""
        job = self.job(args, env_vars=env_vars)
        try:
            out, _ = job.communicate(timeout=timeout_s)
        finally:
            if job.poll() is None:
                job.kill()
        return job.returncode, out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _rss(pid: int) -> int | None:
    """The resident memory of a process in bytes (None once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return 0  # a zombie: no memory left


def _pss(pid: int) -> int:
    """A process's proportional set size in bytes (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _pids_of(temp_dir: str) -> list[int]:
    """Processes whose command line names `temp_dir` (raylets, GCS, agents: this cluster's only)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and temp_dir in _cmdline(int(p))]


def _descendants(root: int) -> set[int]:
    """Every process below `root` in the process tree, however deep."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():  # /proc/self, /proc/thread-self
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """The start time of a process (field 22 of /proc/pid/stat): with the pid, its identity."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextmanager
def simulated_cluster(
    env: Mapping[str, str], *, idle_timeout_s: float, maxima: Mapping[str, int] | None = None
) -> Iterator[Cluster]:
    """The cluster of clusters/aws.yaml's node types, running; stopped (only its processes) on exit.

    `env` must carry RAY_AUTH_MODE=token and a HOME whose ~/.ray/auth_token exists (a token made
    with `ray get-auth-token --generate`): `ray job submit` needs token authentication.
    """
    aws = yaml.safe_load((ROOT / "clusters" / "aws.yaml").read_text())
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="afm-ray-sim-"))
    config = Path(env["HOME"]) / "ray_bootstrap_config.yaml"  # JSON, as `ray up` writes it
    config.write_text(
        json.dumps(
            simulated_config(aws, gcs_address=f"{node_ip()}:{port}", idle_timeout_s=idle_timeout_s, maxima=maxima)
        )
    )
    env = {
        **env,
        "RAY_FAKE_CLUSTER": "1",
        "RAY_enable_autoscaler_v2": "1",  # what `ray up` runs since Ray 2.50
        "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    }
    with ray_head(env, f"--autoscaling-config={config}", num_cpus=0, port=port) as head:
        log = workdir / "nodes.jsonl"
        with open(log, "w") as out:
            poller = subprocess.Popen(
                [sys.executable, "-c", POLLER, head["gcs"]], env=env, stdout=out, stderr=subprocess.DEVNULL
            )
        cluster = Cluster(head, env, log)
        try:
            cluster.wait_for(lambda nodes: FAKE_HEAD_NODE_ID in nodes, 120, "the head")
            yield cluster
        finally:
            poller.send_signal(signal.SIGTERM)
            poller.wait(timeout=30)
            # Everything the head started, the fake nodes the autoscaler launched included.
            tree = {pid: _started(pid) for pid in _descendants(int(head["pid"])) | set(_pids_of(head["temp_dir"]))}
            outside = {pid for pid in tree if _sid(pid) not in (None, int(head["pid"]))}
    # ray_head stopped the head's session; a process of this cluster still running (the same pid
    # and start time, so never a newcomer that reused a pid) is stopped here.
    for pid, started in tree.items():
        if started is not None and _started(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    assert not outside, f"processes of the simulated cluster outside the head's session: {sorted(outside)}"
