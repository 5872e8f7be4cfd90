"""Ray cluster launcher configs (`ray up`): Ray's own schema and config preparation, then this
project's rules: a CPU on-demand head with an identity of its own; GPU workers from 0, spot before
on-demand, each type a machine that has the CPUs, memory and GPUs it declares, booting an image whose
NVIDIA driver runs the image's torch, and checking its GPU before it joins; every shipped space fits
a worker type and the head holds the trials' drivers (checks/fit.py); the afm-ray image; nothing
installed at start-up; only SSH open; MLflow on the loopback; no state on the head and no credential
in the file (checks/stores.py); the security rules (checks/security.py)."""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import ray.autoscaler

from checks.common import CLUSTERS, command_problems, did_you_mean, dotted, image_problems, strings
from checks.fit import fit_problems, launcher_node_types
from checks.machines import CUDA_MIN_DRIVER, image_driver, machine, torch_cuda
from checks.security import launcher_auth_problems
from checks.stores import MLFLOW_STORE_ENV, OPTUNA_STORE_ENV, credential_problems, mlflow_server_problems

RAY_SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
COMMAND_KEYS = (
    "initialization_commands setup_commands head_setup_commands worker_setup_commands "
    "head_start_ray_commands worker_start_ray_commands"
).split()
MACHINE_KEY = {"aws": "InstanceType", "gcp": "machineType"}
GPU_CHECK = "python /home/ray/node/gpu_check.py"  # clusters/node/gpu_check.py, in the image


def schema_problems(cfg: dict) -> list[str]:
    """Ray's ray-schema.json, every error with its path (Ray itself stops at the first)."""
    schema = json.loads(RAY_SCHEMA_PATH.read_text())
    problems = []
    for error in sorted(jsonschema.Draft7Validator(schema).iter_errors(cfg), key=lambda e: list(e.absolute_path)):
        message = error.message
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set(error.schema.get("properties", {}))
            extra = sorted(set(error.instance) - known)
            message = "; ".join(f"unknown key {k!r}{did_you_mean(k, known)}" for k in extra) or message
        problems.append(f"{dotted(error.absolute_path)}: {message} [ray-schema.json]")
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
        problems += machine_problems(kind, name, node_type)
        if name == head:
            if kind == "aws" and "IamInstanceProfile" not in node_config:
                problems.append(
                    f"{at}.node_config has no IamInstanceProfile: `ray up` would create and use its own head role, "
                    "ray-autoscaler-v1, with AmazonEC2FullAccess and AmazonS3FullAccess; name afm-ray-head"
                )
            if "initialization_commands" in node_type:
                problems.append(
                    f"{at}.initialization_commands are never run: `ray up` runs the global initialization_commands "
                    "on the head; move them there (and give the worker types their own list)"
                )
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
        problems += driver_problems(kind, name, node_config)
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

    if provider.get("cache_stopped_nodes") is not False:
        problems.append(
            "provider.cache_stopped_nodes must be false: Ray would stop idle nodes for reuse (a stopped node bills "
            "its disk, and the head would need rights to stop and start instances)"
        )
    problems += launcher_auth_problems(cfg)

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
    problems += gpu_check_problems(cfg)
    problems += head_store_problems(cfg)
    problems += credential_problems(strings(cfg))
    known = {n: m for n, t in types.items() if (m := machine(kind, t.get("node_config") or {})[1])}
    if len(known) == len(types):  # an unknown machine is reported above; its shape would be a guess
        problems += fit_problems(*launcher_node_types(cfg, known))
    if "--autoscaling-config=~/ray_bootstrap_config.yaml" not in " ".join(cfg.get("head_start_ray_commands") or []):
        problems.append(
            "head_start_ray_commands never start Ray with --autoscaling-config=~/ray_bootstrap_config.yaml: the "
            "autoscaler would not run and no GPU worker would ever start"
        )
    return problems


def machine_problems(provider: str, name: str, node_type: dict) -> list[str]:
    """The node type's machine is one check.py knows, with at least the CPUs, memory and GPUs declared."""
    at = f"available_node_types.{name}"
    machine_name, found = machine(provider, node_type.get("node_config") or {})
    if machine_name is None:
        return []  # reported as a missing machine type
    if found is None:
        return [
            f"{at}: check.py does not know the machine type {machine_name}: add it to clusters/checks/machines.py "
            "with its vCPUs, memory and GPUs from the provider's page, so its declared resources can be checked"
        ]
    resources = node_type.get("resources") or {}
    problems = []
    if resources.get("GPU", 0) > found.gpus:
        what = f"{found.gpus} GPU" + ("s" if found.gpus != 1 else "") if found.gpus else "no GPU"
        problems.append(
            f"{at}: declares GPU: {resources['GPU']} but {machine_name} has {what}: the autoscaler would send GPU "
            "trials to a machine that cannot run them"
        )
    if resources.get("CPU", 0) > found.vcpus:
        problems.append(f"{at}: declares CPU: {resources['CPU']} but {machine_name} has {found.vcpus} vCPUs")
    if resources.get("memory", 0) > found.memory_gib * 1024**3:
        problems.append(
            f"{at}: declares memory {resources['memory'] / 1024**3:.1f} GiB but {machine_name} has "
            f"{found.memory_gib:g} GiB"
        )
    return problems


def image_torch_cuda() -> str | None:
    """The CUDA of the torch the cluster image installs: clusters/constraints.txt's pin, Dockerfile's index."""
    constraints = (CLUSTERS / "constraints.txt").read_text() if (CLUSTERS / "constraints.txt").is_file() else ""
    dockerfile = (CLUSTERS / "Dockerfile").read_text() if (CLUSTERS / "Dockerfile").is_file() else ""
    pin = re.search(r"^torch==(\S+)", constraints, re.M)
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S*)", dockerfile, re.M)
    return torch_cuda(pin and pin.group(1), index.group(1) if index else "")


def driver_problems(provider: str, name: str, node_config: dict) -> list[str]:
    """A GPU type's boot image has an NVIDIA driver that runs the image's torch build."""
    at = f"available_node_types.{name}.node_config"
    cuda = image_torch_cuda()
    needed = CUDA_MIN_DRIVER.get(cuda or "")
    if needed is None:
        return [
            f"{at}: check.py does not know the CUDA of the image's torch (clusters/constraints.txt, Dockerfile's "
            "TORCH_INDEX_URL): add it to clusters/checks/machines.py"
        ]
    image, driver = image_driver(provider, node_config)
    if driver is None:
        return [
            f"{at}: check.py cannot tell the NVIDIA driver of image {image or '(none)'}: use an image whose driver it "
            "knows (clusters/checks/machines.py: the DLAMI's SSM parameter, a GCP family ending -nvidia-NNN) or add it"
        ]
    if driver < needed:
        return [
            f"{at}: image {image} has NVIDIA driver {driver}, older than the {needed} that the image's torch "
            f"(CUDA {cuda}) needs: torch.cuda.is_available() would be False on every node; use a -nvidia-{needed} "
            "(or newer) image, or build torch for an older CUDA (TORCH_INDEX_URL)"
        ]
    return []


def gpu_check_problems(cfg: dict) -> list[str]:
    """Every GPU type runs the GPU check before it starts Ray (a failed check keeps the node out)."""
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    problems = []
    for name, node_type in types.items():
        if name == head or not (node_type.get("resources") or {}).get("GPU"):
            continue
        setup = list(node_type.get("worker_setup_commands", cfg.get("worker_setup_commands") or []))
        start = list(cfg.get("worker_start_ray_commands") or [])
        before_ray = setup + [c for c in start[: next((i for i, c in enumerate(start) if "ray start" in c), 0)]]
        checked = [c for c in before_ray if GPU_CHECK in str(c)]
        if not checked or any(re.search(r"\|\||;|&\s*$", str(c)) for c in checked):
            problems.append(
                f"available_node_types.{name}: a GPU node type whose nodes never run `{GPU_CHECK}` as a command of "
                "its own before `ray start` (worker_setup_commands or worker_start_ray_commands): a node whose "
                "driver cannot run torch's CUDA would join Ray and fail every trial placed on it"
            )
    return problems


def _head_env(cfg: dict) -> set[str]:
    """The variables the head's container gets from a secret: the --env-file the global initialization
    commands fetch from the cloud's secret store (the file's content is the secret's: assumed to hold both)."""
    docker = cfg.get("docker") or {}
    files = [
        m.group(1)
        for o in list(docker.get("run_options") or []) + list(docker.get("head_run_options") or [])
        if (m := re.fullmatch(r"--env-file[ =](\S+)", str(o).strip()))
    ]
    fetch = ("secretsmanager get-secret-value", "gcloud secrets versions access")
    commands = [str(c) for c in cfg.get("initialization_commands") or []]
    from_secret = [f for f in files if any(any(x in c for x in fetch) and f.rsplit("/", 1)[-1] in c for c in commands)]
    return {MLFLOW_STORE_ENV, OPTUNA_STORE_ENV} if from_secret else set()


def head_store_problems(cfg: dict) -> list[str]:
    """The head's MLflow server keeps its store in the database, its artifacts in the bucket."""
    env = _head_env(cfg)
    problems = []
    for i, command in enumerate(cfg.get("head_start_ray_commands") or []):
        problems += mlflow_server_problems(str(command), f"head_start_ray_commands[{i}]", env)
    docker = cfg.get("docker") or {}
    for option in docker.get("head_run_options") or []:
        if m := re.fullmatch(r"--env-file[ =](\S+)", str(option).strip()):
            name = m.group(1).rsplit("/", 1)[-1]
            writes = [str(c) for c in cfg.get("initialization_commands") or [] if name in str(c)]
            if writes and not any(re.search(r"\bumask 0?077\b|\binstall\b.*\s-m\s*0?[46]00\b", c) for c in writes):
                problems.append(
                    f"initialization_commands: {m.group(1)} (the database URLs) is written without `umask 077`: any "
                    "user on the head could read the database's password"
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
