"""KubeRay manifests: KubeRay 1.7.0's own CRDs (checks/crd.py: fields, types, enums), then this
project's rules: in-tree autoscaling v2 with an allocation time-out, GPU groups from 0 with
nvidia.com/gpu limits, each GPU pod checking its GPU before `ray start`, worker pods large enough for
every shipped space and a head that holds the trials' drivers (Ray's own translation of the CR,
checks/fit.py), workers with a service account of their own and no API token, images and rayVersion
matching Ray, names that resolve to the manifests beside them, MLflow and the Optuna study in
PostgreSQL (checks/stores.py) with the database's own rules, a RayJob that runs the sweep alone with
its data and teacher in a bucket, and the security rules (checks/security.py)."""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml

from checks.common import RAY_VERSION, ROOT, command_problems, did_you_mean, fields, image_problems, strings
from checks.crd import KUBERAY_VERSION, crd_problems, pod_template_validator, schema_problems
from checks.fit import SPACE_FLAGS, fit_problems, kuberay_node_types, load_space
from checks.security import (
    database_policy_problems,
    network_policy_problems,
    raycluster_auth_problems,
    rayjob_auth_problems,
    token_secret,
)
from checks.stores import (
    credential_problems,
    mlflow_server_problems,
    secret_env,
    sweep_store_problems,
)

NETWORK_POLICY_SPEC_KEYS = fields("podSelector policyTypes ingress egress")
SPOT_LABELS = {
    "cloud.google.com/gke-spot": "true",
    "eks.amazonaws.com/capacityType": "SPOT",
    "karpenter.sh/capacity-type": "spot",
}
SWEEP_FLAGS = ("--space", "--storage", "--tracking-uri", "--experiment")
# Where a RayJob's --space may point: a space shipped in the package (by name), or the spaces ConfigMap.
SHIPPED_SPACES, CONFIGMAP_SPACES = ROOT / "afm_ray" / "search_spaces", "/home/ray/spaces/"
BUCKETS = ("s3://", "gs://")
EMBEDDED_DATA = ("mnist5k", "digits")  # ship inside Python packages: no data.root needed
TRAIN_TEACHER = "train"  # teacher.checkpoint's value that has the sweep train the teacher first
GPU_CHECK = "python /home/ray/node/gpu_check.py"  # clusters/node/gpu_check.py, in the image
# Ray's autoscaler v2 ranks a group last once one of its pods stays unallocated this long (Ray's
# default 3600 s keeps a pending spot pod blocking its trial for an hour before on-demand is tried).
ALLOCATION_TIMEOUT_ENV = "RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S"
ALLOCATION_TIMEOUT_RANGE = (300, 1800)
SHIPPED_KINDS = (
    "RayCluster, RayJob, NetworkPolicy, ServiceAccount, PersistentVolumeClaim, ConfigMap, Service, StatefulSet"
)
DATABASE_IMAGE = re.compile(r"^(?:docker\.io/)?(?:library/)?postgres:(\d+)\.(\d+)(?:-\S+)?$")


def unknown_keys(obj: Any, known: set[str], at: str) -> list[str]:
    """Fields of `obj` not in `known`, each with the closest known one."""
    if not isinstance(obj, dict):
        return [f"{at}: expected a mapping, found {type(obj).__name__}"]
    return [f"{at}: unknown field {key!r}{did_you_mean(key, known)}" for key in obj if key not in known]


def _quantity(value: Any) -> float:
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    return float(parse_quantity(str(value)))


def pod_problems(template: Any, at: str, *, ray_pod: bool = True, images: bool = True) -> list[str]:
    """Images, start-up commands and published ports; in a Ray pod the first container (the Ray one) runs
    the afm-ray image. (Fields and types: the CRD, checks/crd.py.)"""
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        return [f"{at}: no pod template spec"]
    spec = template["spec"]
    if not spec.get("containers"):
        return [f"{at}.spec.containers is empty: the first container is the Ray container"]
    problems = []
    if spec.get("hostNetwork"):
        problems.append(
            f"{at}.spec.hostNetwork is true: the pod's ports would be the node's, reachable from outside the "
            "NetworkPolicy"
        )
    for key in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(key) or []):
            if not isinstance(container, dict):
                continue
            cat = f"{at}.spec.{key}[{container.get('name', i)}]"
            if images:
                problems += image_problems(
                    container.get("image"), cat, afm_ray=ray_pod and key == "containers" and i == 0
                )
            command = " ".join(map(str, (container.get("command") or []) + (container.get("args") or [])))
            problems += command_problems(command, f"{cat}.command")
            for port in container.get("ports") or []:
                if isinstance(port, dict) and port.get("hostPort"):
                    problems.append(
                        f"{cat}: port {port.get('containerPort')} has hostPort {port['hostPort']}: it is published on "
                        "the node's address, outside the NetworkPolicy; use kubectl port-forward"
                    )
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


def _pod_spec(group: dict) -> dict:
    spec = (group.get("template") or {}).get("spec") if isinstance(group, dict) else None
    return spec if isinstance(spec, dict) else {}


def _gpu_limit(group: dict) -> tuple[float, float]:
    containers = _pod_spec(group).get("containers") or [{}]
    resources = containers[0].get("resources") or {}
    limit = (resources.get("limits") or {}).get("nvidia.com/gpu", 0)
    request = (resources.get("requests") or {}).get("nvidia.com/gpu", limit)
    return _quantity(limit), _quantity(request)


def _is_spot_group(group: dict) -> bool:
    affinity = _pod_spec(group).get("affinity") or {}
    required = affinity.get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
    node_selector = _pod_spec(group).get("nodeSelector") or {}
    if any(node_selector.get(k) == v for k, v in SPOT_LABELS.items()):
        return True
    return any(
        expr.get("key") in SPOT_LABELS
        and expr.get("operator") == "In"
        and SPOT_LABELS[expr["key"]] in expr.get("values", [])
        for term in required.get("nodeSelectorTerms", [])
        for expr in term.get("matchExpressions", [])
    )


def _env_value(container: dict, name: str) -> str | None:
    for entry in container.get("env") or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry.get("value")
    return None


def allocation_timeout_problems(options: dict, at: str) -> list[str]:
    """The autoscaler gives up on a pending pod in minutes, so a spot group without capacity falls back."""
    value = _env_value(options, ALLOCATION_TIMEOUT_ENV)
    low, high = ALLOCATION_TIMEOUT_RANGE
    if value is None:
        return [
            f"{at}.autoscalerOptions.env sets no {ALLOCATION_TIMEOUT_ENV}: a spot pod that finds no spot node stays "
            "pending for Ray's default 3600 s before the autoscaler tries the on-demand group; set it to about 900"
        ]
    if not str(value).isdigit() or not low <= int(value) <= high:
        return [
            f"{at}.autoscalerOptions.env {ALLOCATION_TIMEOUT_ENV} is {value!r}: give seconds in [{low}, {high}], long "
            "enough for a GPU node to come up and pull the image, short enough to fall back from spot"
        ]
    return []


def gpu_check_problems(group: dict, at: str) -> list[str]:
    """A GPU pod runs the GPU check before KubeRay's `ray start`, and a failed check stops the pod.

    KubeRay runs a Ray container's own command as `<command> <args> && ulimit ...; ray start ...`
    (ray-operator/controllers/ray/common/pod.go, BuildPod): the `;` means `ray start` runs even after a
    failed check unless the check exits the shell itself (`|| exit 1`)."""
    containers = _pod_spec(group).get("containers") or [{}]
    command = " ".join(map(str, (containers[0].get("command") or []) + (containers[0].get("args") or [])))
    if GPU_CHECK not in command:
        return [
            f"{at}: the Ray container does not run `{GPU_CHECK} || exit 1` before `ray start` (args): a pod on a node "
            "whose driver cannot run torch's CUDA would join Ray and fail every trial placed on it"
        ]
    if not re.search(re.escape(GPU_CHECK) + r"\s*\|\|\s*exit\s+[1-9]", command):
        return [
            f"{at}: the GPU check must end the shell when it fails (`{GPU_CHECK} || exit 1`): KubeRay runs "
            "`<args> && ulimit ...; ray start ...`, so `ray start` would run after a failed check"
        ]
    return []


def worker_account_problems(spec: dict, at: str, cluster_name: str | None) -> list[str]:
    """Workers run as a service account of their own (not the head's, which KubeRay binds to the
    autoscaler's Role), with no Kubernetes API token."""
    head = _pod_spec(spec.get("headGroupSpec") or {})
    head_account = head.get("serviceAccountName") or cluster_name
    problems = []
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        gat = f"{at}.workerGroupSpecs[{group.get('groupName', i)}].template.spec"
        pod = _pod_spec(group)
        account = pod.get("serviceAccountName")
        if not account or account == head_account:
            problems.append(
                f"{gat}.serviceAccountName is {account!r}, the head's account ({head_account}), to which KubeRay binds "
                "the autoscaler's Role (patch pods and the RayCluster): give the workers an account of their own"
            )
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(
                f"{gat}.automountServiceAccountToken is not false: trial code would hold a Kubernetes API token it "
                "never needs"
            )
    return problems


def mlflow_problems(spec: dict, at: str) -> list[str]:
    """The head's MLflow: store in the database (its URL from a Secret), artifacts in the bucket, restarted
    if it exits. KubeRay runs the head pod with restartPolicy Never under autoscaler v2
    (ray-operator/controllers/ray/common/pod.go), so an ordinary container is never restarted."""
    pod = _pod_spec(spec.get("headGroupSpec") or {})
    problems = []
    for key in ("containers", "initContainers"):
        for container in pod.get(key) or []:
            if not isinstance(container, dict):
                continue
            command = shlex.join(map(str, (container.get("command") or []) + (container.get("args") or [])))
            if "mlflow server" not in command:
                continue
            cat = f"{at}.headGroupSpec.template.spec.{key}[{container.get('name')}]"
            problems += mlflow_server_problems(command, cat, secret_env(container))
            if key == "containers":
                problems.append(
                    f"{cat}: an MLflow container beside the head is never restarted if it exits (KubeRay runs the "
                    "head pod with restartPolicy Never): make it a native sidecar (initContainers with "
                    "restartPolicy: Always)"
                )
            elif container.get("restartPolicy") != "Always":
                problems.append(
                    f"{cat}: an init container without restartPolicy: Always runs to completion before the head "
                    "starts: a server never completes, so the head would never start"
                )
    return problems


def head_env(spec: dict) -> set[str]:
    """The variables the Ray head container takes from a Secret."""
    containers = _pod_spec(spec.get("headGroupSpec") or {}).get("containers") or [{}]
    return secret_env(containers[0]) if isinstance(containers[0], dict) else set()


def raycluster_spec_problems(spec: Any, at: str, cluster_name: str | None = None) -> list[str]:
    """A RayCluster's spec (or a RayJob's rayClusterSpec): autoscaling, head, GPU worker groups, identities."""
    if not isinstance(spec, dict):
        return [f"{at}: missing"]
    problems = []
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"{at}.rayVersion is {spec.get('rayVersion')!r}; the project runs Ray {RAY_VERSION}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(
            f"{at}.enableInTreeAutoscaling is {spec.get('enableInTreeAutoscaling')!r}: without the in-tree "
            "autoscaler the GPU groups stay at their replicas and never scale from 0"
        )
    options = spec.get("autoscalerOptions") or {}
    if spec.get("enableInTreeAutoscaling") is True and isinstance(options, dict):
        problems += allocation_timeout_problems(options, at)

    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append(f"{at}.headGroupSpec is missing")
    else:
        hat = f"{at}.headGroupSpec"
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
        problems += mlflow_problems(spec, at)

    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{at}.workerGroupSpecs is empty: there is nothing to run trials on")
    spot, on_demand = [], []
    for i, group in enumerate(groups):
        if not isinstance(group, dict):
            continue
        gat = f"{at}.workerGroupSpecs[{group.get('groupName', i)}]"
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
            else:
                problems += gpu_check_problems(group, gat)
        (spot if _is_spot_group(group) else on_demand).append((group.get("groupName"), group.get("priority", 0)))
    problems += worker_account_problems(spec, at, cluster_name)
    if any(isinstance(g, dict) and "priority" in g for g in groups) and options.get("version") != "v2":
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
    """What Ray's in-tree autoscaler makes of the RayCluster (its own code, offline): GPU groups, and every
    shipped space fitting a group with a head that holds its trials' drivers."""
    try:
        workers, head_memory = kuberay_node_types(raycluster)
    except Exception as exc:
        return [f"Ray's autoscaler cannot read this RayCluster: {type(exc).__name__}: {exc}"]
    problems = [
        f"Ray's autoscaler sees no GPU in worker group {node.name} (CPU {node.cpus:g}, GPU {node.gpus:g})"
        for node in workers
        if node.gpus < 1
    ]
    return problems + fit_problems(workers, head_memory)


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


def single_command_problems(entrypoint: str) -> list[str]:
    """The entrypoint is one command: KubeRay's submitter pod passes it to `ray job submit` through its
    own shell, so whatever a shell operator chains after the sweep runs in the submitter pod (the plain
    Ray image, no afm-ray, no MLflow beside it), not on the head."""
    try:
        lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        operators = [t for t in lexer if t and set(t) <= set("&|;<>()")]
    except ValueError:
        return []  # reported as an invalid command line
    if "`" in entrypoint or "$(" in entrypoint:
        operators.append("`...`" if "`" in entrypoint else "$(...)")
    if not operators:
        return []
    return [
        f"spec.entrypoint chains commands ({' '.join(dict.fromkeys(operators))}): KubeRay runs it through the "
        "submitter pod's shell, so everything after the first command runs in the submitter pod, not on the head; "
        "run the sweep alone (it prints its Pareto front at the end)"
    ]


def rayjob_spec_problems(spec: Any) -> list[str]:
    """A RayJob's spec: the sweep alone as its entrypoint, its flags, stores, data and teacher, its
    cluster, its submitter pod. (Fields and types: the CRD.)"""
    if not isinstance(spec, dict):
        return ["spec: missing"]
    entrypoint = spec.get("entrypoint", "")
    problems = command_problems(entrypoint, "spec.entrypoint") + single_command_problems(entrypoint)
    try:
        args = sweep_arguments(entrypoint)
    except ValueError as exc:  # unbalanced quotes
        return problems + [f"spec.entrypoint is not a valid shell command line: {exc}"]
    if args is None:
        problems.append(f"spec.entrypoint does not run `python -m afm_ray.sweep` (found {entrypoint!r})")
    else:
        problems += sweep_problems(args)
        problems += sweep_store_problems(args, "spec.entrypoint", None)
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


def database_problems(doc: dict) -> list[str]:
    """The PostgreSQL StatefulSet: a pinned image, its password from a Secret, its data on a volume that
    outlives the pod and the StatefulSet."""
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    template = spec.get("template")
    problems = schema_problems(
        template, pod_template_validator(), f"Kubernetes PodTemplateSpec (KubeRay {KUBERAY_VERSION} CRD)"
    )
    problems = [f"spec.template.{p}" if not p.startswith("<top") else f"spec.template{p[12:]}" for p in problems]
    problems += pod_problems(template, "spec.template", ray_pod=False, images=False)
    containers = [c for c in ((template or {}).get("spec") or {}).get("containers") or [] if isinstance(c, dict)]
    claims = {(t.get("metadata") or {}).get("name") for t in spec.get("volumeClaimTemplates") or []}
    for container in containers:
        cat = f"spec.template.spec.containers[{container.get('name')}]"
        image = str(container.get("image", ""))
        if not DATABASE_IMAGE.match(image):
            problems.append(
                f"{cat}: image {image or '(none)'} is not postgres:MAJOR.MINOR: pin the PostgreSQL release, so a "
                "restart never brings up a major version whose data format differs"
            )
        for entry in container.get("env") or []:
            if isinstance(entry, dict) and "PASSWORD" in str(entry.get("name")) and "value" in entry:
                problems.append(f"{cat}: {entry['name']} is a literal value: take it from a Secret (secretKeyRef)")
        data = (_env_value(container, "PGDATA") or "/var/lib/postgresql/data").rstrip("/")
        mounts = {m.get("mountPath", "").rstrip("/"): m.get("name") for m in container.get("volumeMounts") or []}
        holder = next(
            (mounts[p] for p in sorted(mounts, key=len, reverse=True) if data == p or data.startswith(p + "/")), None
        )
        if holder not in claims:
            problems.append(
                f"{cat}: the database's data ({data}) is not on a volume of spec.volumeClaimTemplates: it would be "
                "lost with the pod"
            )
    retention = (spec.get("persistentVolumeClaimRetentionPolicy") or {}).get("whenDeleted", "Retain")
    if retention != "Retain":
        problems.append(
            f"spec.persistentVolumeClaimRetentionPolicy.whenDeleted is {retention}: deleting the StatefulSet would "
            "delete the records of every sweep; keep Retain"
        )
    return problems


def kuberay_problems(doc: Any) -> list[str]:
    """One KubeRay manifest document (RayCluster, RayJob, or a NetworkPolicy, ServiceAccount, PVC,
    ConfigMap, Service or the database's StatefulSet beside them)."""
    if not isinstance(doc, dict):
        return [f"a manifest must be a mapping, found {type(doc).__name__}"]
    kind = doc.get("kind")
    problems = [] if (doc.get("metadata") or {}).get("name") else ["metadata.name is missing"]
    if kind in ("RayCluster", "RayJob"):
        if doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"apiVersion is {doc.get('apiVersion')!r}; KubeRay's {kind} is ray.io/v1")
        problems += crd_problems(doc)
        if kind == "RayCluster":
            found = raycluster_spec_problems(doc.get("spec"), "spec", (doc.get("metadata") or {}).get("name"))
            problems += found
            if not problems:  # Ray's translation of a broken RayCluster only repeats its problems, less readably
                problems += ray_translation_problems(doc)
            if isinstance(doc.get("spec"), dict):
                problems += raycluster_auth_problems(doc["spec"])
        else:
            problems += rayjob_spec_problems(doc.get("spec"))
    elif kind in ("ServiceAccount", "PersistentVolumeClaim", "ConfigMap", "Service"):
        if doc.get("apiVersion") != "v1":
            problems.append(f"apiVersion is {doc.get('apiVersion')!r}; a {kind} is v1")
        service_type = (doc.get("spec") or {}).get("type", "ClusterIP") if kind == "Service" else "ClusterIP"
        if service_type != "ClusterIP":
            problems.append(
                f"spec.type is {service_type}: that publishes the service outside the Kubernetes cluster; keep "
                "ClusterIP and use kubectl port-forward"
            )
    elif kind == "StatefulSet":
        if doc.get("apiVersion") != "apps/v1":
            problems.append(f"apiVersion is {doc.get('apiVersion')!r}; a StatefulSet is apps/v1")
        problems += database_problems(doc)
    elif kind == "NetworkPolicy":
        if doc.get("apiVersion") != "networking.k8s.io/v1":
            problems.append(f"apiVersion is {doc.get('apiVersion')!r}; a NetworkPolicy is networking.k8s.io/v1")
        problems += unknown_keys(doc.get("spec") or {}, NETWORK_POLICY_SPEC_KEYS, "spec")
    elif kind == "Secret":
        problems.append(
            "a Secret in the repository puts its credentials in git: create it with kubectl (clusters/README.md)"
        )
    else:
        problems.append(f"kind {kind!r} is not one this project ships ({SHIPPED_KINDS})")
    return problems + credential_problems(strings(doc))


def kuberay_reference_problems(doc: Any, defined: list, where: str = "clusters/kuberay") -> list[str]:
    """Names `doc` uses that no document in `defined` (the manifests in `where`) defines, and what a
    RayJob's sweep needs from the RayCluster it runs on."""
    names = {(d.get("kind"), (d.get("metadata") or {}).get("name")) for d in defined if isinstance(d, dict)}
    spec = doc.get("spec") if isinstance(doc, dict) else None
    if not isinstance(spec, dict):
        return []
    clusters = [d for d in defined if isinstance(d, dict) and d.get("kind") == "RayCluster"]
    problems = []
    if doc.get("kind") == "RayJob":
        selected = (spec.get("clusterSelector") or {}).get("ray.io/cluster")
        if selected is not None and ("RayCluster", selected) not in names:
            problems.append(f"spec.clusterSelector selects RayCluster {selected!r}, which {where} does not define")
        cluster = next((d for d in clusters if (d.get("metadata") or {}).get("name") == selected), None)
        if cluster is not None and token_secret(doc) and token_secret(doc) != token_secret(cluster):
            problems.append(
                f"the submitter reads its token from Secret {token_secret(doc)!r}, RayCluster {selected} from "
                f"{token_secret(cluster)!r}: `ray job submit` would be refused"
            )
        try:
            args = sweep_arguments(spec.get("entrypoint", ""))
        except ValueError:
            args = None
        if cluster is not None and args is not None and isinstance(cluster.get("spec"), dict):
            problems += sweep_store_problems(args, "spec.entrypoint", head_env(cluster["spec"]))
            problems += _job_fit_problems(args, cluster)
    if doc.get("kind") == "RayCluster":
        problems += network_policy_problems(doc, defined)
        for group in [spec.get("headGroupSpec") or {}, *(spec.get("workerGroupSpecs") or [])]:
            pod = _pod_spec(group)
            account = pod.get("serviceAccountName")
            if account is not None and ("ServiceAccount", account) not in names:
                problems.append(f"no ServiceAccount {account!r}")
            for volume in pod.get("volumes") or []:
                claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                if claim is not None and ("PersistentVolumeClaim", claim) not in names:
                    problems.append(f"no PersistentVolumeClaim {claim!r}")
                config_map = volume.get("configMap")
                if config_map and not config_map.get("optional") and ("ConfigMap", config_map["name"]) not in names:
                    problems.append(f"no ConfigMap {config_map['name']!r}")
    if doc.get("kind") == "StatefulSet":
        cluster_name = next(((c.get("metadata") or {}).get("name") for c in clusters), "afm-ray")
        problems += database_policy_problems(doc, defined, cluster_name)
        for volume in _pod_spec(doc).get("volumes") or []:
            config_map = volume.get("configMap")
            if config_map and not config_map.get("optional") and ("ConfigMap", config_map.get("name")) not in names:
                problems.append(f"no ConfigMap {config_map.get('name')!r}")
    return problems


def _job_fit_problems(args: list[str], cluster: dict) -> list[str]:
    """The RayJob's space, with its per-worker flags, fits the RayCluster it runs on."""
    space_name = _flag(args, "--space")
    overrides = {flag: value for flag in SPACE_FLAGS if (value := _flag(args, flag)) is not None}
    space = load_space(space_name, overrides) if space_name and "/" not in space_name else None
    if space is None:
        return []
    try:
        workers, head_memory = kuberay_node_types(cluster)
    except Exception:
        return []  # reported with the RayCluster
    return [f"spec.entrypoint: {p}" for p in fit_problems(workers, head_memory, [space])]
