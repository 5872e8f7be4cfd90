"""Ray cluster launcher configs (`ray up`): Ray's own schema and config preparation, then this
project's rules (a CPU on-demand head; GPU workers from 0, spot before on-demand; the afm-ray
image; nothing installed at start-up; only SSH open; MLflow on the loopback) and its security
rules (checks/security.py)."""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

import jsonschema
import ray.autoscaler

from checks.common import command_problems, did_you_mean, dotted, image_problems
from checks.security import launcher_auth_problems

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
