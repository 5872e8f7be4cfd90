"""clusters/check.py, the offline linter of everything under clusters/ (what it checks: its docstring).

Every shipped file must pass it, and a config a user breaks must fail with a message naming the
problem: BROKEN_LAUNCHER and BROKEN_KUBERAY are such broken copies, each with the message it must
produce (`pytest -rP -k broken tests/test_clusters.py` prints them). Checks across the repository
rather than of one file (versions everywhere, pyproject against the package) live here.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
KUBERAY = CLUSTERS / "kuberay"


def _load_check() -> Any:
    # clusters/ is not a package: load the script by its path, as a module of its own.
    spec = importlib.util.spec_from_file_location("clusters_check", CLUSTERS / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_check()
from checks import build, common, iam, kuberay, launcher, readme  # noqa: E402 -- importable once check.py put clusters/ on sys.path

if common.tomllib is None:  # Python 3.10 without tomli
    pytest.skip("reading pyproject.toml needs Python >= 3.11 or tomli", allow_module_level=True)

RAY_VERSION = common.RAY_VERSION
LAUNCHER_CONFIGS = sorted(p.name for p in CLUSTERS.glob("*.yaml") if check.file_kind(p) == "launcher")
KUBERAY_MANIFESTS = sorted(p.name for p in KUBERAY.glob("*.yaml"))
RUNTIME_ENVS = ["job-runtime-env.yaml"]


def load_launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def load_manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc is not None]


def all_manifests() -> list[dict]:
    return [doc for name in KUBERAY_MANIFESTS for doc in load_manifests(name)]


def package_version() -> str:
    version = common.package_version()
    assert version, "afm_ray/__init__.py has no __version__ = '...' line"
    return version


def _report(where: str, problems: list[str]) -> str:
    return f"{where}:\n" + "\n".join(f"  - {p}" for p in problems)


def _assert_clean(problems: list[str], where: str) -> None:
    assert not problems, _report(where, problems)


@pytest.fixture(autouse=True)
def _quiet_ray_config_logs():
    # prepare_config logs one INFO line per node type; keep failures readable.
    logger = logging.getLogger("ray.autoscaler")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


# ------------------------------------------------------------------------------ the files


def test_every_cluster_file_is_checked():
    checked = set(check.cluster_files())
    unchecked = [str(p.relative_to(CLUSTERS)) for p in sorted(CLUSTERS.rglob("*.yaml")) if p not in checked]
    assert not unchecked, f"clusters/ files that clusters/check.py does not check: {unchecked}; teach it their kind"
    assert [check.file_kind(CLUSTERS / name) for name in RUNTIME_ENVS] == ["runtime-env"] * len(RUNTIME_ENVS)
    others = ["Dockerfile", "Dockerfile.dockerignore", "constraints.txt", "aws-iam/head-policy.json"]
    assert {CLUSTERS / name for name in others} <= checked, sorted(map(str, checked))
    assert set(LAUNCHER_CONFIGS) >= {"aws.yaml", "gcp.yaml"}, LAUNCHER_CONFIGS
    assert {"raycluster.yaml", "rayjob.yaml"} <= set(KUBERAY_MANIFESTS), KUBERAY_MANIFESTS


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_is_valid(name):
    cfg = load_launcher(name)
    _assert_clean(launcher.launcher_problems(cfg), f"clusters/{name}")
    prepared = launcher.prepare_launcher_config(cfg)
    # What Ray filled in is what the autoscaler will use: GPU types from 0, the head fixed.
    head = prepared["head_node_type"]
    for type_name, node_type in prepared["available_node_types"].items():
        if type_name != head:
            assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1, (type_name, node_type)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_prefers_spot_in_rays_autoscaler(name):
    """Ray's v2 autoscaler reads the types with spot ranked above its on-demand fallback."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    cfg = load_launcher(name)
    _assert_clean(launcher.launcher_problems(cfg), f"clusters/{name}")  # a readable failure first
    node_types = AutoscalingConfig(copy.deepcopy(cfg), skip_content_hash=True).get_node_type_configs()
    kind = cfg["provider"]["type"]
    workers = {n: t for n, t in node_types.items() if n != cfg["head_node_type"]}
    is_spot = {n: launcher._is_spot(kind, cfg["available_node_types"][n]["node_config"]) for n in workers}
    spot = [t.priority for n, t in workers.items() if is_spot[n]]
    fallback = [t.priority for n, t in workers.items() if not is_spot[n]]
    assert spot and fallback and min(spot) > max(fallback), (spot, fallback)
    assert all(t.resources.get("GPU", 0) >= 1 and t.min_worker_nodes == 0 for t in workers.values())


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_manifest_is_valid(name):
    docs = load_manifests(name)
    assert docs, f"clusters/kuberay/{name} is empty"
    for i, doc in enumerate(docs):
        _assert_clean(kuberay.kuberay_problems(doc), f"clusters/kuberay/{name}[{i}] ({check._label(doc, i)})")


def test_kuberay_references_resolve():
    docs = all_manifests()
    assert any(d["kind"] == "RayCluster" for d in docs), "clusters/kuberay defines no RayCluster"
    _assert_clean([p for d in docs for p in kuberay.kuberay_reference_problems(d, docs)], "clusters/kuberay")


def test_rayjob_space_ships_in_the_image():
    """The RayJob's --space names a space shipped in afm-ray (package data) or the spaces ConfigMap."""
    jobs = [d for d in all_manifests() if d["kind"] == "RayJob"]
    assert jobs, "clusters/kuberay defines no RayJob"
    problems = [p for job in jobs for p in kuberay.rayjob_spec_problems(job["spec"]) if "--space" in p]
    _assert_clean(problems, "clusters/kuberay/rayjob.yaml")


# ---- broken copies: each must fail with a message naming its problem


def _assert_reported(problems: list[str], message: str, where: str) -> None:
    """Some problem matches `message` (a regex); the report is printed for `pytest -rP`."""
    report = _report(where, problems)
    assert any(re.search(message, p) for p in problems), f"no problem matches {message!r}:\n{report}"
    print(report)


def _skip_if_broken(problems: list[str], where: str) -> None:
    """A broken copy of a file that is broken already proves nothing: its own test reports it."""
    if problems:
        pytest.skip(f"{where} itself fails its validity test; fix that first")


_DELETE = object()


def _parent(cfg: Any, path: str) -> tuple[Any, Any]:
    """The container holding `path` ("a/b/0/c": keys and list indices) and the last key."""
    # A backslash in a part stands for "/" inside a key (IAM condition keys such as aws:RequestTag/...).
    *parents, last = [int(p) if p.isdigit() else p.replace("\\", "/") for p in path.split("/")]
    for key in parents:
        cfg = cfg[key]
    return cfg, last


def _set(path: str, value: Any) -> Callable[[Any], None]:
    def mutate(cfg: Any) -> None:
        target, key = _parent(cfg, path)
        if value is _DELETE:
            del target[key]
        else:
            target[key] = value

    return mutate


def _rename(path: str, new_key: str) -> Callable[[Any], None]:
    def mutate(cfg: Any) -> None:
        target, key = _parent(cfg, path)
        target[new_key] = target.pop(key)

    return mutate


def _remove_from(path: str, item: Any) -> Callable[[Any], None]:
    """Remove `item` (a value, or an index when an int) from the list at `path`."""

    def mutate(cfg: Any) -> None:
        target, key = _parent(cfg, path)
        if isinstance(item, int):
            del target[key][item]
        else:
            target[key].remove(item)

    return mutate


def _append(path: str, item: Any) -> Callable[[Any], None]:
    def mutate(cfg: Any) -> None:
        target, key = _parent(cfg, path)
        target[key].append(item)

    return mutate


def _all(*mutations: Callable[[Any], None]) -> Callable[[Any], None]:
    """Several mutations as one (a mistake that needs two edits, e.g. every worker type too small)."""

    def mutate(cfg: Any) -> None:
        for mutation in mutations:
            mutation(cfg)

    return mutate


def _replace_in(path: str, old: str, new: str) -> Callable[[Any], None]:
    def mutate(cfg: Any) -> None:
        target, key = _parent(cfg, path)
        assert old in target[key], (old, target[key])
        target[key] = target[key].replace(old, new)

    return mutate


# Tables of cases, one or two lines a case: laid out by hand rather than one field to a line.
# fmt: off
BROKEN_LAUNCHER = [
    # (id, file, mutation, the message it must produce)
    ("typo-in-node-type-key", "aws.yaml", _rename("available_node_types/gpu_spot/min_workers", "min_worker"),
     r"available_node_types\.gpu_spot: unknown key 'min_worker' \(did you mean 'min_workers'\?\)"),
    ("typo-in-top-level-key", "gcp.yaml", _rename("idle_timeout_minutes", "idle_timout_minutes"),
     r"unknown key 'idle_timout_minutes' \(did you mean 'idle_timeout_minutes'\?\)"),
    ("typo-in-machine-type-key", "aws.yaml", _rename("available_node_types/gpu_ondemand/node_config/InstanceType",
                                                     "InstanceTyp"),
     r"gpu_ondemand\.node_config has no InstanceType \(found 'InstanceTyp': a typo\?\)"),
    ("min-above-max", "aws.yaml", _set("available_node_types/gpu_spot/min_workers", 9),
     r"available_node_types\.gpu_spot: min_workers \(9\) is above max_workers \(8\)"),
    ("min-above-zero", "gcp.yaml", _set("available_node_types/gpu_ondemand/min_workers", 1),
     r"gpu_ondemand: min_workers is 1; GPU workers autoscale from 0"),
    ("type-max-above-cluster-max", "aws.yaml", _set("available_node_types/gpu_spot/max_workers", 12),
     r"gpu_spot: max_workers \(12\) is above the cluster's max_workers \(10\)"),
    ("worker-type-missing-resources", "aws.yaml", _set("available_node_types/gpu_ondemand/resources", _DELETE),
     r"available_node_types\.gpu_ondemand: 'resources' is a required property \[ray-schema\.json\]"),
    ("worker-type-without-gpu", "gcp.yaml", _set("available_node_types/gpu_spot/resources", {"CPU": 4}),
     r"gpu_spot: resources declare no GPU"),
    ("resources-not-integers", "aws.yaml", _set("available_node_types/gpu_spot/resources/GPU", 0.5),
     r"available_node_types\.gpu_spot\.resources\.GPU: 0\.5 is not of type 'integer' \[ray-schema\.json\]"),
    ("unknown-head-type", "aws.yaml", _set("head_node_type", "ray.head.default"),
     r"head_node_type 'ray\.head\.default' is not one of available_node_types \(head, gpu_spot, gpu_ondemand\)"),
    ("wrong-project-version-in-image", "aws.yaml",
     _replace_in("docker/image", "afm-ray:0.1.0-", "afm-ray:0.0.9-"),
     r"docker\.image: image \S+afm-ray:0\.0\.9-ray\S+ installs afm-ray 0\.0\.9, but pyproject\.toml says"),
    ("wrong-ray-version-in-image", "gcp.yaml", _replace_in("docker/image", "-ray2.60.0-", "-ray2.59.0-"),
     r"is built on Ray 2\.59\.0, the project runs Ray"),
    ("not-the-afm-ray-image", "aws.yaml", _set("docker/image", "rayproject/ray:2.60.0-py311-gpu"),
     r"docker\.image: image rayproject/ray:2\.60\.0-py311-gpu is not the afm-ray image"),
    ("pip-install-at-start-up", "aws.yaml", _set("worker_setup_commands", ["pip install -U kornia"]),
     r"worker_setup_commands\[0\] installs packages at start-up \('pip install'\)"),
    ("public-dashboard-port", "aws.yaml", _set("provider/security_group", {
        "GroupName": "afm-ray", "IpPermissions": [
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}),
     r"opens ports 8265-8265 to 0\.0\.0\.0/0; only SSH \(22\) may be reachable from outside"),
    ("mlflow-on-all-interfaces", "gcp.yaml", _replace_in("head_start_ray_commands/2", "--host 127.0.0.1",
                                                         "--host 0.0.0.0"),
     r"head_start_ray_commands\[2\]: the MLflow server listens on 0\.0\.0\.0; it must say --host 127\.0\.0\.1"),
    ("spot-head", "aws.yaml", _set("available_node_types/head/node_config/InstanceMarketOptions",
                                   {"MarketType": "spot"}),
     r"available_node_types\.head: the head must be on-demand"),
    ("gpu-head", "gcp.yaml", _set("available_node_types/head/resources", {"CPU": 0, "GPU": 1}),
     r"available_node_types\.head: the head is a CPU node"),
    ("fallback-preferred-over-spot", "aws.yaml", _set("available_node_types/gpu_ondemand/priority", 20),
     r"gpu_spot: priority 10 must be above the on-demand fallback gpu_ondemand's \(20\)"),
    ("no-on-demand-fallback", "gcp.yaml", _set("available_node_types/gpu_ondemand", _DELETE),
     r"no on-demand GPU worker type to fall back to"),
    ("autoscaler-off", "aws.yaml", _replace_in("head_start_ray_commands/1",
                                               "--autoscaling-config=~/ray_bootstrap_config.yaml", ""),
     r"never start Ray with --autoscaling-config=~/ray_bootstrap_config\.yaml"),
    ("workers-without-s3-credentials", "aws.yaml",
     _set("available_node_types/gpu_spot/node_config/IamInstanceProfile", _DELETE),
     r"gpu_spot\.node_config has no IamInstanceProfile"),
    ("gpu-vm-that-live-migrates", "gcp.yaml",
     _set("available_node_types/gpu_ondemand/node_config/scheduling/onHostMaintenance", "MIGRATE"),
     r"gpu_ondemand\.node_config\.scheduling\.onHostMaintenance must be TERMINATE"),
    ("node-on-the-default-network", "gcp.yaml",
     _set("available_node_types/gpu_spot/node_config/networkInterfaces", _DELETE),
     r"gpu_spot\.node_config has no networkInterfaces"),
    # security: token authentication on every node, the token from the secret store, no stop/start
    ("no-token-auth", "aws.yaml", _remove_from("docker/run_options", "--env RAY_AUTH_MODE=token"),
     r"docker\.run_options: the head runs Ray with RAY_AUTH_MODE=unset; add `--env RAY_AUTH_MODE=token`"),
    ("auth-mode-disabled", "gcp.yaml", _replace_in("docker/run_options/1", "=token", "=disabled"),
     r"the workers run Ray with RAY_AUTH_MODE=disabled"),
    ("token-not-mounted", "gcp.yaml", _remove_from("docker/run_options", 2),
     r"docker\.run_options: the head gets no token file"),
    ("gpu-node-fetches-no-token", "gcp.yaml", _remove_from("available_node_types/gpu_spot/initialization_commands", 1),
     r"available_node_types\.gpu_spot: node type gpu_spot never fetches the Ray token \(gcloud secrets versions"),
    ("literal-token", "aws.yaml",
     _replace_in("worker_start_ray_commands/2", "ray start", "RAY_AUTH_TOKEN=f00 ray start"),
     r"sets RAY_AUTH_TOKEN to a literal: fetch it from the secret store"),
    ("stopped-nodes-cached", "aws.yaml", _set("provider/cache_stopped_nodes", True),
     r"provider\.cache_stopped_nodes must be false"),
    ("gcp-stopped-nodes-cached", "gcp.yaml", _set("provider/cache_stopped_nodes", _DELETE),
     r"provider\.cache_stopped_nodes must be false"),
    # issue 19: each mistake class of finding 11 and the other findings, on a copy of the shipped files
    ("cpu-instance-declared-as-gpu-type", "aws.yaml",
     _set("available_node_types/gpu_spot/node_config/InstanceType", "m6i.xlarge"),
     r"available_node_types\.gpu_spot: declares GPU: 1 but m6i\.xlarge has no GPU"),
    ("cpu-machine-declared-as-gpu-type", "gcp.yaml",
     _set("available_node_types/gpu_ondemand/node_config/machineType", "n2-standard-4"),
     r"available_node_types\.gpu_ondemand: declares GPU: 1 but n2-standard-4 has no GPU"),
    ("more-cpus-than-the-machine", "aws.yaml", _set("available_node_types/gpu_ondemand/resources/CPU", 8),
     r"gpu_ondemand: declares CPU: 8 but g5\.xlarge has 4 vCPUs"),
    ("unknown-machine-type", "aws.yaml", _set("available_node_types/gpu_spot/node_config/InstanceType", "g5.xlarg"),
     r"gpu_spot: check\.py does not know the machine type g5\.xlarg"),
    ("head-without-instance-profile", "aws.yaml",
     _set("available_node_types/head/node_config/IamInstanceProfile", _DELETE),
     r"head\.node_config has no IamInstanceProfile: `ray up` would create and use its own head role, "
     r"ray-autoscaler-v1"),
    ("head-type-initialization-commands", "gcp.yaml",
     _set("available_node_types/head/initialization_commands", ["echo never run"]),
     r"available_node_types\.head\.initialization_commands are never run: `ray up` runs the global"),
    ("worker-types-too-small-for-the-spaces", "aws.yaml",
     _all(_set("available_node_types/gpu_spot/resources/CPU", 2),
          _set("available_node_types/gpu_ondemand/resources/CPU", 2)),
     r"space cifar10_resnet18 asks for a Train worker of CPU 4, GPU 1, which no worker type of this cluster holds"),
    ("head-too-small-for-the-trials-drivers", "aws.yaml",
     _set("available_node_types/head/node_config/InstanceType", "m6i.large"),
     r"the head has 8 GiB; space cifar10_resnet18 runs up to 10 trials at once here, .* needs about 14 GiB"),
    ("image-driver-too-old-for-torch", "gcp.yaml",
     _replace_in("available_node_types/gpu_spot/node_config/disks/0/initializeParams/sourceImage",
                 "common-cu129-ubuntu-2204-nvidia-580", "common-cu128-ubuntu-2204-nvidia-570"),
     r"gpu_spot\.node_config: image \S+-nvidia-570 has NVIDIA driver 570, older than the 580 that the image's torch "
     r"\(CUDA 13\.0\) needs"),
    ("image-with-unknown-driver", "aws.yaml", _set("available_node_types/gpu_ondemand/node_config/ImageId", "ami-0123"),
     r"gpu_ondemand\.node_config: check\.py cannot tell the NVIDIA driver of image ami-0123"),
    ("no-gpu-check-at-boot", "aws.yaml", _remove_from("worker_start_ray_commands", 1),
     r"gpu_spot: a GPU node type whose nodes never run `python /home/ray/node/gpu_check\.py`"),
    ("gpu-check-whose-failure-is-ignored", "gcp.yaml",
     _replace_in("worker_start_ray_commands/1", "gpu_check.py", "gpu_check.py || true"),
     r"gpu_ondemand: a GPU node type whose nodes never run `python /home/ray/node/gpu_check\.py` as a command"),
    ("published-dashboard-port", "gcp.yaml", _append("docker/run_options", "-p 8265:8265"),
     r"docker run option '-p 8265:8265' publishes a container port"),
    ("token-file-world-readable", "aws.yaml",
     _replace_in("initialization_commands/0", "sudo install -m 0400 -o 1000 -g 100 /dev/stdin", "tee"),
     r"initialization_commands \(node type head\): the Ray token file is written without `umask 077`"),
    ("token-file-owned-by-the-ssh-user", "gcp.yaml",
     _replace_in("available_node_types/gpu_spot/initialization_commands/1", "-o 1000 -g 100 ", ""),
     r"available_node_types\.gpu_spot \(node type gpu_spot\): the Ray token file belongs to the SSH user, but the "
     r"container reads it as uid 1000"),
    # issue 20: no state on the head, no credential in a file
    ("mlflow-store-a-file-on-the-head", "aws.yaml",
     _replace_in("head_start_ray_commands/2", "--port 5000", "--port 5000 --backend-store-uri sqlite:////home/ray/mlflow.db"),
     r"head_start_ray_commands\[2\]: MLflow's store sqlite:////home/ray/mlflow\.db is a file on the head"),
    ("mlflow-store-never-given", "gcp.yaml", _set("docker/head_run_options", _DELETE),
     r"head_start_ray_commands\[2\]: the MLflow server gets no --backend-store-uri and no MLFLOW_BACKEND_STORE_URI"),
    ("mlflow-artifacts-on-the-head", "aws.yaml",
     _replace_in("head_start_ray_commands/2", "--artifacts-destination s3://BUCKET/mlflow-artifacts", ""),
     r"head_start_ray_commands\[2\]: MLflow's artifacts go to its working directory on the head"),
    ("database-urls-readable-by-all", "aws.yaml", _replace_in("initialization_commands/1", "umask 077 &&", "true &&"),
     r"initialization_commands: /home/ubuntu/\.afm-ray/head\.env \(the database URLs\) is written without `umask 077`"),
    ("password-in-the-config", "gcp.yaml",
     _replace_in("head_start_ray_commands/2", "--port 5000",
                 "--port 5000 --backend-store-uri postgresql://afm:S3CRET@10.0.0.3:5432/mlflow"),
     r"a postgresql:// URL with a password is written in the file"),
]
BROKEN_KUBERAY = [
    # (id, file, document index, mutation, the message it must produce)
    ("typo-in-worker-group-key", "raycluster.yaml", 2,
     _rename("spec/workerGroupSpecs/0/maxReplicas", "maxReplica"),
     r"workerGroupSpecs\[gpu-spot\]: unknown field 'maxReplica' \(did you mean 'maxReplicas'\?\)"),
    ("typo-in-spec-key", "raycluster.yaml", 2,
     _rename("spec/enableInTreeAutoscaling", "enableInTreeAutoScaling"),
     r"spec: unknown field 'enableInTreeAutoScaling' \(did you mean 'enableInTreeAutoscaling'\?\)"),
    ("typo-in-container-key", "raycluster.yaml", 2,
     _rename("spec/workerGroupSpecs/1/template/spec/containers/0/resources", "resource"),
     r"containers\[ray-worker\]: unknown field 'resource' \(did you mean 'resources'\?\)"),
    ("min-above-max", "raycluster.yaml", 2, _set("spec/workerGroupSpecs/0/minReplicas", 9),
     r"workerGroupSpecs\[gpu-spot\]: minReplicas \(9\) is above maxReplicas \(8\)"),
    ("max-missing", "raycluster.yaml", 2, _set("spec/workerGroupSpecs/1/maxReplicas", _DELETE),
     r"workerGroupSpecs\[gpu-ondemand\]\.maxReplicas must be an integer >= 0 \(found None\)"),
    ("gpu-group-without-gpu-limits", "raycluster.yaml", 2,
     _set("spec/workerGroupSpecs/0/template/spec/containers/0/resources",
          {"requests": {"cpu": "3", "memory": "12Gi"}, "limits": {"cpu": "3", "memory": "12Gi"}}),
     r"workerGroupSpecs\[gpu-spot\]: the Ray container has no nvidia.com/gpu limit"),
    ("autoscaling-off", "raycluster.yaml", 2, _set("spec/enableInTreeAutoscaling", False),
     r"spec\.enableInTreeAutoscaling is False: without the in-tree autoscaler"),
    ("wrong-project-version-in-image", "raycluster.yaml", 2,
     _replace_in("spec/workerGroupSpecs/1/template/spec/containers/0/image", ":0.1.0-", ":0.0.9-"),
     r"containers\[ray-worker\]: image REGISTRY/afm-ray:0\.0\.9-ray2\.60\.0-py311-gpu installs afm-ray 0\.0\.9"),
    ("wrong-ray-version-in-image", "raycluster.yaml", 2,
     _replace_in("spec/headGroupSpec/template/spec/containers/0/image", "-ray2.60.0-", "-ray2.59.0-"),
     r"containers\[ray-head\]: image \S+ is built on Ray 2\.59\.0"),
    ("wrong-ray-version", "raycluster.yaml", 2, _set("spec/rayVersion", "2.59.0"),
     r"spec\.rayVersion is '2\.59\.0'; the project runs Ray"),
    ("public-head-service", "raycluster.yaml", 2, _set("spec/headGroupSpec/serviceType", "LoadBalancer"),
     r"headGroupSpec\.serviceType is LoadBalancer: that exposes the dashboard"),
    ("mlflow-on-all-interfaces", "raycluster.yaml", 2,
     _set("spec/headGroupSpec/template/spec/initContainers/0/command/3", "0.0.0.0"),
     r"initContainers\[mlflow\]\.command: the MLflow server listens on 0\.0\.0\.0"),
    ("start-param-not-a-string", "raycluster.yaml", 2, _set("spec/headGroupSpec/rayStartParams/num-cpus", 0),
     r"rayStartParams\.num-cpus is 0 \(int\); KubeRay takes strings only"),
    ("priorities-without-autoscaler-v2", "raycluster.yaml", 2, _set("spec/autoscalerOptions/version", "v1"),
     r"autoscalerOptions\.version is 'v1': worker-group priorities .* autoscaler v2 only"),
    ("fallback-preferred-over-spot", "raycluster.yaml", 2, _set("spec/workerGroupSpecs/1/priority", 50),
     r"workerGroupSpecs\[gpu-spot\]: priority 10 must be above the on-demand group gpu-ondemand's \(50\)"),
    ("rayjob-typo", "rayjob.yaml", 0, _rename("spec/clusterSelector", "clusterSelecter"),
     r"spec: unknown field 'clusterSelecter' \(did you mean 'clusterSelector'\?\)"),
    ("rayjob-not-the-sweep", "rayjob.yaml", 0, _set("spec/entrypoint", "python train.py"),
     r"spec\.entrypoint does not run `python -m afm_ray\.sweep`"),
    ("rayjob-local-storage", "rayjob.yaml", 0,
     _replace_in("spec/entrypoint", "--storage s3://BUCKET/afm-ray", "--storage /tmp/ray_results"),
     r"--storage /tmp/ray_results must be an s3:// or gs:// URI"),
    ("rayjob-submitter-on-another-ray", "rayjob.yaml", 0,
     _set("spec/submitterPodTemplate/spec/containers/0/image", "rayproject/ray:2.59.0"),
     r"image rayproject/ray:2\.59\.0 is not Ray"),
    ("wrong-api-version", "rayjob.yaml", 0, _set("apiVersion", "ray.io/v1alpha1"),
     r"apiVersion is 'ray\.io/v1alpha1'; KubeRay's RayJob is ray\.io/v1"),
    # security: token authentication, the token from a Secret never in the repository
    ("auth-off", "raycluster.yaml", 2, _set("spec/authOptions", _DELETE),
     r"spec\.authOptions\.mode is None: set mode: token"),
    ("auth-without-own-secret", "raycluster.yaml", 2, _set("spec/authOptions/secretName", _DELETE),
     r"spec\.authOptions\.secretName is missing"),
    ("literal-token-in-a-pod", "raycluster.yaml", 2,
     _set("spec/workerGroupSpecs/0/template/spec/containers/0/env", [{"name": "RAY_AUTH_TOKEN", "value": "f00"}]),
     r"workerGroupSpecs\.containers\[ray-worker\]: RAY_AUTH_TOKEN is a literal value"),
    ("secret-in-the-repository", "raycluster.yaml", 0, _set("kind", "Secret"),
     r"a Secret in the repository puts its credentials in git"),
    ("rayjob-submitter-without-auth-mode", "rayjob.yaml", 0,
     _set("spec/submitterPodTemplate/spec/containers/0/env", _DELETE),
     r"submitterPodTemplate\.containers\[ray-job-submitter\]: set RAY_AUTH_MODE=token"),
    # the sweep a RayJob runs: a shipped space, data and teacher in the bucket
    ("rayjob-space-not-shipped", "rayjob.yaml", 0,
     _replace_in("spec/entrypoint", "--space cifar10_resnet18", "--space /home/ray/search_spaces/cifar10.yaml"),
     r"--space /home/ray/search_spaces/cifar10\.yaml is neither a space shipped in afm-ray \(cifar100_mobilenetv2, "),
    ("rayjob-data-on-the-head-disk", "rayjob.yaml", 0,
     _replace_in("spec/entrypoint", "--set data.root=s3://BUCKET/data/cifar10", ""),
     r"the workers would read data\.root '/data/cifar10' from their own disk"),
    ("rayjob-no-teacher", "rayjob.yaml", 0,
     _replace_in("spec/entrypoint", "--set teacher.checkpoint=s3://BUCKET/teachers/wrn34_10_trades/checkpoint.pt", ""),
     r"teacher\.checkpoint '\(empty\)' is not in a bucket"),
    # issue 19: KubeRay 1.7.0's CRD, worker pods that fit, one-command RayJob, identities, GPU check, time-out
    ("field-kuberay-does-not-have", "raycluster.yaml", 2, _set("spec/workerGroupSpecs/0/weight", 3),
     r"workerGroupSpecs\[gpu-spot\]: unknown field 'weight' \[KubeRay 1\.7\.0 CRD\]"),
    ("value-kuberay-does-not-take", "raycluster.yaml", 2, _set("spec/autoscalerOptions/upscalingMode", "Fast"),
     r"spec\.autoscalerOptions\.upscalingMode: 'Fast' is not one of \['Default', 'Aggressive', 'Conservative'\] "
     r"\[KubeRay 1\.7\.0 CRD\]"),
    ("worker-pods-too-small-for-the-spaces", "raycluster.yaml", 2,
     _all(*(_set(f"spec/workerGroupSpecs/{g}/template/spec/containers/0/resources/{k}/cpu", "3")
            for g in (0, 1) for k in ("requests", "limits"))),
     r"space cifar10_resnet18 asks for a Train worker of CPU 4, GPU 1, which no worker type of this cluster holds "
     r"\(gpu-spot \(CPU 3, GPU 1, 24\.0 GiB, up to 8\)"),
    ("head-pod-too-small-for-the-trials-drivers", "raycluster.yaml", 2,
     _all(_set("spec/headGroupSpec/template/spec/containers/0/resources/limits/memory", "8Gi"),
          _set("spec/headGroupSpec/template/spec/containers/0/resources/requests/memory", "8Gi")),
     r"the head has 8 GiB; space cifar10_resnet18 runs up to 10 trials at once here"),
    ("rayjob-chains-a-second-command", "rayjob.yaml", 0,
     _replace_in("spec/entrypoint", "checkpoint.pt", "checkpoint.pt && python -m afm_ray.pareto --experiment x"),
     r"spec\.entrypoint chains commands \(&&\): KubeRay runs it through the submitter pod's shell"),
    ("workers-share-the-heads-account", "raycluster.yaml", 2,
     _set("spec/workerGroupSpecs/0/template/spec/serviceAccountName", "afm-ray-head"),
     r"workerGroupSpecs\[gpu-spot\]\.template\.spec\.serviceAccountName is 'afm-ray-head', the head's account"),
    ("workers-with-the-default-account", "raycluster.yaml", 2,
     _set("spec/workerGroupSpecs/1/template/spec/serviceAccountName", _DELETE),
     r"workerGroupSpecs\[gpu-ondemand\]\.template\.spec\.serviceAccountName is None"),
    ("workers-with-an-api-token", "raycluster.yaml", 2,
     _set("spec/workerGroupSpecs/1/template/spec/automountServiceAccountToken", _DELETE),
     r"workerGroupSpecs\[gpu-ondemand\]\.template\.spec\.automountServiceAccountToken is not false"),
    ("no-gpu-check-at-boot", "raycluster.yaml", 2,
     _set("spec/workerGroupSpecs/0/template/spec/containers/0/args", _DELETE),
     r"workerGroupSpecs\[gpu-spot\]: the Ray container does not run `python /home/ray/node/gpu_check\.py \|\| exit 1`"),
    ("gpu-check-that-does-not-stop-ray", "raycluster.yaml", 2,
     _set("spec/workerGroupSpecs/1/template/spec/containers/0/args", ["python /home/ray/node/gpu_check.py"]),
     r"workerGroupSpecs\[gpu-ondemand\]: the GPU check must end the shell when it fails"),
    ("no-allocation-timeout", "raycluster.yaml", 2, _set("spec/autoscalerOptions/env", _DELETE),
     r"spec\.autoscalerOptions\.env sets no RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S"),
    ("published-host-port", "raycluster.yaml", 2,
     _append("spec/headGroupSpec/template/spec/containers/0/ports", {"containerPort": 8265, "hostPort": 8265}),
     r"containers\[ray-head\]: port 8265 has hostPort 8265"),
    ("head-on-the-host-network", "raycluster.yaml", 2, _set("spec/headGroupSpec/template/spec/hostNetwork", True),
     r"headGroupSpec\.template\.spec\.hostNetwork is true"),
    # issue 20: the head keeps no state; the database outlives its pod
    ("mlflow-store-a-file-on-the-head", "raycluster.yaml", 2,
     _append("spec/headGroupSpec/template/spec/initContainers/0/command", "--backend-store-uri=sqlite:////home/ray/mlflow.db"),
     r"initContainers\[mlflow\]: MLflow's store sqlite:////home/ray/mlflow\.db is a file on the head"),
    ("mlflow-store-not-from-a-secret", "raycluster.yaml", 2,
     _set("spec/headGroupSpec/template/spec/initContainers/0/env", _DELETE),
     r"initContainers\[mlflow\]: the MLflow server gets no --backend-store-uri and no MLFLOW_BACKEND_STORE_URI"),
    ("mlflow-never-restarted", "raycluster.yaml", 2,
     _all(_append("spec/headGroupSpec/template/spec/containers", {"name": "mlflow2", "image": "x", "command": [
         "mlflow", "server", "--host", "127.0.0.1", "--artifacts-destination", "s3://BUCKET/mlflow-artifacts"],
         "env": [{"name": "MLFLOW_BACKEND_STORE_URI", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]})),
     r"containers\[mlflow2\]: an MLflow container beside the head is never restarted if it exits"),
    ("rayjob-optuna-study-a-file-on-the-head", "rayjob.yaml", 0,
     _replace_in("spec/entrypoint", "--experiment",
                 "--optuna-storage sqlite:////home/ray/state/optuna.db --experiment"),
     r"spec\.entrypoint: --optuna-storage sqlite:////home/ray/state/optuna\.db is a file on the head"),
    ("rayjob-password-in-the-entrypoint", "rayjob.yaml", 0,
     _replace_in("spec/entrypoint", "--experiment",
                 "--optuna-storage postgresql://afm:S3CRET@afm-ray-postgres:5432/optuna --experiment"),
     r"a postgresql:// URL with a password is written in the file"),
    ("public-database-service", "postgres.yaml", 1, _set("spec/type", "LoadBalancer"),
     r"spec\.type is LoadBalancer: that publishes the service outside the Kubernetes cluster"),
    ("database-on-the-pods-disk", "postgres.yaml", 2, _set("spec/volumeClaimTemplates", _DELETE),
     r"containers\[postgres\]: the database's data \(/var/lib/postgresql/data/pgdata\) is not on a volume of "
     r"spec\.volumeClaimTemplates"),
    ("database-password-in-the-file", "postgres.yaml", 2,
     _set("spec/template/spec/containers/0/env/2", {"name": "POSTGRES_PASSWORD", "value": "S3CRET"}),
     r"containers\[postgres\]: POSTGRES_PASSWORD is a literal value"),
    ("database-image-floating", "postgres.yaml", 2, _set("spec/template/spec/containers/0/image", "postgres:latest"),
     r"image postgres:latest is not postgres:MAJOR\.MINOR"),
    ("database-deleted-with-its-statefulset", "postgres.yaml", 2,
     _set("spec/persistentVolumeClaimRetentionPolicy/whenDeleted", "Delete"),
     r"spec\.persistentVolumeClaimRetentionPolicy\.whenDeleted is Delete"),
    ("database-pod-field-kubernetes-does-not-have", "postgres.yaml", 2,
     _rename("spec/template/spec/containers/0/volumeMounts", "volumeMount"),
     r"spec\.template\.spec\.containers\[postgres\]: unknown field 'volumeMount' \(did you mean 'volumeMounts'\?\)"),
]
# Whole-directory rules (kuberay_reference_problems over every manifest): (id, file, document,
# mutation, the message the RayCluster's or the RayJob's references must produce).
BROKEN_KUBERAY_REFERENCES = [
    ("no-network-policy", "raycluster.yaml", 3, _set("kind", "ConfigMap"),
     r"no NetworkPolicy selects the pods of RayCluster afm-ray"),
    ("policy-admits-everyone", "raycluster.yaml", 3, _set("spec/ingress/0/from", _DELETE),
     r"NetworkPolicy afm-ray: ingress\[0\] has no `from`: it admits every source"),
    ("policy-admits-a-whole-namespace", "raycluster.yaml", 3, _set("spec/ingress/0/from", [{"namespaceSelector": {}}]),
     r"ingress\[0\] admits \{'namespaceSelector': \{\}\} to every port"),
    ("policy-admits-the-internet", "raycluster.yaml", 3,
     _set("spec/ingress/1/from/0", {"ipBlock": {"cidr": "0.0.0.0/0"}}),
     r"ingress\[1\] admits \{'ipBlock': \{'cidr': '0\.0\.0\.0/0'\}\} to ports \[8265\]"),
    ("operator-admitted-to-gcs", "raycluster.yaml", 3, _set("spec/ingress/1/ports", [{"port": 6379}]),
     r"ingress\[1\] admits .*kuberay-operator.* to ports \[6379\]"),
    ("submitter-not-admitted", "rayjob.yaml", 0, _set("spec/submitterPodTemplate/metadata", _DELETE),
     r"the NetworkPolicy admits no RayJob submitter pod of RayCluster afm-ray"),
    ("submitter-reads-another-secret", "rayjob.yaml", 0,
     _set("spec/submitterPodTemplate/spec/containers/0/env/1/valueFrom/secretKeyRef/name", "other"),
     r"the submitter reads its token from Secret 'other', RayCluster afm-ray from 'afm-ray-auth-token'"),
    ("policy-opens-another-port-to-the-submitter", "raycluster.yaml", 3,
     _set("spec/ingress/1/ports", [{"port": 52365}]),
     r"ingress\[1\] admits .*sweep-submitter.* to ports \[52365\]"),
    ("policy-opens-the-metrics-port-to-the-world", "raycluster.yaml", 3,
     _append("spec/ingress", {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 8080}]}),
     r"ingress\[2\] admits \{'ipBlock': \{'cidr': '0\.0\.0\.0/0'\}\} to ports \[8080\]"),
    ("database-open-to-every-pod", "postgres.yaml", 3, _set("spec/ingress/0/from", [{"namespaceSelector": {}}]),
     r"NetworkPolicy afm-ray-postgres: ingress\[0\] admits \{'namespaceSelector': \{\}\} to afm-ray-postgres"),
    ("database-without-a-network-policy", "postgres.yaml", 3, _set("kind", "ConfigMap"),
     r"no NetworkPolicy selects the pods of afm-ray-postgres"),
    ("head-without-the-optuna-url", "raycluster.yaml", 2,
     _set("spec/headGroupSpec/template/spec/containers/0/env", _DELETE),
     r"spec\.entrypoint: the sweep gets no --optuna-storage and the head no AFM_RAY_OPTUNA_STORAGE from a secret"),
    ("rayjob-asks-more-than-a-worker-pod", "rayjob.yaml", 0,
     _replace_in("spec/entrypoint", "--experiment", "--cpus-per-worker 8 --experiment"),
     r"spec\.entrypoint: space cifar10_resnet18 asks for a Train worker of CPU 8, GPU 1, which no worker type"),
]
# IAM documents against aws.yaml: (id, policy file, mutation, the message it must produce).
BROKEN_IAM = [
    ("head-may-stop-instances", "head-policy.json",
     _append("Statement", {"Effect": "Allow", "Action": "ec2:StopInstances", "Resource": "*"}),
     r"allows ec2:StopInstances: the config terminates idle nodes"),
    ("run-untagged-instances", "head-policy.json",
     _set("Statement/0/Condition/StringEquals/aws:RequestTag\\ray-cluster-name", _DELETE),
     r"LaunchOnlyThisClustersWorkerTypes: ec2:RunInstances on instances must require the tag ray-cluster-name=afm-ray"),
    ("run-other-instance-types", "head-policy.json",
     _set("Statement/0/Condition/StringEquals/ec2:InstanceType", ["g5.xlarge", "p4d.24xlarge"]),
     r"ec2:RunInstances must be limited to the worker types of the config \['g5\.xlarge'\]"),
    ("terminate-any-instance", "head-policy.json", _set("Statement/3/Condition", _DELETE),
     r"RetagAndTerminateOnlyThisClustersInstances: ec2:TerminateInstances must be limited to instances tagged"),
    ("wildcard-action", "head-policy.json", _set("Statement/9/Action", "s3:*"),
     r"WriteOnlyTheSweepStorageAndMlflowArtifacts: allows s3:\*: a wildcard grants actions nobody reviewed"),
    ("pull-from-any-repository", "worker-policy.json", _set("Statement/4/Resource", "*"),
     r"PullOnlyTheAfmRayImage: ECR pulls on \['\*'\]: scope them to the image's repository"),
    ("worker-writes-mlflow-artifacts", "worker-policy.json", _set("Statement/2/Resource", "arn:aws:s3:::BUCKET/*"),
     r"WriteOnlyTheSweepStorage: lets the workers s3:PutObject, s3:DeleteObject, s3:AbortMultipartUpload in "
     r"BUCKET/mlflow-artifacts/"),
    ("worker-can-launch", "worker-policy.json",
     _append("Statement", {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*"}),
     r"a worker's role allows ec2:RunInstances"),
    ("worker-reads-any-secret", "worker-policy.json", _set("Statement/5/Resource", "*"),
     r"secretsmanager:GetSecretValue on \*: allow only the secrets these nodes fetch \(afm-ray/ray-auth-token\)"),
    ("head-cannot-read-the-token", "head-policy.json", _set("Statement/12", _DELETE),
     r"no statement allows secretsmanager:GetSecretValue on the secret afm-ray/ray-auth-token the nodes fetch"),
    # issue 19: finding 10 (prefix-scoped writes) and finding 11's IAM classes
    ("partial-wildcard-action", "head-policy.json", _set("Statement/5/Action", "iam:*Role*"),
     r"LaunchWorkersWithTheirRole: allows iam:\*Role\*: a wildcard grants actions nobody reviewed"),
    ("partial-wildcard-s3-action", "worker-policy.json", _set("Statement/2/Action", "s3:*Object*"),
     r"WriteOnlyTheSweepStorage: allows s3:\*Object\*"),
    ("not-action", "head-policy.json", _append("Statement", {"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"}),
     r"Allow with NotAction grants everything it does not list"),
    ("s3-writes-on-everything", "head-policy.json", _set("Statement/9/Resource", "*"),
     r"WriteOnlyTheSweepStorageAndMlflowArtifacts: s3:PutObject, s3:DeleteObject, s3:AbortMultipartUpload on \*: "
     r"that reaches the whole bucket"),
    ("head-writes-the-whole-bucket", "head-policy.json", _set("Statement/9/Resource", "arn:aws:s3:::BUCKET/*"),
     r"on arn:aws:s3:::BUCKET/\*: that reaches the whole bucket \(the data and the teachers too\)"),
    ("kuberay-head-writes-the-whole-bucket", "kuberay-head-policy.json", _set("Statement/2/Resource", "arn:aws:s3:::*"),
     r"on arn:aws:s3:::\*: that reaches the whole bucket"),
    ("head-cannot-describe-instances", "head-policy.json", _remove_from("Statement/4/Action", "ec2:DescribeInstances"),
     r"the head may not ec2:DescribeInstances on \*: Ray's AWS provider needs it on the head"),
    ("head-cannot-tag", "head-policy.json",
     _all(_set("Statement/3/Action", "ec2:TerminateInstances"), _set("Statement/2", _DELETE)),
     r"the head may not ec2:CreateTags on arn:aws:ec2:us-west-2:ACCOUNT_ID:instance/i-0"),
    ("head-cannot-resolve-the-ami-parameter", "head-policy.json", _set("Statement/6", _DELETE),
     r"the head may not ssm:GetParameters on arn:aws:ssm:us-west-2::parameter/aws/service/deeplearning/ami/x86_64/"),
    ("head-cannot-request-spot", "head-policy.json",
     _remove_from("Statement/1/Resource", "arn:aws:ec2:us-west-2:ACCOUNT_ID:spot-instances-request/*"),
     r"the head may not ec2:RunInstances on arn:aws:ec2:us-west-2:ACCOUNT_ID:spot-instances-request/x"),
    ("worker-reads-the-database-secret", "worker-policy.json",
     _set("Statement/5/Resource", ["arn:aws:secretsmanager:us-west-2:ACCOUNT_ID:secret:afm-ray/ray-auth-token-*",
                                   "arn:aws:secretsmanager:us-west-2:ACCOUNT_ID:secret:afm-ray/postgres-*"]),
     r"GetSecretValue on \S+afm-ray/postgres-\*: allow only the secrets these nodes fetch \(afm-ray/ray-auth-token\)"),
    ("mlflow-cannot-write-its-artifacts", "kuberay-head-policy.json",
     _set("Statement/2/Resource", ["arn:aws:s3:::BUCKET/afm-ray/*"]),
     r"the head may not s3:PutObject in BUCKET/mlflow-artifacts/: MLflow's server runs as the head"),
    ("launcher-head-cannot-write-mlflow-artifacts", "head-policy.json",
     _set("Statement/9/Resource", ["arn:aws:s3:::BUCKET/afm-ray/*"]),
     r"the head may not s3:PutObject in BUCKET/mlflow-artifacts/"),
    ("kuberay-head-launches-instances", "kuberay-head-policy.json",
     _append("Statement", {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*"}),
     r"the KubeRay head's role allows ec2:RunInstances"),
]
# fmt: on


@pytest.mark.parametrize("case", BROKEN_LAUNCHER, ids=[c[0] for c in BROKEN_LAUNCHER])
def test_broken_launcher_config_fails_with_a_readable_message(case):
    case_id, name, mutate, message = case
    cfg = load_launcher(name)
    _skip_if_broken(launcher.launcher_problems(copy.deepcopy(cfg)), f"clusters/{name}")
    mutate(cfg)
    _assert_reported(launcher.launcher_problems(cfg), message, f"clusters/{name} ({case_id})")


@pytest.mark.parametrize("case", BROKEN_KUBERAY, ids=[c[0] for c in BROKEN_KUBERAY])
def test_broken_kuberay_manifest_fails_with_a_readable_message(case):
    case_id, name, index, mutate, message = case
    doc = load_manifests(name)[index]
    _skip_if_broken(kuberay.kuberay_problems(copy.deepcopy(doc)), f"clusters/kuberay/{name}")
    mutate(doc)
    _assert_reported(kuberay.kuberay_problems(doc), message, f"clusters/kuberay/{name}[{index}] ({case_id})")


@pytest.mark.parametrize("case", BROKEN_KUBERAY_REFERENCES, ids=[c[0] for c in BROKEN_KUBERAY_REFERENCES])
def test_broken_manifests_fail_their_cross_references(case):
    case_id, name, index, mutate, message = case
    docs = {n: load_manifests(n) for n in KUBERAY_MANIFESTS}
    everything = [d for n in KUBERAY_MANIFESTS for d in docs[n]]
    _skip_if_broken(
        [p for d in everything for p in kuberay.kuberay_reference_problems(d, everything)], "clusters/kuberay"
    )
    mutate(docs[name][index])
    everything = [d for n in KUBERAY_MANIFESTS for d in docs[n]]
    problems = [p for d in everything for p in kuberay.kuberay_reference_problems(d, everything)]
    _assert_reported(problems, message, f"clusters/kuberay/{name}[{index}] ({case_id})")


@pytest.mark.parametrize("case", BROKEN_IAM, ids=[c[0] for c in BROKEN_IAM])
def test_broken_iam_policy_fails_least_privilege(case):
    case_id, name, mutate, message = case
    policy, cfg = json.loads((CLUSTERS / "aws-iam" / name).read_text()), load_launcher("aws.yaml")
    _skip_if_broken(iam.policy_problems(copy.deepcopy(policy), cfg, name), f"clusters/aws-iam/{name}")
    mutate(policy)
    _assert_reported(iam.policy_problems(policy, cfg, name), message, f"clusters/aws-iam/{name} ({case_id})")


def test_security_rules_hold_for_the_shipped_files():
    """Each rule of the issue, on the files as shipped (the broken copies above show each one fails)."""
    for name in LAUNCHER_CONFIGS:
        cfg = load_launcher(name)
        options = cfg["docker"]["run_options"]
        assert "--env RAY_AUTH_MODE=token" in options and any(":/home/ray/.ray/auth_token:ro" in o for o in options)
        assert cfg["provider"]["cache_stopped_nodes"] is False
    raycluster = next(d for d in all_manifests() if d["kind"] == "RayCluster")
    assert raycluster["spec"]["authOptions"] == {"mode": "token", "secretName": "afm-ray-auth-token"}
    assert not [d for d in all_manifests() if d["kind"] == "Secret"]  # the token is never in the repository
    policy = next(d for d in all_manifests() if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "afm-ray")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/cluster": "afm-ray"}}
    head = json.loads((CLUSTERS / "aws-iam" / "head-policy.json").read_text())
    actions = {a for s in head["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert not actions & {"ec2:StopInstances", "ec2:StartInstances"}
    for name in ("head-policy.json", "worker-policy.json"):
        _assert_clean(check.check_file(CLUSTERS / "aws-iam" / name), f"clusters/aws-iam/{name}")


# ---- the RayJob's own arguments pass the sweep's preflight (cloud URIs swapped for local ones)


def _rayjob_sweep_arguments(root: Path, *, drop: str = "") -> list[str]:
    """The RayJob's `python -m afm_ray.sweep` arguments, the bucket swapped for a local folder behind a
    file:// URI (the same pyarrow path an s3:// one takes), MLflow's sidecar for a SQLite file."""
    job = next(d for d in all_manifests() if d["kind"] == "RayJob")
    args = kuberay.sweep_arguments(job["spec"]["entrypoint"])
    if drop:
        i = args.index(drop)
        del args[i - 1 : i + 1]  # the flag and its value
    swapped = [re.sub(r"\b(?:s3|gs)://BUCKET/", f"file://{root}/bucket/", arg) for arg in args]
    return [arg.replace("http://127.0.0.1:5000", f"sqlite:///{root}/mlflow.db") for arg in swapped]


def _fill_bucket(root: Path) -> None:
    """What the README tells a user to put in the bucket: CIFAR-10 as Parquet, a teacher checkpoint."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    data = root / "bucket" / "data" / "cifar10"
    data.mkdir(parents=True)
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    for split in ("train", "test"):
        table = pa.table({"img": [{"bytes": png.getvalue(), "path": None}], "label": [0]})
        pq.write_table(table, data / f"{split}-00000-of-00001.parquet")
    teacher = root / "bucket" / "teachers" / "wrn34_10_trades" / "checkpoint.pt"
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b"a checkpoint: the preflight reads its size, not its bytes")


def test_rayjob_arguments_pass_the_sweeps_preflight(tmp_path):
    """The manifest's own arguments, parsed by the sweep's own parser, pass every preflight check."""
    from afm_ray.config import parse_overrides
    from afm_ray.preflight import sweep_checks
    from afm_ray.search.space import load_search_space
    from afm_ray.sweep.__main__ import parser
    from afm_ray.sweep.plan import storage_root

    _fill_bucket(tmp_path)
    args = parser().parse_args(_rayjob_sweep_arguments(tmp_path))
    space = load_search_space(args.space, overrides=parse_overrides(args.overrides))
    lines = [check() for _, check in sweep_checks(space, storage_root(args.storage), args.tracking_uri)]
    assert lines == [
        f"data: parquet at file://{tmp_path}/bucket/data/cifar10",
        f"storage: file://{tmp_path}/bucket/afm-ray takes writes",
        f"teacher: file://{tmp_path}/bucket/teachers/wrn34_10_trades/checkpoint.pt (0.0 MB)",
        f"tracking: sqlite:///{tmp_path}/mlflow.db answers",
    ]


def test_rayjob_without_its_data_argument_fails_in_one_line(tmp_path):
    """A copy of the manifest without `--set data.root=...` fails the sweep before Ray starts: one
    line, exit 2 (the space's own data.root, a path on the head's disk, holds nothing)."""
    _fill_bucket(tmp_path)
    args = _rayjob_sweep_arguments(tmp_path, drop="data.root=s3://BUCKET/data/cifar10")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run(
        [sys.executable, "-m", "afm_ray.sweep", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "error: data.root: /data/cifar10 does not exist: expected a directory with train*.parquet and test*.parquet "
        + proc.stderr.split("test*.parquet ", 1)[1].strip()
    ], proc.stderr
    assert "Ray" not in proc.stdout and not (tmp_path / "bucket" / "afm-ray").exists()


# ---- versions: the image every config names installs the version in pyproject.toml


def _images(node: Any) -> list[str]:
    if isinstance(node, list):
        return [image for item in node for image in _images(item)]
    if not isinstance(node, dict):
        return []
    named = [v for k, v in node.items() if k in ("image", "head_image", "worker_image") and isinstance(v, str)]
    return named + [image for value in node.values() for image in _images(value)]


def _image_refs() -> list[tuple[str, str]]:
    """(where, image) for every image a launcher config or manifest names."""
    refs = [(f"clusters/{name}", image) for name in LAUNCHER_CONFIGS for image in _images(load_launcher(name))]
    return refs + [(f"clusters/kuberay/{n}", image) for n in KUBERAY_MANIFESTS for image in _images(load_manifests(n))]


def _installed_versions() -> list[tuple[str, str]]:
    """(where, afm-ray version) for every afm-ray image tag in clusters/, the Dockerfile's default too."""
    found = [(where, m["version"]) for where, image in _image_refs() if (m := common.AFM_IMAGE.match(image))]
    arg = re.search(r"^ARG AFM_RAY_VERSION=(\S+)$", (CLUSTERS / "Dockerfile").read_text(), re.M)
    assert arg, "clusters/Dockerfile has no `ARG AFM_RAY_VERSION=<version>` default"
    found.append(("clusters/Dockerfile ARG AFM_RAY_VERSION", arg.group(1)))
    readme = CLUSTERS / "README.md"
    if readme.is_file():
        found += [("clusters/README.md", v) for v in re.findall(r"afm-ray:([0-9][^-\s`]*)-ray", readme.read_text())]
    return found


def test_pyproject_declares_version():
    path = ROOT / "pyproject.toml"
    assert path.is_file(), "pyproject.toml is missing: the cluster image's version comes from its [project] version"
    version = common.pyproject_version()
    assert version, "pyproject.toml has no [project] version: the cluster image's version comes from it"
    assert version == package_version(), (
        f"pyproject.toml says {version}, afm_ray/__init__.py says {package_version()}: keep them equal"
    )


def test_configs_install_the_pyproject_version():
    version = common.pyproject_version()
    assert version, "pyproject.toml (or its [project] version) is missing; the configs cannot be checked against it"
    wrong = [f"{where}: {found}" for where, found in _installed_versions() if found != version]
    assert not wrong, f"these install another afm-ray than pyproject.toml's {version}: {wrong}"


def test_configs_install_the_package_version():
    version = package_version()
    wrong = [f"{where}: {found}" for where, found in _installed_versions() if found != version]
    assert not wrong, f"these install another afm-ray than afm_ray/__init__.py's {version}: {wrong}"


def test_every_afm_ray_image_is_built_on_the_projects_ray():
    # The database's image (kuberay/postgres.yaml) runs no Ray: check.py pins it on its own rule.
    refs = [(where, image) for where, image in _image_refs() if not image.startswith("postgres:")]
    assert any(common.AFM_IMAGE.match(image) for _, image in refs), "no config names the afm-ray image"
    _assert_clean([p for where, image in refs for p in common.image_problems(image, where)], "images")


# ---- the image, its build context and constraints, the IAM roles, the job's runtime env


def test_dockerfile_builds_on_the_ray_gpu_image_and_pins_the_project():
    _assert_clean(build.dockerfile_problems((CLUSTERS / "Dockerfile").read_text()), "clusters/Dockerfile")


def test_dockerignore_lets_in_what_the_build_needs():
    path = CLUSTERS / "Dockerfile.dockerignore"
    _assert_clean(build.dockerignore_problems(path.read_text()), str(path.relative_to(ROOT)))


def test_constraints_pin_the_stack_the_project_declares():
    _assert_clean(build.constraints_problems((CLUSTERS / "constraints.txt").read_text()), "clusters/constraints.txt")


def test_aws_iam_policies_match_the_config():
    head_policy = json.loads((CLUSTERS / "aws-iam" / "head-policy.json").read_text())
    _assert_clean(iam.iam_problems(head_policy, load_launcher("aws.yaml")), "clusters/aws-iam/head-policy.json")
    for name in ("head-policy.json", "worker-policy.json", "ec2-trust.json"):  # each parses; the head's passes
        _assert_clean(check.check_file(CLUSTERS / "aws-iam" / name), f"clusters/aws-iam/{name}")


def test_job_runtime_env_uploads_the_spaces_but_not_the_package():
    env = yaml.safe_load((CLUSTERS / "job-runtime-env.yaml").read_text())
    _assert_clean(build.runtime_env_problems(env), "clusters/job-runtime-env.yaml")


# ---- commands: the flags the configs and the README pass exist


def test_commands_use_flags_the_modules_define():
    texts = []
    for path in sorted(CLUSTERS.rglob("*")):
        if path.suffix == ".yaml":
            texts.append((path, "\n".join(common.strings(list(yaml.safe_load_all(path.read_text()))))))
        elif path.suffix == ".md":
            texts.append((path, path.read_text()))
    modules = {module for _, text in texts for module, _ in common.afm_ray_commands(text)}
    assert "sweep" in modules, "clusters/ never runs python -m afm_ray.sweep"
    problems = [f"{path.relative_to(ROOT)}: {p}" for path, text in texts for p in common.flag_problems(text)]
    _assert_clean(problems, "clusters/")
    assert not [m for m in modules if not common.module_sources(m)], "a command clusters/ runs has no module"


# ---- the command line: what a user runs before `ray up`


def _run_check(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "clusters/check.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_check_py_needs_no_afm_ray():
    """A user runs it from a plain checkout with Ray installed, not necessarily the package."""
    for path in [CLUSTERS / "check.py", *sorted((CLUSTERS / "checks").glob("*.py"))]:
        assert not re.search(r"^\s*(?:import|from)\s+afm_ray\b", path.read_text(), re.M), path


def test_cli_passes_the_shipped_files():
    result = _run_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"clusters/: {len(check.cluster_files())} files checked, no problems"]


def test_cli_reports_a_broken_copy(tmp_path):
    cfg = load_launcher("aws.yaml")
    _set("available_node_types/gpu_spot/min_workers", 9)(cfg)
    broken = tmp_path / "aws.yaml"
    broken.write_text(yaml.safe_dump(cfg))
    result = _run_check(str(broken))
    assert result.returncode == 1, result.stdout + result.stderr
    expected = f"{broken}: available_node_types.gpu_spot: min_workers (9) is above max_workers (8)"
    assert expected in result.stdout.splitlines(), result.stdout


def test_cli_rejects_a_bad_argument(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = _run_check(str(missing))
    assert result.returncode == 2 and not result.stdout, result.stdout + result.stderr
    assert result.stderr.splitlines() == [f"check.py: {missing}: no such file"]
    assert check.file_kind(ROOT / "README.md") is None  # nor a file of no kind it knows
    with pytest.raises(ValueError, match="not a file check.py knows"):
        check.check_file(ROOT / "README.md")


# ---- issue 19: proofs against the providers' own code and schemas


def test_head_policy_covers_every_call_of_rays_aws_provider():
    """Every EC2 call in the installed Ray's AWS node provider is mapped to its IAM action, and the head's
    policy grants each one the head makes (a Ray upgrade that adds a call fails here first)."""
    import ray.autoscaler

    # Read, not imported: the provider imports boto3, which check.py does not need.
    source = (Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "node_provider.py").read_text()
    calls = set(re.findall(r"\bec2(?:_fail_fast)?\.(?:meta\.client\.)?(instances\.filter|[a-z_]+)\(", source))
    calls |= set(re.findall(r"\bnode\.(terminate|stop)\(\)", source))
    assert {"create_instances", "create_tags", "instances.filter", "terminate"} <= calls, calls
    iam = check.CHECKS["iam"]
    assert not calls - set(iam.BOTO_TO_IAM), f"calls of Ray's AWS provider with no IAM action in checks/iam.py: {calls}"
    needed = {iam.BOTO_TO_IAM[c] for c in calls} - set(iam.NOT_ON_THE_HEAD)
    policy = json.loads((CLUSTERS / "aws-iam" / "head-policy.json").read_text())
    granted = {a for s in iam.statements(policy) if s.get("Effect") == "Allow" for a in iam._listed(s.get("Action"))}
    assert needed <= granted, needed - granted
    assert not iam._required_problems(policy, load_launcher("aws.yaml"))


def test_kuberay_schema_is_the_documented_minimum():
    """The vendored CRDs are KubeRay 1.7.0's, the first with worker-group priority; the manifests and the
    README name that version."""
    crd = check.CHECKS["crd"]
    vendored = json.loads(crd.SCHEMA_PATH.read_text())
    assert vendored["kuberay"] == crd.KUBERAY_VERSION == "1.7.0"

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = vendored["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    spec = resolve(vendored["RayCluster"]["properties"]["spec"])
    group = resolve(resolve(spec["properties"]["workerGroupSpecs"])["items"])
    assert {"priority", "minReplicas", "maxReplicas", "template"} <= set(group["properties"])
    assert {"authOptions", "autoscalerOptions"} <= set(spec["properties"])
    options = resolve(spec["properties"]["autoscalerOptions"])
    assert {"version", "env"} <= set(options["properties"])
    assert "1.7.0" in (KUBERAY / "raycluster.yaml").read_text().split("\n", 1)[0]
    assert "KubeRay operator 1.7.0 or later" in (CLUSTERS / "README.md").read_text()


def _cluster_shapes() -> dict[str, tuple[list, float | None]]:
    fit, machines = check.CHECKS["fit"], check.CHECKS["machines"]
    shapes = {}
    for name in LAUNCHER_CONFIGS:
        cfg = load_launcher(name)
        kind = cfg["provider"]["type"]
        known = {n: machines.machine(kind, t["node_config"])[1] for n, t in cfg["available_node_types"].items()}
        shapes[name] = fit.launcher_node_types(cfg, known)
    raycluster = next(d for d in all_manifests() if d["kind"] == "RayCluster")
    shapes["raycluster.yaml"] = fit.kuberay_node_types(raycluster)
    return shapes


def test_every_shipped_space_fits_every_shipped_cluster():
    """Finding 2: as Ray reads each cluster (the RayCluster through Ray's own CR translation), some worker
    type holds a Train worker of every shipped space, and the CIFAR spaces run at most 10 trials at once
    (one GPU each, 8 spot + 2 on-demand), whose drivers the head holds."""
    fit = check.CHECKS["fit"]
    spaces = [fit.load_space(name) for name in fit.shipped_spaces()]
    assert {s.name for s in spaces} >= {"cifar10_resnet18", "cifar100_mobilenetv2", "default"}
    for cluster, (workers, head_memory) in _cluster_shapes().items():
        assert workers and all(w.gpus == 1 for w in workers), (cluster, workers)
        for space in spaces:
            assert any(fit.slots(space, w) for w in workers), (cluster, space, workers)
        cifar = fit.load_space("cifar10_resnet18")
        assert fit.concurrency(cifar, workers) == 10, cluster
        assert head_memory >= fit.HEAD_BASE_GIB + fit.TRIAL_DRIVER_GIB * 10, (cluster, head_memory)
    workers, _ = _cluster_shapes()["raycluster.yaml"]
    assert {(w.name, w.cpus, w.gpus, w.memory_gib) for w in workers} == {
        ("gpu-spot", 6, 1, 24.0),
        ("gpu-ondemand", 6, 1, 24.0),
    }


def test_rayjob_entrypoint_is_the_sweep_alone():
    """Finding 4: KubeRay's submitter runs the entrypoint through its shell; it is one command."""
    job = next(d for d in all_manifests() if d["kind"] == "RayJob")
    lexer = shlex.shlex(job["spec"]["entrypoint"], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    assert words[:3] == ["python", "-m", "afm_ray.sweep"] and not [w for w in words if set(w) <= set("&|;()<>")]
    assert "--optuna-storage" not in words  # the study's URL comes from the head's environment (a Secret)


def test_no_store_of_the_shipped_clusters_is_a_file_on_the_head():
    """Issue 20: MLflow's store and the Optuna study of every shipped flow come from PostgreSQL URLs in a
    secret (an environment file fetched from the secret store, a Kubernetes Secret)."""
    for name in LAUNCHER_CONFIGS:
        cfg = load_launcher(name)
        text = yaml.safe_dump(cfg)
        assert "sqlite" not in text and "--backend-store-uri" not in text, name
        assert any("--env-file" in o for o in cfg["docker"]["head_run_options"]), name
        assert not any("--env-file" in o for o in cfg["docker"].get("worker_run_options", [])), name
    raycluster = next(d for d in all_manifests() if d["kind"] == "RayCluster")
    pod = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    envs = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for c in pod["containers"] + pod["initContainers"] for e in c["env"]
    }
    assert envs == {
        "MLFLOW_BACKEND_STORE_URI": {"name": "afm-ray-postgres", "key": "mlflow-url"},
        "AFM_RAY_OPTUNA_STORAGE": {"name": "afm-ray-postgres", "key": "optuna-url"},
    }
    assert not [d for d in all_manifests() if d["kind"] == "PersistentVolumeClaim"]  # no state volume on the head


# ---- clusters/README.md: its commands are checked like the configs'

# fmt: off
BROKEN_README = [
    # (id, text replaced, replacement, the message it must produce)
    ("optuna-study-a-file-on-the-head", "--storage s3://$BUCKET/afm-ray \\",
     "--storage s3://$BUCKET/afm-ray --optuna-storage sqlite:////home/ray/optuna.db \\",
     r"--optuna-storage sqlite:////home/ray/optuna\.db is a file on the head"),
    ("password-in-a-command", "--storage s3://$BUCKET/afm-ray \\",
     "--storage s3://$BUCKET/afm-ray --optuna-storage postgresql://afm:S3CRET@db:5432/optuna \\",
     r"a postgresql:// URL with a password is written in the file"),
    ("older-kuberay", "the KubeRay operator 1.7.0 or later", "the KubeRay operator 1.6 or later",
     r"'KubeRay operator 1\.6 or later': the manifests are checked against KubeRay 1\.7\.0's CRDs"),
    ("space-that-does-not-ship", "--space cifar10_resnet18 \\", "--space cifar10_wrn \\",
     r"--space cifar10_wrn: no such shipped space"),
    ("flag-the-sweep-does-not-have", "--experiment cifar10-resnet18 \\", "--experimnt cifar10-resnet18 \\",
     r"python -m afm_ray\.sweep --experimnt: .* no such flag"),
]
# fmt: on


@pytest.mark.parametrize("case", BROKEN_README, ids=[c[0] for c in BROKEN_README])
def test_broken_readme_fails_with_a_readable_message(case):
    case_id, old, new, message = case
    text = (CLUSTERS / "README.md").read_text()
    _skip_if_broken(readme.readme_problems(text), "clusters/README.md")
    assert old in text, old
    _assert_reported(readme.readme_problems(text.replace(old, new, 1)), message, f"clusters/README.md ({case_id})")
