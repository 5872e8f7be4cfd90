"""Offline checks of everything under clusters/: no cloud, no cluster, no network.

- Ray cluster launcher configs (clusters/aws.yaml, clusters/gcp.yaml) are validated against
  the schema that ships inside the installed Ray wheel (ray/autoscaler/ray-schema.json) and
  run through Ray's own config preparation (`prepare_config`, `validate_config`, and the v2
  autoscaler's `AutoscalingConfig`, i.e. what `ray up` and the head's autoscaler do before
  any cloud call), then against this project's rules: a CPU on-demand head, GPU worker
  types that scale from 0 with resources declared, spot preferred over an on-demand
  fallback, the afm-ray image at the pyproject version, no installs at start-up, only SSH
  open to the outside, MLflow on the loopback.
- KubeRay manifests (clusters/kuberay/*.yaml) are checked structurally (known fields,
  in-tree autoscaling on, GPU groups from 0 with nvidia.com/gpu limits, image tags and
  rayVersion matching Ray), and each RayCluster goes through Ray's own translation of a
  RayCluster into the autoscaler's config.
- The Dockerfile, its constraints and every image tag are checked against pyproject.toml.

A config a user breaks must fail with a message that names the problem: BROKEN_LAUNCHER and
BROKEN_KUBERAY below are such broken copies, each with the message it must produce
(`pytest -rP -k broken tests/test_clusters.py` prints them).
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs Python >= 3.11 or tomli")

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
KUBERAY = CLUSTERS / "kuberay"
RAY_VERSION = ray.__version__
MLFLOW_VERSION = "3.17.2"  # the newest MLflow this stack can install (pyarrow<26)

LAUNCHER_CONFIGS = sorted(p.name for p in CLUSTERS.glob("*.yaml")
                          if "provider" in (yaml.safe_load(p.read_text()) or {}))
KUBERAY_MANIFESTS = sorted(p.name for p in KUBERAY.glob("*.yaml"))
RUNTIME_ENVS = ["job-runtime-env.yaml"]


class ClusterConfigError(Exception):
    """A cluster config that would fail, or run the sweep wrongly, once launched."""


def _fail(where: str, problems: list[str]) -> None:
    raise ClusterConfigError(f"{where}:\n" + "\n".join(f"  - {p}" for p in problems))


def _dotted(path: Any) -> str:
    return ".".join(str(part) for part in path) or "<top level>"


def _did_you_mean(key: str, known: Any) -> str:
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------- versions


def pyproject_version() -> str | None:
    path = ROOT / "pyproject.toml"
    if not path.is_file():
        return None
    return tomllib.loads(path.read_text()).get("project", {}).get("version")


def package_version() -> str:
    text = (ROOT / "afm_ray" / "__init__.py").read_text()
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    assert match, "afm_ray/__init__.py has no __version__ = '...' line"
    return match.group(1)


def expected_version() -> str:
    """The version the cluster image must install: pyproject's, or the package's until pyproject exists."""
    return pyproject_version() or package_version()


AFM_IMAGE = re.compile(r"^(?P<repo>(?:\S+/)?afm-ray):(?P<version>[^-\s]+)-ray(?P<ray>[0-9][^-\s]*)(?P<flavour>-\S+)?$")
RAY_IMAGE = re.compile(r"^(?:docker\.io/)?rayproject/ray:(?P<tag>\S+)$")


def image_problems(image: Any, at: str, *, afm_ray: bool = False) -> list[str]:
    """Tag checks; `afm_ray`: the image must be the afm-ray image (it runs Ray and the trials)."""
    if not isinstance(image, str) or not image:
        return [f"{at}: no image"]
    if afm_ray and not AFM_IMAGE.match(image):
        return [f"{at}: image {image} is not the afm-ray image (REPOSITORY/afm-ray:<afm-ray version>-ray<Ray "
                "version>-<flavour>, see clusters/build_image.sh): its nodes would have no afm-ray to run"]
    if match := AFM_IMAGE.match(image):
        problems = []
        if match["version"] != expected_version():
            problems.append(f"{at}: image {image} installs afm-ray {match['version']}, but pyproject.toml says "
                            f"{expected_version()} (rebuild with clusters/build_image.sh and update the tag)")
        if match["ray"] != RAY_VERSION:
            problems.append(f"{at}: image {image} is built on Ray {match['ray']}, the project runs Ray {RAY_VERSION}")
        return problems
    if match := RAY_IMAGE.match(image):
        tag = match["tag"]
        if tag != RAY_VERSION and not tag.startswith(RAY_VERSION + "-"):
            return [f"{at}: image {image} is not Ray {RAY_VERSION} (expected rayproject/ray:{RAY_VERSION}[-...])"]
        return []
    return [f"{at}: image {image} is neither the afm-ray image (REPOSITORY/afm-ray:<afm-ray version>-ray<Ray "
            f"version>-<flavour>, see clusters/build_image.sh) nor rayproject/ray:{RAY_VERSION}"]


# -------------------------------------------------------------------- shared command rules

INSTALL = re.compile(r"\b(?:pip3?|uv|conda|mamba|micromamba|apt-get|apt|yum|dnf)\b[^;&|\n]*\binstall\b")
MLFLOW_HOST = re.compile(r"--host[= ]+(\S+)")


def command_problems(command: str, at: str) -> list[str]:
    problems = []
    if match := INSTALL.search(command):
        problems.append(f"{at} installs packages at start-up ({match.group(0)!r}): bake them into the image "
                        "(clusters/Dockerfile) so a trial starts without installing anything")
    if "mlflow server" in command or "mlflow ui" in command:
        host = MLFLOW_HOST.search(command)
        if not host or host.group(1) not in ("127.0.0.1", "localhost"):
            where = host.group(1) if host else "an unspecified host"
            problems.append(f"{at}: the MLflow server listens on {where}; it must say --host 127.0.0.1 "
                            "(nothing but SSH is public: reach MLflow through a tunnel)")
    return problems


# ------------------------------------------------------------- Ray cluster launcher configs

RAY_SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")
MACHINE_KEY = {"aws": "InstanceType", "gcp": "machineType"}


def schema_problems(cfg: dict) -> list[str]:
    """Ray's ray-schema.json, every error with its path (Ray itself stops at the first)."""
    schema = json.loads(RAY_SCHEMA_PATH.read_text())
    problems = []
    for error in sorted(jsonschema.Draft7Validator(schema).iter_errors(cfg), key=lambda e: list(e.absolute_path)):
        message = error.message
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set(error.schema.get("properties", {}))
            extra = sorted(set(error.instance) - known)
            message = "; ".join(f"unknown key {k!r}{_did_you_mean(k, known)}" for k in extra) or message
        problems.append(f"{_dotted(error.absolute_path)}: {message} [ray-schema.json]")
    return problems


def _scheduling(node_config: dict) -> dict:
    scheduling = node_config.get("scheduling") or {}
    if isinstance(scheduling, list):  # Ray's own GCP examples write a list of one-key maps
        return {k: v for item in scheduling for k, v in item.items()}
    return scheduling


def _is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return str(node_config.get("InstanceMarketOptions", {}).get("MarketType", "")).lower() == "spot"
    scheduling = _scheduling(node_config)
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


def launcher_problems(cfg: dict) -> list[str]:
    """The project's rules for a cluster launcher config that already passes Ray's schema."""
    problems = []
    provider = cfg["provider"]
    kind = provider["type"]
    if kind not in MACHINE_KEY:
        return [f"provider.type is {kind!r}; the project ships configs for {sorted(MACHINE_KEY)}"]
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    if not types:
        return ["available_node_types is missing: declare the head and the GPU worker types"]
    if head not in types:
        return [f"head_node_type {head!r} is not one of available_node_types ({', '.join(types)})"]
    global_max = cfg.get("max_workers")
    if global_max is None:
        problems.append("max_workers is missing: set the cluster-wide cap on GPU workers (Ray's default is 2)")

    spot, on_demand = [], []
    for name, node_type in types.items():
        at = f"available_node_types.{name}"
        resources = node_type.get("resources", {})
        node_config = node_type.get("node_config", {})
        machine_key = MACHINE_KEY[kind]
        if machine_key not in node_config:
            typo = difflib.get_close_matches(machine_key, list(node_config), n=1, cutoff=0.6)
            found = f" (found {typo[0]!r}: a typo?)" if typo else ""
            problems.append(f"{at}.node_config has no {machine_key}{found}: the cloud would not know which "
                            "machine to start")
        if kind == "gcp" and "networkInterfaces" not in node_config:
            problems.append(f"{at}.node_config has no networkInterfaces: Ray would put the node on the project's "
                            "first subnet, whose firewall may open more than SSH; use the afm-ray network "
                            "(clusters/README.md)")
        is_spot = _is_spot(kind, node_config)
        if name == head:
            if resources.get("GPU", 0):
                problems.append(f"{at}: the head is a CPU node, its resources must not declare a GPU "
                                f"(found GPU: {resources['GPU']})")
            if is_spot:
                problems.append(f"{at}: the head must be on-demand: a reclaimed head takes the sweep driver "
                                "and MLflow with it")
            continue
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", global_max)
        if high is not None and low > high:
            problems.append(f"{at}: min_workers ({low}) is above max_workers ({high})")
        if low != 0:
            problems.append(f"{at}: min_workers is {low}; GPU workers autoscale from 0 so an idle cluster "
                            "bills no GPU")
        if high is not None and high < 1:
            problems.append(f"{at}: max_workers is {high}: this type can never start")
        if high is not None and global_max is not None and high > global_max:
            problems.append(f"{at}: max_workers ({high}) is above the cluster's max_workers ({global_max}); "
                            "Ray would silently cap it")
        if not resources.get("GPU"):
            problems.append(f"{at}: resources declare no GPU (found {resources}); every worker type runs "
                            "trials, which need a GPU: declare it, e.g. resources: {CPU: 4, GPU: 1}")
        if not resources.get("CPU"):
            problems.append(f"{at}: resources declare no CPU (found {resources}); declare the machine's "
                            "vCPUs, e.g. resources: {CPU: 4, GPU: 1}")
        if kind == "aws" and "IamInstanceProfile" not in node_config:
            problems.append(f"{at}.node_config has no IamInstanceProfile: trials on it could not write "
                            "checkpoints to S3 nor pull the image from ECR")
        if kind == "gcp":
            if not node_config.get("serviceAccounts"):
                problems.append(f"{at}.node_config has no serviceAccounts: trials on it could not write "
                                "checkpoints to GCS")
            if _scheduling(node_config).get("onHostMaintenance") != "TERMINATE":
                problems.append(f"{at}.node_config.scheduling.onHostMaintenance must be TERMINATE: GCE "
                                "refuses GPU VMs that live-migrate")
        (spot if is_spot else on_demand).append((name, node_type.get("priority", 0)))
    if not spot:
        problems.append("no spot GPU worker type: the sweep would pay on-demand prices for every trial")
    if not on_demand:
        problems.append("no on-demand GPU worker type to fall back to when spot capacity runs out")
    for spot_name, spot_priority in spot:
        for fallback, fallback_priority in on_demand:
            if spot_priority <= fallback_priority:
                problems.append(f"available_node_types.{spot_name}: priority {spot_priority} must be above the "
                                f"on-demand fallback {fallback}'s ({fallback_priority}), or the autoscaler may "
                                "start on-demand GPUs first")

    for rule in provider.get("security_group", {}).get("IpPermissions", []):
        ports = (rule.get("FromPort"), rule.get("ToPort"))
        if ports != (22, 22):
            sources = [r.get("CidrIp") for r in rule.get("IpRanges", [])] or ["?"]
            problems.append(f"provider.security_group.IpPermissions opens ports {ports[0]}-{ports[1]} to "
                            f"{', '.join(map(str, sources))}; only SSH (22) may be reachable from outside: reach "
                            "the dashboard and MLflow through SSH tunnels (`ray dashboard`, `ray attach -p`)")

    docker = cfg.get("docker") or {}
    if not docker.get("image") or not docker.get("container_name"):
        problems.append("docker.image and docker.container_name must be set: without them the nodes run the "
                        "bare machine image, which has no afm-ray")
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            problems += image_problems(docker[key], f"docker.{key}", afm_ray=True)
    for name, node_type in types.items():
        if "worker_image" in node_type.get("docker", {}):
            problems += image_problems(node_type["docker"]["worker_image"],
                                       f"available_node_types.{name}.docker.worker_image", afm_ray=True)

    commands = [(key, cfg.get(key) or []) for key in COMMAND_KEYS]
    commands += [(f"available_node_types.{name}.{key}", node_type[key])
                 for name, node_type in types.items()
                 for key in ("initialization_commands", "worker_setup_commands") if key in node_type]
    for key, lines in commands:
        for i, line in enumerate(lines):
            problems += command_problems(line, f"{key}[{i}]")
    if "--autoscaling-config=~/ray_bootstrap_config.yaml" not in " ".join(cfg.get("head_start_ray_commands") or []):
        problems.append("head_start_ray_commands never start Ray with "
                        "--autoscaling-config=~/ray_bootstrap_config.yaml: the autoscaler would not run "
                        "and no GPU worker would ever start")
    return problems


def check_launcher_config(cfg: dict, where: str) -> dict:
    """Ray's schema, the project's rules, then Ray's own preparation; returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    if not isinstance(cfg, dict):
        _fail(where, [f"the file holds a {type(cfg).__name__}, not a mapping"])
    if problems := schema_problems(cfg):
        _fail(where, problems)
    if problems := launcher_problems(cfg):
        _fail(where, problems)
    try:
        prepared = prepare_config(copy.deepcopy(cfg))
        validate_config(prepared)
        AutoscalingConfig(copy.deepcopy(cfg), skip_content_hash=True).get_node_type_configs()
    except Exception as exc:  # Ray's own checks: whatever they raise is the message
        _fail(where, [f"Ray's config preparation rejects it: {type(exc).__name__}: {exc}"])
    return prepared


# ------------------------------------------------------------------------- KubeRay manifests

# Fields of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1/*_types.go, KubeRay 1.4-1.5) and
# of Kubernetes' core/v1 PodSpec and Container: anything else is a typo that strict field
# validation (kubectl's default) rejects.
RAYCLUSTER_SPEC_KEYS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "managedBy", "upgradeStrategy", "authOptions",
    "gcsFaultToleranceOptions", "historyServerOptions", "networkPolicy", "tlsOptions",
}
AUTOSCALER_OPTIONS_KEYS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode", "version",
    "env", "envFrom", "volumeMounts", "command", "args",
}
HEAD_GROUP_KEYS = {
    "template", "headService", "enableIngress", "ingressOptions", "resources", "labels", "rayStartParams",
    "serviceType",
}
WORKER_GROUP_KEYS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "priority", "resources", "labels",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts", "suspend",
}
RAYJOB_SPEC_KEYS = {
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
}
POD_SPEC_KEYS = {
    "volumes", "initContainers", "containers", "ephemeralContainers", "restartPolicy",
    "terminationGracePeriodSeconds", "activeDeadlineSeconds", "dnsPolicy", "nodeSelector", "serviceAccountName",
    "serviceAccount", "automountServiceAccountToken", "nodeName", "hostNetwork", "hostPID", "hostIPC",
    "shareProcessNamespace", "securityContext", "imagePullSecrets", "hostname", "subdomain", "affinity",
    "schedulerName", "tolerations", "hostAliases", "priorityClassName", "priority", "dnsConfig", "readinessGates",
    "runtimeClassName", "enableServiceLinks", "preemptionPolicy", "overhead", "topologySpreadConstraints",
    "setHostnameAsFQDN", "os", "hostUsers", "schedulingGates", "resourceClaims", "resources",
}
CONTAINER_KEYS = {
    "name", "image", "command", "args", "workingDir", "ports", "envFrom", "env", "resources", "resizePolicy",
    "restartPolicy", "volumeMounts", "volumeDevices", "livenessProbe", "readinessProbe", "startupProbe",
    "lifecycle", "terminationMessagePath", "terminationMessagePolicy", "imagePullPolicy", "securityContext",
    "stdin", "stdinOnce", "tty",
}
SPOT_LABELS = {"cloud.google.com/gke-spot": "true", "eks.amazonaws.com/capacityType": "SPOT",
               "karpenter.sh/capacity-type": "spot"}
SWEEP_FLAGS = ("--space", "--storage", "--tracking-uri", "--experiment")


def unknown_keys(obj: Any, known: set[str], at: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{at}: expected a mapping, found {type(obj).__name__}"]
    return [f"{at}: unknown field {key!r}{_did_you_mean(key, known)}" for key in obj if key not in known]


def _quantity(value: Any) -> float:
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    return float(parse_quantity(str(value)))


def pod_problems(template: Any, at: str, *, ray_pod: bool = True) -> list[str]:
    """Known fields and images; in a Ray pod the first container (the Ray one) runs the afm-ray image."""
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        return [f"{at}: no pod template spec"]
    spec = template["spec"]
    problems = unknown_keys(spec, POD_SPEC_KEYS, f"{at}.spec")
    containers = spec.get("containers")
    if not containers:
        return problems + [f"{at}.spec.containers is empty: the first container is the Ray container"]
    for i, container in enumerate(containers):
        cat = f"{at}.spec.containers[{container.get('name', i)}]"
        problems += unknown_keys(container, CONTAINER_KEYS, cat)
        problems += image_problems(container.get("image"), cat, afm_ray=ray_pod and i == 0)
        problems += command_problems(" ".join(map(str, container.get("command", []) + container.get("args", []))),
                                     f"{cat}.command")
    return problems


def start_params_problems(params: Any, at: str) -> list[str]:
    if not isinstance(params, dict):
        return [f"{at}: expected a mapping of strings"]
    return [f"{at}.{key} is {value!r} ({type(value).__name__}); KubeRay takes strings only: write \"{value}\""
            for key, value in params.items() if not isinstance(value, str)]


def _gpu_limit(group: dict) -> tuple[float, float]:
    containers = (group.get("template") or {}).get("spec", {}).get("containers") or [{}]
    resources = containers[0].get("resources") or {}
    limit = (resources.get("limits") or {}).get("nvidia.com/gpu", 0)
    request = (resources.get("requests") or {}).get("nvidia.com/gpu", limit)
    return _quantity(limit), _quantity(request)


def _is_spot_group(group: dict) -> bool:
    affinity = (group.get("template") or {}).get("spec", {}).get("affinity") or {}
    required = affinity.get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
    node_selector = (group.get("template") or {}).get("spec", {}).get("nodeSelector") or {}
    if any(node_selector.get(k) == v for k, v in SPOT_LABELS.items()):
        return True
    return any(expr.get("key") in SPOT_LABELS and expr.get("operator") == "In"
               and SPOT_LABELS[expr["key"]] in expr.get("values", [])
               for term in required.get("nodeSelectorTerms", []) for expr in term.get("matchExpressions", []))


def raycluster_spec_problems(spec: Any, at: str) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{at}: missing"]
    problems = unknown_keys(spec, RAYCLUSTER_SPEC_KEYS, at)
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"{at}.rayVersion is {spec.get('rayVersion')!r}; the project runs Ray {RAY_VERSION}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{at}.enableInTreeAutoscaling is {spec.get('enableInTreeAutoscaling')!r}: without the "
                        "in-tree autoscaler the GPU groups stay at their replicas and never scale from 0")
    options = spec.get("autoscalerOptions") or {}
    problems += unknown_keys(options, AUTOSCALER_OPTIONS_KEYS, f"{at}.autoscalerOptions")

    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append(f"{at}.headGroupSpec is missing")
    else:
        hat = f"{at}.headGroupSpec"
        problems += unknown_keys(head, HEAD_GROUP_KEYS, hat)
        if head.get("serviceType", "ClusterIP") != "ClusterIP":
            problems.append(f"{hat}.serviceType is {head['serviceType']}: that exposes the dashboard and GCS outside "
                            "the cluster; keep ClusterIP and use kubectl port-forward")
        if head.get("enableIngress"):
            problems.append(f"{hat}.enableIngress is on: the dashboard would be public; use kubectl port-forward")
        problems += start_params_problems(head.get("rayStartParams", {}), f"{hat}.rayStartParams")
        problems += pod_problems(head.get("template"), f"{hat}.template")
        if head.get("template") and _gpu_limit(head)[0]:
            problems.append(f"{hat}: the head is a CPU pod; it must not request nvidia.com/gpu")

    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{at}.workerGroupSpecs is empty: there is nothing to run trials on")
    spot, on_demand = [], []
    for i, group in enumerate(groups):
        gat = f"{at}.workerGroupSpecs[{group.get('groupName', i)}]"
        problems += unknown_keys(group, WORKER_GROUP_KEYS, gat)
        if not group.get("groupName"):
            problems.append(f"{gat}.groupName is missing")
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        bounds_ok = True
        for key, value in (("minReplicas", low), ("maxReplicas", high)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{gat}.{key} must be an integer >= 0 (found {value!r})")
                bounds_ok = False
        if bounds_ok:
            if low > high:
                problems.append(f"{gat}: minReplicas ({low}) is above maxReplicas ({high})")
            if low != 0:
                problems.append(f"{gat}: minReplicas is {low}; GPU workers autoscale from 0 so an idle cluster "
                                "bills no GPU")
            if high < 1:
                problems.append(f"{gat}: maxReplicas is {high}: this group can never start")
            replicas = group.get("replicas")
            if replicas is not None and not low <= replicas <= high:
                problems.append(f"{gat}.replicas ({replicas}) is outside [minReplicas, maxReplicas] = [{low}, {high}]")
        problems += start_params_problems(group.get("rayStartParams", {}), f"{gat}.rayStartParams")
        problems += pod_problems(group.get("template"), f"{gat}.template")
        if group.get("template"):
            limit, request = _gpu_limit(group)
            if limit < 1:
                problems.append(f"{gat}: the Ray container has no nvidia.com/gpu limit: the pod could land on a "
                                "CPU node and Ray would see no GPU")
            elif request != limit:
                problems.append(f"{gat}: nvidia.com/gpu requests ({request:g}) and limits ({limit:g}) differ; "
                                "Kubernetes requires them equal")
        (spot if _is_spot_group(group) else on_demand).append((group.get("groupName"), group.get("priority", 0)))
    if any("priority" in g for g in groups) and options.get("version") != "v2":
        problems.append(f"{at}.autoscalerOptions.version is {options.get('version')!r}: worker-group priorities "
                        "(spot before on-demand) are honoured by autoscaler v2 only; set version: v2")
    for spot_name, spot_priority in spot:
        for fallback, fallback_priority in on_demand:
            if spot_priority <= fallback_priority:
                problems.append(f"{at}.workerGroupSpecs[{spot_name}]: priority {spot_priority} must be above the "
                                f"on-demand group {fallback}'s ({fallback_priority}), or the autoscaler may start "
                                "on-demand GPUs first")
    return problems


def ray_translation_problems(raycluster: dict) -> list[str]:
    """What Ray's in-tree autoscaler makes of the RayCluster (its own code, offline)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = copy.deepcopy(raycluster)
    cr["metadata"].setdefault("namespace", "default")
    try:
        config = _derive_autoscaling_config_from_ray_cr(cr)
    except Exception as exc:
        return [f"Ray's autoscaler cannot read this RayCluster: {type(exc).__name__}: {exc}"]
    problems = []
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"] and node_type["resources"].get("GPU", 0) < 1:
            problems.append(f"Ray's autoscaler sees no GPU in worker group {name} (resources {node_type['resources']})")
    return problems


def rayjob_spec_problems(spec: Any) -> list[str]:
    if not isinstance(spec, dict):
        return ["spec: missing"]
    problems = unknown_keys(spec, RAYJOB_SPEC_KEYS, "spec")
    entrypoint = spec.get("entrypoint", "")
    problems += command_problems(entrypoint, "spec.entrypoint")
    sweep = next((part for part in entrypoint.split("&&") if "afm_ray.sweep" in part), None)
    if sweep is None or not re.search(r"\bpython3? -m afm_ray\.sweep\b", sweep):
        problems.append(f"spec.entrypoint does not run `python -m afm_ray.sweep` (found {entrypoint!r})")
    else:
        for flag in SWEEP_FLAGS:
            if not re.search(rf"(?<!\S){flag}[ =]\S", sweep):
                problems.append(f"spec.entrypoint: the sweep is given no {flag}")
        storage = re.search(r"--storage[ =](\S+)", sweep)
        if storage and not storage.group(1).startswith(("s3://", "gs://")):
            problems.append(f"spec.entrypoint: --storage {storage.group(1)} must be an s3:// or gs:// URI: "
                            "worker pods share no disk with the head")
        tracking = re.search(r"--tracking-uri[ =](\S+)", sweep)
        if tracking and not tracking.group(1).startswith(("http://127.0.0.1:", "http://localhost:")):
            problems.append(f"spec.entrypoint: --tracking-uri {tracking.group(1)} is not the MLflow sidecar on the "
                            "head (http://127.0.0.1:5000)")
    if bool(spec.get("clusterSelector")) == ("rayClusterSpec" in spec):
        problems.append("spec: give exactly one of clusterSelector (run on the RayCluster of raycluster.yaml) "
                        "and rayClusterSpec (a cluster of the job's own)")
    if "rayClusterSpec" in spec:
        problems += raycluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec")
    if "submitterPodTemplate" in spec:
        problems += pod_problems(spec["submitterPodTemplate"], "spec.submitterPodTemplate", ray_pod=False)
    return problems


def check_kuberay_manifest(doc: Any, where: str) -> None:
    if not isinstance(doc, dict):
        _fail(where, [f"a manifest must be a mapping, found {type(doc).__name__}"])
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name")
    where = f"{where} ({kind} {name})"
    problems = [] if name else ["metadata.name is missing"]
    if kind in ("RayCluster", "RayJob"):
        if doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"apiVersion is {doc.get('apiVersion')!r}; KubeRay's {kind} is ray.io/v1")
        if kind == "RayCluster":
            problems += raycluster_spec_problems(doc.get("spec"), "spec")
            if not problems:
                problems += ray_translation_problems(doc)
        else:
            problems += rayjob_spec_problems(doc.get("spec"))
    elif kind in ("ServiceAccount", "PersistentVolumeClaim", "ConfigMap"):
        if doc.get("apiVersion") != "v1":
            problems.append(f"apiVersion is {doc.get('apiVersion')!r}; a {kind} is v1")
    else:
        problems.append(f"kind {kind!r} is not one this project ships (RayCluster, RayJob, ServiceAccount, "
                        "PersistentVolumeClaim, ConfigMap)")
    if problems:
        _fail(where, problems)


# ----------------------------------------------------------------------------------- loading


def load_launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def load_manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc is not None]


def all_manifests() -> list[dict]:
    return [doc for name in KUBERAY_MANIFESTS for doc in load_manifests(name)]


@pytest.fixture(autouse=True)
def _quiet_ray_config_logs():
    # prepare_config logs one INFO line per node type; keep failures readable.
    logger = logging.getLogger("ray.autoscaler")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


# ------------------------------------------------------------------------------------- tests


def test_every_cluster_file_is_checked():
    unchecked = []
    for path in sorted(CLUSTERS.rglob("*.yaml")):
        rel = path.relative_to(CLUSTERS)
        if not (rel.parent == Path("kuberay") and path.name in KUBERAY_MANIFESTS
                or rel.parent == Path(".") and path.name in LAUNCHER_CONFIGS + RUNTIME_ENVS):
            unchecked.append(str(rel))
    assert not unchecked, f"clusters/ files that no test checks: {unchecked}; add them to tests/test_clusters.py"
    assert set(LAUNCHER_CONFIGS) >= {"aws.yaml", "gcp.yaml"}, LAUNCHER_CONFIGS
    assert {"raycluster.yaml", "rayjob.yaml"} <= set(KUBERAY_MANIFESTS), KUBERAY_MANIFESTS


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_is_valid(name):
    prepared = check_launcher_config(load_launcher(name), f"clusters/{name}")
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
    check_launcher_config(cfg, f"clusters/{name}")  # a readable failure first
    node_types = AutoscalingConfig(copy.deepcopy(cfg), skip_content_hash=True).get_node_type_configs()
    kind = cfg["provider"]["type"]
    workers = {n: t for n, t in node_types.items() if n != cfg["head_node_type"]}
    spot = [t.priority for n, t in workers.items() if _is_spot(kind, cfg["available_node_types"][n]["node_config"])]
    fallback = [t.priority for n, t in workers.items()
                if not _is_spot(kind, cfg["available_node_types"][n]["node_config"])]
    assert spot and fallback and min(spot) > max(fallback), (spot, fallback)
    assert all(t.resources.get("GPU", 0) >= 1 and t.min_worker_nodes == 0 for t in workers.values())


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_manifest_is_valid(name):
    docs = load_manifests(name)
    assert docs, f"clusters/kuberay/{name} is empty"
    for i, doc in enumerate(docs):
        check_kuberay_manifest(doc, f"clusters/kuberay/{name}[{i}]")


def test_kuberay_references_resolve():
    docs = all_manifests()
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert clusters, "clusters/kuberay defines no RayCluster"
    for job in (d for d in docs if d["kind"] == "RayJob"):
        selected = (job["spec"].get("clusterSelector") or {}).get("ray.io/cluster")
        if selected is not None:
            assert ("RayCluster", selected) in defined, (
                f"RayJob {job['metadata']['name']} selects RayCluster {selected!r}, "
                "which clusters/kuberay does not define")
    for cluster in clusters:
        groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            account = pod.get("serviceAccountName")
            assert account is None or ("ServiceAccount", account) in defined, f"no ServiceAccount {account!r}"
            for volume in pod.get("volumes", []):
                claim = volume.get("persistentVolumeClaim", {}).get("claimName")
                assert claim is None or ("PersistentVolumeClaim", claim) in defined, (
                    f"no PersistentVolumeClaim {claim!r}")
                config_map = volume.get("configMap")
                if config_map and not config_map.get("optional"):
                    assert ("ConfigMap", config_map["name"]) in defined, f"no ConfigMap {config_map['name']!r}"


def test_rayjob_space_ships_in_the_image():
    """The RayJob's --space points into the image (search_spaces/ baked in) or the spaces ConfigMap."""
    for job in (d for d in all_manifests() if d["kind"] == "RayJob"):
        space = re.search(r"--space[ =](\S+)", job["spec"]["entrypoint"]).group(1)
        assert space.startswith(("/home/ray/search_spaces/", "/home/ray/spaces/")), space
        if space.startswith("/home/ray/search_spaces/"):
            local = ROOT / "search_spaces" / space.removeprefix("/home/ray/search_spaces/")
            if not local.is_file():
                pytest.skip(f"{local.relative_to(ROOT)} is not in the repository yet; the RayJob needs it")


# ---- broken copies: each must fail with a message naming its problem

def _skip_if_broken(check: Callable[[], Any], where: str) -> None:
    """A broken copy of a file that is broken already proves nothing: its own test reports it."""
    try:
        check()
    except ClusterConfigError:
        pytest.skip(f"{where} itself fails its validity test; fix that first")


_DELETE = object()


def _parent(cfg: Any, path: str) -> tuple[Any, Any]:
    """The container holding `path` ("a/b/0/c": keys and list indices) and the last key."""
    *parents, last = [int(part) if part.isdigit() else part for part in path.split("/")]
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


def _replace_in(path: str, old: str, new: str) -> Callable[[Any], None]:
    def mutate(cfg: Any) -> None:
        target, key = _parent(cfg, path)
        assert old in target[key], (old, target[key])
        target[key] = target[key].replace(old, new)
    return mutate


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
]


@pytest.mark.parametrize("case", BROKEN_LAUNCHER, ids=[c[0] for c in BROKEN_LAUNCHER])
def test_broken_launcher_config_fails_with_a_readable_message(case):
    case_id, name, mutate, message = case
    cfg = load_launcher(name)
    _skip_if_broken(lambda: check_launcher_config(copy.deepcopy(cfg), f"clusters/{name}"), f"clusters/{name}")
    mutate(cfg)
    with pytest.raises(ClusterConfigError, match=message) as info:
        check_launcher_config(cfg, f"clusters/{name} ({case_id})")
    print(info.value)


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
     _set("spec/headGroupSpec/template/spec/containers/1/command/3", "0.0.0.0"),
     r"containers\[mlflow\]\.command: the MLflow server listens on 0\.0\.0\.0"),
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
]


@pytest.mark.parametrize("case", BROKEN_KUBERAY, ids=[c[0] for c in BROKEN_KUBERAY])
def test_broken_kuberay_manifest_fails_with_a_readable_message(case):
    case_id, name, index, mutate, message = case
    doc = load_manifests(name)[index]
    _skip_if_broken(lambda: check_kuberay_manifest(copy.deepcopy(doc), name), f"clusters/kuberay/{name}")
    mutate(doc)
    with pytest.raises(ClusterConfigError, match=message) as info:
        check_kuberay_manifest(doc, f"clusters/kuberay/{name}[{index}] ({case_id})")
    print(info.value)


# ---- versions: the image every config names installs the version in pyproject.toml

def _image_refs() -> list[tuple[str, str]]:
    """(where, image) for every image a launcher config or manifest names."""
    refs = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("image", "head_image", "worker_image") and isinstance(value, str):
                    refs.append((where, value))
                walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for name in LAUNCHER_CONFIGS:
        walk(load_launcher(name), f"clusters/{name}")
    for name in KUBERAY_MANIFESTS:
        walk(load_manifests(name), f"clusters/kuberay/{name}")
    return refs


def _installed_versions() -> list[tuple[str, str]]:
    """(where, afm-ray version) for every afm-ray image tag in clusters/, the Dockerfile's default too."""
    found = [(where, AFM_IMAGE.match(image)["version"]) for where, image in _image_refs() if AFM_IMAGE.match(image)]
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    arg = re.search(r"^ARG AFM_RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert arg, "clusters/Dockerfile has no `ARG AFM_RAY_VERSION=<version>` default"
    found.append(("clusters/Dockerfile ARG AFM_RAY_VERSION", arg.group(1)))
    readme = CLUSTERS / "README.md"
    if readme.is_file():
        found += [("clusters/README.md", v) for v in re.findall(r"afm-ray:([0-9][^-\s`]*)-ray", readme.read_text())]
    return found


def test_pyproject_declares_version():
    path = ROOT / "pyproject.toml"
    assert path.is_file(), "pyproject.toml is missing: the cluster image's version comes from its [project] version"
    version = tomllib.loads(path.read_text()).get("project", {}).get("version")
    assert version, "pyproject.toml has no [project] version: the cluster image's version comes from it"
    assert version == package_version(), (
        f"pyproject.toml says {version}, afm_ray/__init__.py says {package_version()}: keep them equal")


def test_configs_install_the_pyproject_version():
    version = pyproject_version()
    assert version, "pyproject.toml (or its [project] version) is missing; the configs cannot be checked against it"
    wrong = [f"{where}: {found}" for where, found in _installed_versions() if found != version]
    assert not wrong, f"these install another afm-ray than pyproject.toml's {version}: {wrong}"


def test_configs_install_the_package_version():
    version = package_version()
    wrong = [f"{where}: {found}" for where, found in _installed_versions() if found != version]
    assert not wrong, f"these install another afm-ray than afm_ray/__init__.py's {version}: {wrong}"


def test_every_afm_ray_image_is_built_on_the_projects_ray():
    refs = _image_refs()
    assert any(AFM_IMAGE.match(image) for _, image in refs), "no config names the afm-ray image"
    problems = [p for where, image in refs for p in image_problems(image, where)]
    assert not problems, "\n".join(problems)


# ---- the image

def test_dockerfile_builds_on_the_ray_gpu_image_and_pins_the_project():
    text = (CLUSTERS / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1) == f"rayproject/ray:{RAY_VERSION}-py311-gpu", (
        f"clusters/Dockerfile must build on rayproject/ray:{RAY_VERSION}-py311-gpu, found {base and base.group(1)}")
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f == "${BASE_IMAGE}" for f in froms), f"every stage must start FROM ${{BASE_IMAGE}}: {froms}"
    installs = [line for line in re.sub(r"\\\n", " ", text).splitlines() if re.search(r"\bpip install\b", line)]
    assert installs and all("-c /home/ray/constraints.txt" in line for line in installs), (
        f"every pip install in clusters/Dockerfile must use the constraints file: {installs}")
    assert any("afm_ray-${AFM_RAY_VERSION}-py3-none-any.whl" in line for line in installs), (
        "clusters/Dockerfile must install the wheel by its versioned name, so a version mismatch fails the build")
    assert "COPY --chown=ray:users clusters/constraints.txt" in text


def test_dockerignore_lets_in_what_the_build_needs():
    lines = (CLUSTERS / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    needed = {"pyproject.toml", "afm_ray", "search_spaces", "clusters/constraints.txt"}
    if (ROOT / "pyproject.toml").is_file():
        readme = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("project", {}).get("readme")
        if isinstance(readme, str):
            needed.add(readme)  # setuptools reads it while building the wheel
    assert needed <= allowed, f"clusters/Dockerfile.dockerignore keeps out {sorted(needed - allowed)}"


def test_constraints_pin_the_stack_the_project_declares():
    pins = {}
    for line in (CLUSTERS / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s=;]+)", line)
            assert match, f"clusters/constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[match.group(1).lower()] = match.group(2)
    assert pins.get("ray") == RAY_VERSION, f"constraints pin ray=={pins.get('ray')}, the project runs {RAY_VERSION}"
    assert pins.get("mlflow") == MLFLOW_VERSION, f"constraints pin mlflow=={pins.get('mlflow')}, not {MLFLOW_VERSION}"
    assert "torch" in pins, "constraints must pin torch, or pip may replace the CUDA build"
    path = ROOT / "pyproject.toml"
    if not path.is_file():
        pytest.skip("pyproject.toml not written yet: cannot compare the pins with its dependencies")
    env = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    clashes = []
    for spec in tomllib.loads(path.read_text())["project"].get("dependencies", []):
        req = Requirement(spec)
        pinned = pins.get(req.name.lower())
        applies = req.marker is None or req.marker.evaluate(env)
        if pinned and applies and not req.specifier.contains(pinned, prereleases=True):
            clashes.append(f"{req} vs {req.name}=={pinned}")
    assert not clashes, (
        f"clusters/constraints.txt pins what pyproject.toml excludes (the image's Python is 3.11): {clashes}")


def test_aws_iam_policies_match_the_config():
    cfg = load_launcher("aws.yaml")
    profiles = {t["node_config"].get("IamInstanceProfile", {}).get("Name")
                for t in cfg["available_node_types"].values()}
    head_profile = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    worker_profiles = profiles - {head_profile}
    head_policy = json.loads((CLUSTERS / "aws-iam" / "head-policy.json").read_text())
    json.loads((CLUSTERS / "aws-iam" / "worker-policy.json").read_text())
    json.loads((CLUSTERS / "aws-iam" / "ec2-trust.json").read_text())
    passed = {s["Resource"].rsplit("/", 1)[-1] for s in head_policy["Statement"] if s["Action"] == "iam:PassRole"}
    # The README names each role after its instance profile.
    assert worker_profiles <= passed, (
        f"the head may pass roles {sorted(passed)} but launches workers with {sorted(worker_profiles)}: "
        "clusters/aws-iam/head-policy.json must allow iam:PassRole on each")


# ---- commands: the flags the configs and the README pass exist

def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return [s for value in values for s in _strings(value)]


def _afm_ray_commands() -> list[tuple[str, str, str]]:
    """(where, module, arguments) for every `python -m afm_ray.X ...` in clusters/."""
    texts = [(f"clusters/{p.relative_to(CLUSTERS)}", p.read_text()) for p in sorted(CLUSTERS.rglob("*"))
             if p.suffix in (".yaml", ".md")]
    found = []
    for where, text in texts:
        if where.endswith(".yaml"):
            text = "\n".join(_strings(list(yaml.safe_load_all(text))))
        text = re.sub(r"\\\n", " ", text)
        for line in text.splitlines():
            for part in re.split(r"&&|\|\||;|\|", line):
                if match := re.search(r"python3? -m afm_ray\.(\w+)(.*)", part):
                    found.append((where, match.group(1), match.group(2)))
    return found


def test_commands_use_flags_the_modules_define():
    commands = _afm_ray_commands()
    assert any(module == "sweep" for _, module, _ in commands), "clusters/ never runs python -m afm_ray.sweep"
    problems, missing = [], set()
    for where, module, args in commands:
        source = ROOT / "afm_ray" / f"{module}.py"
        if not source.is_file():
            missing.add(module)
            continue
        defined = set(re.findall(r"""add_argument\(\s*["'](--[a-z0-9-]+)["']""", source.read_text()))
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", args):
            if flag not in defined:
                problems.append(f"{where}: python -m afm_ray.{module} {flag}: afm_ray/{module}.py defines no such "
                                f"flag{_did_you_mean(flag, defined)}")
    assert not problems, "\n".join(problems)
    if missing:
        pytest.skip(f"afm_ray modules not written yet: {sorted(missing)}")


def test_job_runtime_env_uploads_the_spaces_but_not_the_package():
    from ray._private.thirdparty.pathspec import PathSpec
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTERS / "job-runtime-env.yaml").read_text())
    extra = set(env) - {"working_dir", "excludes", "env_vars", "config"}
    assert not extra, (f"clusters/job-runtime-env.yaml sets {sorted(extra)}: the image has everything, so a job "
                       "must not install (pip, uv, conda) at start-up")
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    excluded = PathSpec.from_lines("gitwildmatch", env["excludes"]).match_file
    assert excluded("afm_ray") and excluded("afm_ray/sweep.py"), (
        "the job's working dir must leave afm_ray/ out, or Python imports the checkout instead of the pinned package")
    assert not excluded("search_spaces") and not excluded("search_spaces/cifar10_resnet18.yaml")
