"""KubeRay manifests: known fields (what kubectl's strict validation would reject), in-tree
autoscaling on, GPU groups from 0 with nvidia.com/gpu limits, images and rayVersion matching Ray,
names that resolve to the manifests beside them, Ray's own reading of each RayCluster, and the
security rules (checks/security.py)."""

from __future__ import annotations

import copy
import re
import shlex
from typing import Any

import yaml

from checks.common import RAY_VERSION, ROOT, command_problems, did_you_mean, fields, image_problems
from checks.security import network_policy_problems, raycluster_auth_problems, rayjob_auth_problems, token_secret

# Fields of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1/*_types.go, KubeRay 1.4-1.5) and
# of Kubernetes' core/v1 PodSpec and Container: anything else is a typo that strict field
# validation (kubectl's default) rejects.
RAYCLUSTER_SPEC_KEYS = fields("""
    headGroupSpec workerGroupSpecs rayVersion enableInTreeAutoscaling autoscalerOptions headServiceAnnotations
    suspend managedBy upgradeStrategy authOptions gcsFaultToleranceOptions historyServerOptions networkPolicy
    tlsOptions""")
AUTOSCALER_OPTIONS_KEYS = fields("""
    resources image imagePullPolicy securityContext idleTimeoutSeconds upscalingMode version env envFrom
    volumeMounts command args""")
HEAD_GROUP_KEYS = fields(
    "template headService enableIngress ingressOptions resources labels rayStartParams serviceType"
)
WORKER_GROUP_KEYS = fields("""
    groupName replicas minReplicas maxReplicas idleTimeoutSeconds priority resources labels rayStartParams template
    scaleStrategy numOfHosts suspend""")
RAYJOB_SPEC_KEYS = fields("""
    entrypoint runtimeEnvYAML jobId submissionMode entrypointResources entrypointNumCpus entrypointNumGpus
    ttlSecondsAfterFinished shutdownAfterJobFinishes suspend schedule activeDeadlineSeconds backoffLimit
    rayClusterSpec submitterPodTemplate metadata clusterSelector submitterConfig managedBy deletionStrategy""")
POD_SPEC_KEYS = fields("""
    volumes initContainers containers ephemeralContainers restartPolicy terminationGracePeriodSeconds
    activeDeadlineSeconds dnsPolicy nodeSelector serviceAccountName serviceAccount automountServiceAccountToken
    nodeName hostNetwork hostPID hostIPC shareProcessNamespace securityContext imagePullSecrets hostname subdomain
    affinity schedulerName tolerations hostAliases priorityClassName priority dnsConfig readinessGates
    runtimeClassName enableServiceLinks preemptionPolicy overhead topologySpreadConstraints setHostnameAsFQDN os
    hostUsers schedulingGates resourceClaims resources""")
CONTAINER_KEYS = fields("""
    name image command args workingDir ports envFrom env resources resizePolicy restartPolicy volumeMounts
    volumeDevices livenessProbe readinessProbe startupProbe lifecycle terminationMessagePath
    terminationMessagePolicy imagePullPolicy securityContext stdin stdinOnce tty""")
NETWORK_POLICY_SPEC_KEYS = fields("podSelector policyTypes ingress egress")
SPOT_LABELS = {
    "cloud.google.com/gke-spot": "true",
    "eks.amazonaws.com/capacityType": "SPOT",
    "karpenter.sh/capacity-type": "spot",
}
SWEEP_FLAGS = ("--space", "--storage", "--tracking-uri", "--experiment")
# Where a RayJob's --space may point: the spaces baked into the image, or the spaces ConfigMap.
# Where a RayJob's --space may point: a space shipped in the package (by name), or the spaces ConfigMap.
SHIPPED_SPACES, CONFIGMAP_SPACES = ROOT / "afm_ray" / "search_spaces", "/home/ray/spaces/"
BUCKETS = ("s3://", "gs://")
EMBEDDED_DATA = ("mnist5k", "digits")  # ship inside Python packages: no data.root needed
TRAIN_TEACHER = "train"  # teacher.checkpoint's value that has the sweep train the teacher first


def unknown_keys(obj: Any, known: set[str], at: str) -> list[str]:
    """Fields of `obj` not in `known`, each with the closest known one."""
    if not isinstance(obj, dict):
        return [f"{at}: expected a mapping, found {type(obj).__name__}"]
    return [f"{at}: unknown field {key!r}{did_you_mean(key, known)}" for key in obj if key not in known]


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


def sweep_arguments(entrypoint: str) -> list[str] | None:
    """The arguments given to `python -m afm_ray.sweep` in a shell command line (None if it runs no sweep)."""
    for part in re.split(r"&&|\|\||;", entrypoint):
        words = shlex.split(part)
        for i in range(len(words) - 2):
            if re.fullmatch(r"python3?", words[i]) and words[i + 1 : i + 3] == ["-m", "afm_ray.sweep"]:
                return words[i + 3 :]
    return None


def _overrides(args: list[str]) -> dict[str, str]:
    """The sweep's --set key=value pairs."""
    pairs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--set"]
    pairs += [arg.removeprefix("--set=") for arg in args if arg.startswith("--set=")]
    return dict(pair.partition("=")[::2] for pair in pairs)


def _flag(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _shipped_space(name: str) -> dict:
    """The fixed keys of a space shipped in afm_ray/search_spaces (read as YAML, afm-ray is not imported)."""
    path = SHIPPED_SPACES / f"{name.removesuffix('.yaml')}.yaml"
    return (yaml.safe_load(path.read_text()) or {}).get("fixed") or {} if path.is_file() else {}


def sweep_problems(args: list[str]) -> list[str]:
    """What the sweep of a RayJob needs in a cluster whose pods share no disk: a space the image has,
    storage, data and teacher in a bucket, MLflow beside the driver."""
    problems = []
    for flag in SWEEP_FLAGS:
        if _flag(args, flag) is None:
            problems.append(f"spec.entrypoint: the sweep is given no {flag}")
    storage = _flag(args, "--storage")
    if storage and not storage.startswith(BUCKETS):
        problems.append(
            f"spec.entrypoint: --storage {storage} must be an s3:// or gs:// URI: worker pods share no disk with "
            "the head"
        )
    tracking = _flag(args, "--tracking-uri")
    if tracking and not tracking.startswith(("http://127.0.0.1:", "http://localhost:")):
        problems.append(
            f"spec.entrypoint: --tracking-uri {tracking} is not the MLflow sidecar on the head (http://127.0.0.1:5000)"
        )
    space = _flag(args, "--space")
    if space is None:
        return problems
    fixed = {}
    if not space.startswith(CONFIGMAP_SPACES):
        if "/" in space or not (SHIPPED_SPACES / f"{space.removesuffix('.yaml')}.yaml").is_file():
            shipped = sorted(p.stem for p in SHIPPED_SPACES.glob("*.yaml"))
            return problems + [
                f"spec.entrypoint: --space {space} is neither a space shipped in afm-ray ({', '.join(shipped)}) nor "
                f"one in the spaces ConfigMap ({CONFIGMAP_SPACES}NAME.yaml)"
            ]
        fixed = _shipped_space(space)
    values = {**{k: str(v) for k, v in fixed.items()}, **_overrides(args)}
    if values.get("data.name", "mnist5k") not in EMBEDDED_DATA and not values.get("data.root", "").startswith(BUCKETS):
        problems.append(
            f"spec.entrypoint: the workers would read data.root {values.get('data.root') or '(none)'!r} from their own "
            "disk; pass --set data.root=s3://BUCKET/... (or gs://) where the dataset is"
        )
    teacher = values.get("teacher.checkpoint")
    if teacher is not None and teacher != TRAIN_TEACHER and not teacher.startswith(BUCKETS):
        problems.append(
            f"spec.entrypoint: teacher.checkpoint {teacher or '(empty)'!r} is not in a bucket: pass --set "
            f"teacher.checkpoint=s3://BUCKET/... (or {TRAIN_TEACHER} to have the sweep train one first)"
        )
    return problems


def rayjob_spec_problems(spec: Any) -> list[str]:
    """A RayJob's spec: fields, the sweep's entrypoint and flags, its cluster, its submitter pod."""
    if not isinstance(spec, dict):
        return ["spec: missing"]
    problems = unknown_keys(spec, RAYJOB_SPEC_KEYS, "spec")
    entrypoint = spec.get("entrypoint", "")
    problems += command_problems(entrypoint, "spec.entrypoint")
    try:
        args = sweep_arguments(entrypoint)
    except ValueError as exc:  # unbalanced quotes
        return problems + [f"spec.entrypoint is not a valid shell command line: {exc}"]
    if args is None:
        problems.append(f"spec.entrypoint does not run `python -m afm_ray.sweep` (found {entrypoint!r})")
    else:
        problems += sweep_problems(args)
    if bool(spec.get("clusterSelector")) == ("rayClusterSpec" in spec):
        problems.append(
            "spec: give exactly one of clusterSelector (run on the RayCluster of raycluster.yaml) and "
            "rayClusterSpec (a cluster of the job's own)"
        )
    if "rayClusterSpec" in spec:
        problems += raycluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec")
    if "submitterPodTemplate" in spec:
        problems += pod_problems(spec["submitterPodTemplate"], "spec.submitterPodTemplate", ray_pod=False)
    return problems + rayjob_auth_problems(spec)


def kuberay_problems(doc: Any) -> list[str]:
    """One KubeRay manifest document (RayCluster, RayJob, or a NetworkPolicy, ServiceAccount, PVC or
    ConfigMap beside them)."""
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
            if isinstance(doc.get("spec"), dict):
                problems += raycluster_auth_problems(doc["spec"])
        else:
            problems += rayjob_spec_problems(doc.get("spec"))
    elif kind in ("ServiceAccount", "PersistentVolumeClaim", "ConfigMap"):
        if doc.get("apiVersion") != "v1":
            problems.append(f"apiVersion is {doc.get('apiVersion')!r}; a {kind} is v1")
    elif kind == "NetworkPolicy":
        if doc.get("apiVersion") != "networking.k8s.io/v1":
            problems.append(f"apiVersion is {doc.get('apiVersion')!r}; a NetworkPolicy is networking.k8s.io/v1")
        problems += unknown_keys(doc.get("spec") or {}, NETWORK_POLICY_SPEC_KEYS, "spec")
    elif kind == "Secret":
        problems.append(
            "a Secret in the repository puts its credentials in git: create it with kubectl (clusters/README.md)"
        )
    else:
        problems.append(
            f"kind {kind!r} is not one this project ships (RayCluster, RayJob, NetworkPolicy, ServiceAccount, "
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
        clusters = [d for d in defined if isinstance(d, dict) and d.get("kind") == "RayCluster"]
        cluster = next((d for d in clusters if (d.get("metadata") or {}).get("name") == selected), None)
        if cluster is not None and token_secret(doc) and token_secret(doc) != token_secret(cluster):
            problems.append(
                f"the submitter reads its token from Secret {token_secret(doc)!r}, RayCluster {selected} from "
                f"{token_secret(cluster)!r}: `ray job submit` would be refused"
            )
    if doc.get("kind") == "RayCluster":
        problems += network_policy_problems(doc, defined)
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
