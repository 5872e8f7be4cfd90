"""Check the cluster files before `ray up` or `kubectl apply`: offline, no cloud, no cluster, no network.

    python clusters/check.py              # every file under clusters/ it knows how to check
    python clusters/check.py ~/.afm-ray/aws.yaml ~/.afm-ray/raycluster.yaml   # your filled-in copies

One line per problem (`<file>: <where>: <problem>`) and exit status 1, or a one-line summary
and 0; a missing file or one it does not know is one line on stderr and exit status 2. It
needs ray, pyyaml, jsonschema and packaging (and tomli on Python 3.10), not afm-ray itself.

- Ray cluster launcher configs (a YAML mapping with `provider`) are validated against the
  schema inside the installed Ray wheel (ray/autoscaler/ray-schema.json), then against this
  project's rules (a CPU on-demand head; GPU worker types from 0 with resources declared;
  spot preferred over an on-demand fallback; the afm-ray image at the pyproject version; no
  installs at start-up; only SSH open to the outside; MLflow on the loopback), then run
  through Ray's own preparation (`prepare_config`, `validate_config`, the v2 autoscaler's
  `AutoscalingConfig`): what `ray up` and the head's autoscaler do before any cloud call.
- KubeRay manifests (YAML documents with `kind`) are checked structurally (known fields,
  in-tree autoscaling on, GPU groups from 0 with nvidia.com/gpu limits, image tags and
  rayVersion matching Ray, names that resolve to the manifests beside them), and each
  RayCluster goes through Ray's own translation of a RayCluster into the autoscaler's config.
- `python -m afm_ray.X --flag` in either must use a flag that afm_ray/X.py (or the package's
  __main__.py and the afm_ray modules it imports) defines.
- The job runtime env (clusters/job-runtime-env.yaml), the Dockerfile, its .dockerignore, the
  constraints and the AWS IAM documents are checked against pyproject.toml, Ray and aws.yaml.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
RAY_VERSION = ray.__version__
MLFLOW_VERSION = "3.17.2"  # the newest MLflow this stack can install (pyarrow<26)


def _dotted(path: Any) -> str:
    return ".".join(str(part) for part in path) or "<top level>"


def _did_you_mean(key: str, known: Any) -> str:
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields(names: str) -> set[str]:
    return set(names.split())


# ----------------------------------------------------------------------------- versions


def pyproject() -> dict:
    """The repository's pyproject.toml, or {} where there is none."""
    path = ROOT / "pyproject.toml"
    return tomllib.loads(path.read_text()) if path.is_file() else {}


def pyproject_version() -> str | None:
    """pyproject.toml's [project] version, None where it has none."""
    return pyproject().get("project", {}).get("version")


def package_version() -> str | None:
    """afm_ray/__init__.py's __version__, read as text: this script must not import the package."""
    path = ROOT / "afm_ray" / "__init__.py"
    match = path.is_file() and re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", path.read_text(), re.M)
    return match.group(1) if match else None


def expected_version() -> str | None:
    """The version the cluster image must install: pyproject's, or the package's until pyproject exists."""
    return pyproject_version() or package_version()


AFM_IMAGE = re.compile(r"^(?P<repo>(?:\S+/)?afm-ray):(?P<version>[^-\s]+)-ray(?P<ray>[0-9][^-\s]*)(?P<flavour>-\S+)?$")
RAY_IMAGE = re.compile(r"^(?:docker\.io/)?rayproject/ray:(?P<tag>\S+)$")


def image_problems(image: Any, at: str, *, afm_ray: bool = False) -> list[str]:
    """Tag checks; `afm_ray`: the image must be the afm-ray image (it runs Ray and the trials)."""
    if not isinstance(image, str) or not image:
        return [f"{at}: no image"]
    if afm_ray and not AFM_IMAGE.match(image):
        return [
            f"{at}: image {image} is not the afm-ray image (REPOSITORY/afm-ray:<afm-ray version>-ray<Ray "
            "version>-<flavour>, see clusters/build_image.sh): its nodes would have no afm-ray to run"
        ]
    if match := AFM_IMAGE.match(image):
        problems = []
        if match["version"] != expected_version():
            problems.append(
                f"{at}: image {image} installs afm-ray {match['version']}, but pyproject.toml says "
                f"{expected_version()} (rebuild with clusters/build_image.sh and update the tag)"
            )
        if match["ray"] != RAY_VERSION:
            problems.append(f"{at}: image {image} is built on Ray {match['ray']}, the project runs Ray {RAY_VERSION}")
        return problems
    if match := RAY_IMAGE.match(image):
        tag = match["tag"]
        if tag != RAY_VERSION and not tag.startswith(RAY_VERSION + "-"):
            return [f"{at}: image {image} is not Ray {RAY_VERSION} (expected rayproject/ray:{RAY_VERSION}[-...])"]
        return []
    return [
        f"{at}: image {image} is neither the afm-ray image (REPOSITORY/afm-ray:<afm-ray version>-ray<Ray "
        f"version>-<flavour>, see clusters/build_image.sh) nor rayproject/ray:{RAY_VERSION}"
    ]


# ------------------------------------------------------------------------------ commands

INSTALL = re.compile(r"\b(?:pip3?|uv|conda|mamba|micromamba|apt-get|apt|yum|dnf)\b[^;&|\n]*\binstall\b")
MLFLOW_HOST = re.compile(r"--host[= ]+(\S+)")


def command_problems(command: str, at: str) -> list[str]:
    """No installs at start-up; an MLflow server only on the loopback."""
    problems = []
    if match := INSTALL.search(command):
        problems.append(
            f"{at} installs packages at start-up ({match.group(0)!r}): bake them into the image "
            "(clusters/Dockerfile) so a trial starts without installing anything"
        )
    if "mlflow server" in command or "mlflow ui" in command:
        host = MLFLOW_HOST.search(command)
        if not host or host.group(1) not in ("127.0.0.1", "localhost"):
            where = host.group(1) if host else "an unspecified host"
            problems.append(
                f"{at}: the MLflow server listens on {where}; it must say --host 127.0.0.1 "
                "(nothing but SSH is public: reach MLflow through a tunnel)"
            )
    return problems


def strings(node: Any) -> list[str]:
    """Every string in a loaded YAML/JSON tree."""
    if isinstance(node, str):
        return [node]
    values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return [s for value in values for s in strings(value)]


def afm_ray_commands(text: str) -> list[tuple[str, str]]:
    """(module, arguments) for every `python -m afm_ray.X ...` in a shell text or a README."""
    found = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        for part in re.split(r"&&|\|\||;|\|", line):
            if match := re.search(r"python3? -m afm_ray\.(\w+)(.*)", part):
                found.append((match.group(1), match.group(2)))
    return found


def module_sources(module: str) -> list[Path]:
    """Where `python -m afm_ray.<module>` defines its flags: afm_ray/<module>.py, or a package's __main__.py
    and the afm_ray modules it imports from (its parser may live in a shared command-line module)."""
    path, main = ROOT / "afm_ray" / f"{module}.py", ROOT / "afm_ray" / module / "__main__.py"
    if path.is_file() or not main.is_file():
        return [path] if path.is_file() else []
    imported = re.findall(r"^from afm_ray\.(\w+) import", main.read_text(), re.M)
    return [main, *(p for name in imported if (p := ROOT / "afm_ray" / f"{name}.py").is_file())]


FLAG_DEFINITION = re.compile(r"""add_argument\(\s*["'](--[a-z0-9-]+)["']""")


def flag_problems(text: str) -> list[str]:
    """Flags given to `python -m afm_ray.X` that its sources do not define (read as text, not imported)."""
    problems = []
    for module, args in afm_ray_commands(text):
        sources = module_sources(module)
        if not sources:  # a module not written yet: nothing to compare with
            continue
        defined = {flag for source in sources for flag in FLAG_DEFINITION.findall(source.read_text())}
        names = " and ".join(str(source.relative_to(ROOT)) for source in sources)
        verb = "defines" if len(sources) == 1 else "define"
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", args):
            if flag not in defined:
                problems.append(
                    f"python -m afm_ray.{module} {flag}: {names} {verb} no such flag{_did_you_mean(flag, defined)}"
                )
    return problems


# ------------------------------------------------------------- Ray cluster launcher configs

RAY_SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
COMMAND_KEYS = (
    "initialization_commands setup_commands head_setup_commands worker_setup_commands "
    "head_start_ray_commands worker_start_ray_commands"
).split()
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


def launcher_rule_problems(cfg: dict) -> list[str]:
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
            problems.append(
                f"{at}.node_config has no {machine_key}{found}: the cloud would not know which machine to start"
            )
        if kind == "gcp" and "networkInterfaces" not in node_config:
            problems.append(
                f"{at}.node_config has no networkInterfaces: Ray would put the node on the project's first "
                "subnet, whose firewall may open more than SSH; use the afm-ray network (clusters/README.md)"
            )
        is_spot = _is_spot(kind, node_config)
        if name == head:
            if resources.get("GPU", 0):
                problems.append(
                    f"{at}: the head is a CPU node, its resources must not declare a GPU "
                    f"(found GPU: {resources['GPU']})"
                )
            if is_spot:
                problems.append(
                    f"{at}: the head must be on-demand: a reclaimed head takes the sweep driver and MLflow with it"
                )
            continue
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", global_max)
        if high is not None and low > high:
            problems.append(f"{at}: min_workers ({low}) is above max_workers ({high})")
        if low != 0:
            problems.append(f"{at}: min_workers is {low}; GPU workers autoscale from 0 so an idle cluster bills no GPU")
        if high is not None and high < 1:
            problems.append(f"{at}: max_workers is {high}: this type can never start")
        if high is not None and global_max is not None and high > global_max:
            problems.append(
                f"{at}: max_workers ({high}) is above the cluster's max_workers ({global_max}); Ray would "
                "silently cap it"
            )
        if not resources.get("GPU"):
            problems.append(
                f"{at}: resources declare no GPU (found {resources}); every worker type runs trials, which need "
                "a GPU: declare it, e.g. resources: {CPU: 4, GPU: 1}"
            )
        if not resources.get("CPU"):
            problems.append(
                f"{at}: resources declare no CPU (found {resources}); declare the machine's vCPUs, e.g. "
                "resources: {CPU: 4, GPU: 1}"
            )
        if kind == "aws" and "IamInstanceProfile" not in node_config:
            problems.append(
                f"{at}.node_config has no IamInstanceProfile: trials on it could not write checkpoints to S3 "
                "nor pull the image from ECR"
            )
        if kind == "gcp":
            if not node_config.get("serviceAccounts"):
                problems.append(
                    f"{at}.node_config has no serviceAccounts: trials on it could not write checkpoints to GCS"
                )
            if _scheduling(node_config).get("onHostMaintenance") != "TERMINATE":
                problems.append(
                    f"{at}.node_config.scheduling.onHostMaintenance must be TERMINATE: GCE refuses GPU VMs that "
                    "live-migrate"
                )
        (spot if is_spot else on_demand).append((name, node_type.get("priority", 0)))
    if not spot:
        problems.append("no spot GPU worker type: the sweep would pay on-demand prices for every trial")
    if not on_demand:
        problems.append("no on-demand GPU worker type to fall back to when spot capacity runs out")
    for spot_name, spot_priority in spot:
        for fallback, fallback_priority in on_demand:
            if spot_priority <= fallback_priority:
                problems.append(
                    f"available_node_types.{spot_name}: priority {spot_priority} must be above the on-demand "
                    f"fallback {fallback}'s ({fallback_priority}), or the autoscaler may start on-demand GPUs first"
                )

    for rule in provider.get("security_group", {}).get("IpPermissions", []):
        ports = (rule.get("FromPort"), rule.get("ToPort"))
        if ports != (22, 22):
            sources = [r.get("CidrIp") for r in rule.get("IpRanges", [])] or ["?"]
            problems.append(
                f"provider.security_group.IpPermissions opens ports {ports[0]}-{ports[1]} to "
                f"{', '.join(map(str, sources))}; only SSH (22) may be reachable from outside: reach the "
                "dashboard and MLflow through SSH tunnels (`ray dashboard`, `ray attach -p`)"
            )

    docker = cfg.get("docker") or {}
    if not docker.get("image") or not docker.get("container_name"):
        problems.append(
            "docker.image and docker.container_name must be set: without them the nodes run the bare machine "
            "image, which has no afm-ray"
        )
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            problems += image_problems(docker[key], f"docker.{key}", afm_ray=True)
    for name, node_type in types.items():
        if "worker_image" in node_type.get("docker", {}):
            at = f"available_node_types.{name}.docker.worker_image"
            problems += image_problems(node_type["docker"]["worker_image"], at, afm_ray=True)

    commands = [(key, cfg.get(key) or []) for key in COMMAND_KEYS]
    commands += [
        (f"available_node_types.{name}.{key}", node_type[key])
        for name, node_type in types.items()
        for key in ("initialization_commands", "worker_setup_commands")
        if key in node_type
    ]
    for key, lines in commands:
        for i, line in enumerate(lines):
            problems += command_problems(line, f"{key}[{i}]")
    if "--autoscaling-config=~/ray_bootstrap_config.yaml" not in " ".join(cfg.get("head_start_ray_commands") or []):
        problems.append(
            "head_start_ray_commands never start Ray with --autoscaling-config=~/ray_bootstrap_config.yaml: the "
            "autoscaler would not run and no GPU worker would ever start"
        )
    return problems


def prepare_launcher_config(cfg: dict) -> dict:
    """Ray's own preparation, as `ray up` and the v2 autoscaler do it; returns the prepared config or raises."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    AutoscalingConfig(copy.deepcopy(cfg), skip_content_hash=True).get_node_type_configs()
    return prepared


def launcher_problems(cfg: Any) -> list[str]:
    """A whole launcher config: Ray's schema, then the project's rules, then Ray's own preparation.

    Each stage runs only on a config the previous one accepts, so the messages are about the first
    layer that is wrong rather than the cascade of errors it causes further on.
    """
    if not isinstance(cfg, dict):
        return [f"the file holds a {type(cfg).__name__}, not a mapping"]
    if problems := schema_problems(cfg):
        return problems
    if problems := launcher_rule_problems(cfg):
        return problems
    try:
        prepare_launcher_config(cfg)
    except Exception as exc:  # Ray's own checks: whatever they raise is the message
        return [f"Ray's config preparation rejects it: {type(exc).__name__}: {exc}"]
    return []


# ------------------------------------------------------------------------- KubeRay manifests

# Fields of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1/*_types.go, KubeRay 1.4-1.5) and
# of Kubernetes' core/v1 PodSpec and Container: anything else is a typo that strict field
# validation (kubectl's default) rejects.
RAYCLUSTER_SPEC_KEYS = _fields("""
    headGroupSpec workerGroupSpecs rayVersion enableInTreeAutoscaling autoscalerOptions headServiceAnnotations
    suspend managedBy upgradeStrategy authOptions gcsFaultToleranceOptions historyServerOptions networkPolicy
    tlsOptions""")
AUTOSCALER_OPTIONS_KEYS = _fields("""
    resources image imagePullPolicy securityContext idleTimeoutSeconds upscalingMode version env envFrom
    volumeMounts command args""")
HEAD_GROUP_KEYS = _fields(
    "template headService enableIngress ingressOptions resources labels rayStartParams serviceType"
)
WORKER_GROUP_KEYS = _fields("""
    groupName replicas minReplicas maxReplicas idleTimeoutSeconds priority resources labels rayStartParams template
    scaleStrategy numOfHosts suspend""")
RAYJOB_SPEC_KEYS = _fields("""
    entrypoint runtimeEnvYAML jobId submissionMode entrypointResources entrypointNumCpus entrypointNumGpus
    ttlSecondsAfterFinished shutdownAfterJobFinishes suspend schedule activeDeadlineSeconds backoffLimit
    rayClusterSpec submitterPodTemplate metadata clusterSelector submitterConfig managedBy deletionStrategy""")
POD_SPEC_KEYS = _fields("""
    volumes initContainers containers ephemeralContainers restartPolicy terminationGracePeriodSeconds
    activeDeadlineSeconds dnsPolicy nodeSelector serviceAccountName serviceAccount automountServiceAccountToken
    nodeName hostNetwork hostPID hostIPC shareProcessNamespace securityContext imagePullSecrets hostname subdomain
    affinity schedulerName tolerations hostAliases priorityClassName priority dnsConfig readinessGates
    runtimeClassName enableServiceLinks preemptionPolicy overhead topologySpreadConstraints setHostnameAsFQDN os
    hostUsers schedulingGates resourceClaims resources""")
CONTAINER_KEYS = _fields("""
    name image command args workingDir ports envFrom env resources resizePolicy restartPolicy volumeMounts
    volumeDevices livenessProbe readinessProbe startupProbe lifecycle terminationMessagePath
    terminationMessagePolicy imagePullPolicy securityContext stdin stdinOnce tty""")
SPOT_LABELS = {
    "cloud.google.com/gke-spot": "true",
    "eks.amazonaws.com/capacityType": "SPOT",
    "karpenter.sh/capacity-type": "spot",
}
SWEEP_FLAGS = ("--space", "--storage", "--tracking-uri", "--experiment")
# Where a RayJob's --space may point: the spaces baked into the image, or the spaces ConfigMap.
IMAGE_SPACES, CONFIGMAP_SPACES = "/home/ray/search_spaces/", "/home/ray/spaces/"


def unknown_keys(obj: Any, known: set[str], at: str) -> list[str]:
    """Fields of `obj` not in `known`, each with the closest known one."""
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
        command = " ".join(map(str, container.get("command", []) + container.get("args", [])))
        problems += command_problems(command, f"{cat}.command")
    return problems


def start_params_problems(params: Any, at: str) -> list[str]:
    """rayStartParams: KubeRay takes a mapping of strings."""
    if not isinstance(params, dict):
        return [f"{at}: expected a mapping of strings"]
    return [
        f'{at}.{key} is {value!r} ({type(value).__name__}); KubeRay takes strings only: write "{value}"'
        for key, value in params.items()
        if not isinstance(value, str)
    ]


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
    return any(
        expr.get("key") in SPOT_LABELS
        and expr.get("operator") == "In"
        and SPOT_LABELS[expr["key"]] in expr.get("values", [])
        for term in required.get("nodeSelectorTerms", [])
        for expr in term.get("matchExpressions", [])
    )


def raycluster_spec_problems(spec: Any, at: str) -> list[str]:
    """A RayCluster's spec (or a RayJob's rayClusterSpec): fields, autoscaling, head, GPU worker groups."""
    if not isinstance(spec, dict):
        return [f"{at}: missing"]
    problems = unknown_keys(spec, RAYCLUSTER_SPEC_KEYS, at)
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"{at}.rayVersion is {spec.get('rayVersion')!r}; the project runs Ray {RAY_VERSION}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(
            f"{at}.enableInTreeAutoscaling is {spec.get('enableInTreeAutoscaling')!r}: without the in-tree "
            "autoscaler the GPU groups stay at their replicas and never scale from 0"
        )
    options = spec.get("autoscalerOptions") or {}
    problems += unknown_keys(options, AUTOSCALER_OPTIONS_KEYS, f"{at}.autoscalerOptions")

    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append(f"{at}.headGroupSpec is missing")
    else:
        hat = f"{at}.headGroupSpec"
        problems += unknown_keys(head, HEAD_GROUP_KEYS, hat)
        if head.get("serviceType", "ClusterIP") != "ClusterIP":
            problems.append(
                f"{hat}.serviceType is {head['serviceType']}: that exposes the dashboard and GCS outside the "
                "cluster; keep ClusterIP and use kubectl port-forward"
            )
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
                problems.append(
                    f"{gat}: minReplicas is {low}; GPU workers autoscale from 0 so an idle cluster bills no GPU"
                )
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
                problems.append(
                    f"{gat}: the Ray container has no nvidia.com/gpu limit: the pod could land on a CPU node and "
                    "Ray would see no GPU"
                )
            elif request != limit:
                problems.append(
                    f"{gat}: nvidia.com/gpu requests ({request:g}) and limits ({limit:g}) differ; Kubernetes "
                    "requires them equal"
                )
        (spot if _is_spot_group(group) else on_demand).append((group.get("groupName"), group.get("priority", 0)))
    if any("priority" in g for g in groups) and options.get("version") != "v2":
        problems.append(
            f"{at}.autoscalerOptions.version is {options.get('version')!r}: worker-group priorities (spot before "
            "on-demand) are honoured by autoscaler v2 only; set version: v2"
        )
    for spot_name, spot_priority in spot:
        for fallback, fallback_priority in on_demand:
            if spot_priority <= fallback_priority:
                problems.append(
                    f"{at}.workerGroupSpecs[{spot_name}]: priority {spot_priority} must be above the on-demand "
                    f"group {fallback}'s ({fallback_priority}), or the autoscaler may start on-demand GPUs first"
                )
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
    """A RayJob's spec: fields, the sweep's entrypoint and flags, its cluster, its submitter pod."""
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
            problems.append(
                f"spec.entrypoint: --storage {storage.group(1)} must be an s3:// or gs:// URI: worker pods share "
                "no disk with the head"
            )
        tracking = re.search(r"--tracking-uri[ =](\S+)", sweep)
        if tracking and not tracking.group(1).startswith(("http://127.0.0.1:", "http://localhost:")):
            problems.append(
                f"spec.entrypoint: --tracking-uri {tracking.group(1)} is not the MLflow sidecar on the head "
                "(http://127.0.0.1:5000)"
            )
        space = re.search(r"--space[ =](\S+)", sweep)
        space = space.group(1) if space else IMAGE_SPACES  # no --space at all is reported above
        baked = space.removeprefix(IMAGE_SPACES)
        if not space.startswith((IMAGE_SPACES, CONFIGMAP_SPACES)):
            problems.append(
                f"spec.entrypoint: --space {space} is neither in the image ({IMAGE_SPACES}...) nor in the spaces "
                f"ConfigMap ({CONFIGMAP_SPACES}...)"
            )
        elif space.startswith(IMAGE_SPACES) and baked and not (ROOT / "search_spaces" / baked).is_file():
            problems.append(
                f"spec.entrypoint: --space {space}: search_spaces/{baked} is not in the repository, so the image "
                "has no such space"
            )
    if bool(spec.get("clusterSelector")) == ("rayClusterSpec" in spec):
        problems.append(
            "spec: give exactly one of clusterSelector (run on the RayCluster of raycluster.yaml) and "
            "rayClusterSpec (a cluster of the job's own)"
        )
    if "rayClusterSpec" in spec:
        problems += raycluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec")
    if "submitterPodTemplate" in spec:
        problems += pod_problems(spec["submitterPodTemplate"], "spec.submitterPodTemplate", ray_pod=False)
    return problems


def kuberay_problems(doc: Any) -> list[str]:
    """One KubeRay manifest document (RayCluster, RayJob, or a ServiceAccount, PVC or ConfigMap beside them)."""
    if not isinstance(doc, dict):
        return [f"a manifest must be a mapping, found {type(doc).__name__}"]
    kind = doc.get("kind")
    problems = [] if (doc.get("metadata") or {}).get("name") else ["metadata.name is missing"]
    if kind in ("RayCluster", "RayJob"):
        if doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"apiVersion is {doc.get('apiVersion')!r}; KubeRay's {kind} is ray.io/v1")
        if kind == "RayCluster":
            problems += raycluster_spec_problems(doc.get("spec"), "spec")
            if not problems:  # Ray's translation of a broken RayCluster only repeats its problems, less readably
                problems += ray_translation_problems(doc)
        else:
            problems += rayjob_spec_problems(doc.get("spec"))
    elif kind in ("ServiceAccount", "PersistentVolumeClaim", "ConfigMap"):
        if doc.get("apiVersion") != "v1":
            problems.append(f"apiVersion is {doc.get('apiVersion')!r}; a {kind} is v1")
    else:
        problems.append(
            f"kind {kind!r} is not one this project ships (RayCluster, RayJob, ServiceAccount, "
            "PersistentVolumeClaim, ConfigMap)"
        )
    return problems


def kuberay_reference_problems(doc: Any, defined: list, where: str = "clusters/kuberay") -> list[str]:
    """Names `doc` uses that no document in `defined` (the manifests in `where`) defines."""
    names = {(d.get("kind"), (d.get("metadata") or {}).get("name")) for d in defined if isinstance(d, dict)}
    spec = doc.get("spec") if isinstance(doc, dict) else None
    if not isinstance(spec, dict):
        return []
    problems = []
    if doc.get("kind") == "RayJob":
        selected = (spec.get("clusterSelector") or {}).get("ray.io/cluster")
        if selected is not None and ("RayCluster", selected) not in names:
            problems.append(f"spec.clusterSelector selects RayCluster {selected!r}, which {where} does not define")
    if doc.get("kind") == "RayCluster":
        for group in [spec.get("headGroupSpec") or {}, *(spec.get("workerGroupSpecs") or [])]:
            pod = (group.get("template") or {}).get("spec") or {}
            account = pod.get("serviceAccountName")
            if account is not None and ("ServiceAccount", account) not in names:
                problems.append(f"no ServiceAccount {account!r}")
            for volume in pod.get("volumes", []):
                claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                if claim is not None and ("PersistentVolumeClaim", claim) not in names:
                    problems.append(f"no PersistentVolumeClaim {claim!r}")
                config_map = volume.get("configMap")
                if config_map and not config_map.get("optional") and ("ConfigMap", config_map["name"]) not in names:
                    problems.append(f"no ConfigMap {config_map['name']!r}")
    return problems


# -------------------------------------------------- runtime env, image build, IAM documents

RUNTIME_ENV_KEYS = {"working_dir", "excludes", "env_vars", "config"}  # the image has the rest: no pip, uv, conda


def runtime_env_problems(env: Any) -> list[str]:
    """`ray job submit --runtime-env`: upload the search spaces, never the package source, install nothing."""
    from ray._private.thirdparty.pathspec import PathSpec
    from ray.runtime_env import RuntimeEnv

    if not isinstance(env, dict):
        return [f"the file holds a {type(env).__name__}, not a mapping"]
    if extra := set(env) - RUNTIME_ENV_KEYS:
        return [
            f"sets {sorted(extra)}: the image has everything, so a job must not install (pip, uv, conda) at start-up"
        ]
    try:
        RuntimeEnv(**env)  # Ray's own validation of the fields
    except Exception as exc:
        return [f"Ray rejects it: {type(exc).__name__}: {exc}"]
    problems = [] if env.get("working_dir") == "." else [f"working_dir is {env.get('working_dir')!r}, not '.'"]
    excluded = PathSpec.from_lines("gitwildmatch", env.get("excludes") or []).match_file
    if not (excluded("afm_ray") and excluded("afm_ray/sweep.py")):
        problems.append(
            "excludes: the job's working dir must leave afm_ray/ out, or Python imports the checkout instead of "
            "the pinned package"
        )
    if excluded("search_spaces") or excluded("search_spaces/cifar10_resnet18.yaml"):
        problems.append("excludes: search_spaces/ must be uploaded, so the spaces you edit are the ones that run")
    return problems


def dockerfile_problems(text: str) -> list[str]:
    """The image builds on Ray's GPU image and installs the project's wheel at its version, under the constraints."""
    problems = []
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    if not base or base.group(1) != f"rayproject/ray:{RAY_VERSION}-py311-gpu":
        problems.append(
            f"clusters/Dockerfile must build on rayproject/ray:{RAY_VERSION}-py311-gpu, found {base and base.group(1)}"
        )
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    if not froms or any(f != "${BASE_IMAGE}" for f in froms):
        problems.append(f"every stage must start FROM ${{BASE_IMAGE}}: {froms}")
    installs = [line for line in re.sub(r"\\\n", " ", text).splitlines() if re.search(r"\bpip install\b", line)]
    if not installs or any("-c /home/ray/constraints.txt" not in line for line in installs):
        problems.append(f"every pip install in clusters/Dockerfile must use the constraints file: {installs}")
    if not any("afm_ray-${AFM_RAY_VERSION}-py3-none-any.whl" in line for line in installs):
        problems.append(
            "clusters/Dockerfile must install the wheel by its versioned name, so a version mismatch fails the build"
        )
    if "COPY --chown=ray:users clusters/constraints.txt" not in text:
        problems.append("clusters/Dockerfile must COPY --chown=ray:users clusters/constraints.txt into the image")
    arg = re.search(r"^ARG AFM_RAY_VERSION=(\S+)$", text, re.M)
    if not arg:
        problems.append("clusters/Dockerfile has no `ARG AFM_RAY_VERSION=<version>` default")
    elif arg.group(1) != expected_version():
        problems.append(
            f"ARG AFM_RAY_VERSION={arg.group(1)} installs another afm-ray than pyproject.toml's {expected_version()}"
        )
    return problems


def dockerignore_problems(text: str) -> list[str]:
    """The build context lets in what `pip wheel .` and the image need."""
    allowed = {line[1:].rstrip("/") for line in text.splitlines() if line.startswith("!")}
    needed = {"pyproject.toml", "afm_ray", "search_spaces", "clusters/constraints.txt"}
    readme = pyproject().get("project", {}).get("readme")
    if isinstance(readme, str):
        needed.add(readme)  # setuptools reads it while building the wheel
    return [f"clusters/Dockerfile.dockerignore keeps out {sorted(needed - allowed)}"] if needed - allowed else []


# The image's interpreter, for the environment markers of pyproject.toml's dependencies.
IMAGE_MARKERS = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "extra": "",
}


def constraints_problems(text: str) -> list[str]:
    """Exact pins, Ray's and MLflow's versions, and nothing pyproject.toml's dependencies exclude."""
    pins, problems = {}, []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s=;]+)", line)
            if not match:
                problems.append(f"{line!r} is not an exact pin (name==version)")
                continue
            pins[match.group(1).lower()] = match.group(2)
    if pins.get("ray") != RAY_VERSION:
        problems.append(f"constraints pin ray=={pins.get('ray')}, the project runs {RAY_VERSION}")
    if pins.get("mlflow") != MLFLOW_VERSION:
        problems.append(f"constraints pin mlflow=={pins.get('mlflow')}, not {MLFLOW_VERSION}")
    if "torch" not in pins:
        problems.append("constraints must pin torch, or pip may replace the CUDA build")
    clashes = []
    for spec in pyproject().get("project", {}).get("dependencies", []):
        req = Requirement(spec)
        pinned = pins.get(req.name.lower())
        applies = req.marker is None or req.marker.evaluate(IMAGE_MARKERS)
        if pinned and applies and not req.specifier.contains(pinned, prereleases=True):
            clashes.append(f"{req} vs {req.name}=={pinned}")
    if clashes:
        problems.append(f"pins what pyproject.toml excludes (the image's Python is 3.11): {clashes}")
    return problems


def _statements(policy: Any) -> list[dict]:
    statements = policy.get("Statement", []) if isinstance(policy, dict) else []
    return [s for s in statements if isinstance(s, dict)]


def iam_problems(head_policy: dict, cfg: dict) -> list[str]:
    """The head's policy lets it pass the role of every instance profile it launches workers with."""
    types = cfg.get("available_node_types") or {}

    def profile(node_type: dict) -> str | None:
        return ((node_type.get("node_config") or {}).get("IamInstanceProfile") or {}).get("Name")

    head_profile = profile(types.get(cfg.get("head_node_type")) or {})
    # The README names each role after its instance profile.
    workers = {profile(t) for t in types.values()} - {head_profile, None}
    passed = {
        s["Resource"].rsplit("/", 1)[-1]
        for s in _statements(head_policy)
        if s.get("Action") == "iam:PassRole" and isinstance(s.get("Resource"), str)
    }
    if workers <= passed:
        return []
    return [
        f"the head may pass roles {sorted(passed)} but launches workers with {sorted(workers)}: "
        "clusters/aws-iam/head-policy.json must allow iam:PassRole on each"
    ]


# ----------------------------------------------------------------------------------- files


def _yaml_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def file_kind(path: Path) -> str | None:
    """What `path` is: launcher, kuberay, runtime-env, dockerfile, dockerignore, constraints, iam; None if unknown."""
    name = path.name
    if name == "Dockerfile":
        return "dockerfile"
    if name.endswith(".dockerignore"):
        return "dockerignore"
    if path.suffix == ".txt" and "constraints" in name:
        return "constraints"
    if path.suffix == ".json":
        return "iam"
    if path.suffix not in (".yaml", ".yml"):
        return None
    try:
        docs = _yaml_docs(path)
    except yaml.YAMLError:
        return "yaml"  # check_file reports the syntax error
    if path.parent.name == "kuberay" or any(isinstance(d, dict) and "kind" in d for d in docs):
        return "kuberay"
    if len(docs) == 1 and isinstance(docs[0], dict):
        if "provider" in docs[0]:
            return "launcher"
        if {"working_dir", "py_modules", "pip", "uv", "conda", "excludes", "env_vars"} & set(docs[0]):
            return "runtime-env"
    return None


TEXT_CHECKS = {
    "dockerfile": dockerfile_problems,
    "dockerignore": dockerignore_problems,
    "constraints": constraints_problems,
}


def _label(doc: Any, index: int) -> str:
    """How a line names a manifest document: its kind and name, else its position in the file."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc, dict) else None
    return f"{kind} {name}" if kind and name else f"document {index + 1}"


def check_file(path: Path | str) -> list[str]:
    """Every problem in one file, each `<where>: <problem>` on one line; raises ValueError for an unknown file."""
    path = Path(path)
    kind = file_kind(path)
    if kind is None:
        raise ValueError(
            "not a file check.py knows (a launcher config, KubeRay manifest, runtime env, Dockerfile, "
            ".dockerignore, constraints .txt or IAM .json)"
        )
    text = path.read_text()
    if kind == "yaml":
        try:
            list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            return [" ".join(f"not valid YAML: {exc}".split())]
        return []
    if kind == "launcher":
        cfg = yaml.safe_load(text)
        problems = launcher_problems(cfg) + flag_problems("\n".join(strings(cfg)))
    elif kind == "kuberay":
        docs = _yaml_docs(path)
        around = [d for p in sorted(path.parent.glob("*.y*ml")) if file_kind(p) == "kuberay" for d in _yaml_docs(p)]
        problems = []
        for i, doc in enumerate(docs):
            found = kuberay_problems(doc) + kuberay_reference_problems(doc, around, shown(path.parent))
            found += flag_problems("\n".join(strings(doc)))
            problems += [f"{_label(doc, i)}: {p}" for p in found]
    elif kind == "runtime-env":
        problems = runtime_env_problems(yaml.safe_load(text))
    elif kind in TEXT_CHECKS:
        problems = TEXT_CHECKS[kind](text)
    else:
        try:
            policy = json.loads(text)
        except json.JSONDecodeError as exc:
            return [f"not valid JSON: {exc}"]
        problems = []
        # A head policy (it passes roles) is compared with the AWS config beside it, where there is one.
        passes = any(s.get("Action") == "iam:PassRole" for s in _statements(policy))
        config = next((p for p in (path.parent / "aws.yaml", path.parent.parent / "aws.yaml") if p.is_file()), None)
        if passes and config and file_kind(config) == "launcher":  # a broken aws.yaml is reported as itself
            problems = [f"iam:PassRole: {p}" for p in iam_problems(policy, yaml.safe_load(config.read_text()))]
    # Ray's exceptions and YAML's errors span lines; a problem is one line of output.
    return [" ".join(p.split()) for p in problems]


def shown(path: Path) -> str:
    """`path` as the output names it: from the repository root where it is inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def cluster_files(clusters: Path = CLUSTERS) -> list[Path]:
    """Every file under `clusters` that check_file knows how to check."""
    return [p for p in sorted(clusters.rglob("*")) if p.is_file() and file_kind(p) is not None]


def check_all(clusters: Path = CLUSTERS) -> dict[Path, list[str]]:
    """check_file for every file of cluster_files(clusters)."""
    return {path: check_file(path) for path in cluster_files(clusters)}


def main(argv: list[str]) -> int:
    """The command line: check the files named (or all of clusters/), print the problems; the exit status."""
    if tomllib is None:
        print("check.py: reading pyproject.toml needs Python >= 3.11 or the tomli package", file=sys.stderr)
        return 2
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    for arg in argv:
        path = Path(arg)
        bad = "unknown option" if arg.startswith("-") else None if path.is_file() else "no such file"
        if bad is None and file_kind(path) is None:
            bad = "not a launcher config, KubeRay manifest, runtime env, Dockerfile, .dockerignore, constraints or IAM"
        if bad:
            print(f"check.py: {arg}: {bad}", file=sys.stderr)
            return 2
    # prepare_config logs one INFO line per node type: noise next to the problems.
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    if argv:
        results = {Path(arg): check_file(arg) for arg in argv}
    else:
        results = {shown(path): problems for path, problems in check_all().items()}
    lines = [f"{path}: {problem}" for path, problems in results.items() for problem in problems]
    for line in lines:
        print(line)
    if lines:
        return 1
    files = f"{len(results)} file{'s' if len(results) != 1 else ''} checked"
    print(f"clusters/: {files}, no problems" if not argv else f"{files}, no problems")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
