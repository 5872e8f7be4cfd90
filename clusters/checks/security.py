"""Security rules every cluster file must keep:

- Ray's token authentication is on for every node (`RAY_AUTH_MODE=token`), and the token comes from
  a secret store (AWS Secrets Manager, Google Secret Manager, a Kubernetes Secret), never from a
  file in this repository or a literal in a config;
- on Kubernetes, a NetworkPolicy admits only the cluster's own pods to Ray's ports (6379, 8265,
  10001 and the rest); the dashboard's job API also admits the sweep's submitter pod and the
  KubeRay operator, which polls job status there.
"""

from __future__ import annotations

import re
from typing import Any

from checks.common import strings

TOKEN_PATH = "/home/ray/.ray/auth_token"  # Ray's default token file inside the image (user ray)
# Where each cloud's CLI reads a secret, as the host runs it before Docker starts.
SECRET_FETCH = {"aws": "secretsmanager get-secret-value", "gcp": "gcloud secrets versions access"}
LITERAL_TOKEN = re.compile(r"RAY_AUTH_TOKEN\s*=\s*(?![\"']?\$)\S")
RAY_PORTS = (6379, 8265, 10001)
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}


def _env_in_run_options(options: list[str]) -> dict[str, str]:
    found = {}
    for option in options:
        match = re.fullmatch(r"(?:--env|-e)[ =](\w+)=(\S*)", str(option).strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def _mounts(options: list[str]) -> dict[str, str]:
    """container path -> host path of the -v/--volume run options."""
    found = {}
    for option in options:
        match = re.fullmatch(r"(?:--volume|-v)[ =]([^:\s]+):([^:\s]+)(?::\S+)?", str(option).strip())
        if match:
            found[match.group(2)] = match.group(1)
    return found


def launcher_auth_problems(cfg: dict) -> list[str]:
    """`ray up` configs: every container runs with RAY_AUTH_MODE=token and the token file mounted
    from the host, where each node type's initialization commands fetch it from the secret store."""
    docker = cfg.get("docker") or {}
    shared = list(docker.get("run_options") or [])
    roles = {
        "head": shared + list(docker.get("head_run_options") or []),
        "workers": shared + list(docker.get("worker_run_options") or []),
    }
    problems = []
    for role, options in roles.items():
        mode = _env_in_run_options(options).get("RAY_AUTH_MODE")
        if mode != "token":
            problems.append(
                f"docker.run_options: the {role} {'runs' if role == 'head' else 'run'} Ray with "
                f"RAY_AUTH_MODE={mode or 'unset'}; add `--env "
                "RAY_AUTH_MODE=token` so every node and client of the cluster needs the token"
            )
        if TOKEN_PATH not in _mounts(options):
            problems.append(
                f"docker.run_options: the {role} {'gets' if role == 'head' else 'get'} no token file: mount the one "
                "initialization_commands fetch, "
                f"e.g. `--volume /home/ubuntu/.afm-ray/ray_auth_token:{TOKEN_PATH}:ro`"
            )
    host_file = _mounts(roles["head"]).get(TOKEN_PATH) or _mounts(roles["workers"]).get(TOKEN_PATH)
    fetch = SECRET_FETCH.get((cfg.get("provider") or {}).get("type"))
    if host_file and fetch:
        host_name = host_file.rsplit("/", 1)[-1]
        types = cfg.get("available_node_types") or {}
        for name, node_type in types.items():
            # A node type's own initialization_commands replace the global ones.
            commands = node_type.get("initialization_commands", cfg.get("initialization_commands") or [])
            if not any(fetch in str(c) and host_name in str(c) for c in commands):
                where = (
                    f"available_node_types.{name}"
                    if "initialization_commands" in node_type
                    else "initialization_commands"
                )
                problems.append(
                    f"{where}: node type {name} never fetches the Ray token ({fetch} ... > {host_file}) before "
                    "Docker starts: its container would start without one"
                )
    problems += literal_token_problems(strings(cfg))
    return problems


def literal_token_problems(texts: list[str]) -> list[str]:
    """A token written into a config is a token in git: it must come from the secret store."""
    problems = []
    for text in texts:
        if LITERAL_TOKEN.search(text):
            problems.append(
                f"{text.strip()[:60]!r} sets RAY_AUTH_TOKEN to a literal: fetch it from the secret store instead"
            )
        if re.search(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", text):
            problems.append(f"{text.strip()[:60]!r} turns Ray's token authentication off")
    return problems


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or [] if isinstance(e, dict)}


def _containers(pod_template: Any) -> list[dict]:
    spec = (pod_template or {}).get("spec") or {} if isinstance(pod_template, dict) else {}
    return [c for c in spec.get("containers") or [] if isinstance(c, dict)]


def container_token_problems(container: dict, at: str, *, needs_token: bool) -> list[str]:
    """RAY_AUTH_TOKEN only from a Secret; a client container also sets RAY_AUTH_MODE=token."""
    env, problems = _env(container), []
    token = env.get("RAY_AUTH_TOKEN")
    if token is not None and "value" in token:
        problems.append(f"{at}: RAY_AUTH_TOKEN is a literal value: use valueFrom.secretKeyRef (a Secret)")
    if needs_token:
        if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
            problems.append(f"{at}: set RAY_AUTH_MODE=token, or `ray job submit` sends no token and gets 401")
        if token is None or not ((token.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name"):
            problems.append(f"{at}: RAY_AUTH_TOKEN must come from the cluster's Secret (valueFrom.secretKeyRef)")
    return problems


def raycluster_auth_problems(spec: dict, at: str = "spec") -> list[str]:
    """A RayCluster turns token authentication on, with the token in a Secret of its own."""
    options = spec.get("authOptions") or {}
    problems = []
    if options.get("mode") != "token":
        problems.append(
            f"{at}.authOptions.mode is {options.get('mode')!r}: set mode: token (KubeRay then gives every Ray "
            "container RAY_AUTH_MODE and RAY_AUTH_TOKEN)"
        )
    elif not options.get("secretName"):
        problems.append(
            f"{at}.authOptions.secretName is missing: name the Secret you create with kubectl, so the RayJob's "
            "submitter can read the same token"
        )
    groups = [spec.get("headGroupSpec") or {}, *(spec.get("workerGroupSpecs") or [])]
    for i, group in enumerate(groups):
        for container in _containers(group.get("template")):
            where = f"{at}.{'headGroupSpec' if i == 0 else 'workerGroupSpecs'}.containers[{container.get('name')}]"
            problems += container_token_problems(container, where, needs_token=False)
            mode = (_env(container).get("RAY_AUTH_MODE") or {}).get("value")
            if mode not in (None, "token"):
                problems.append(f"{where}: RAY_AUTH_MODE={mode} turns token authentication off")
    return problems


def rayjob_auth_problems(spec: dict) -> list[str]:
    """The submitter pod runs `ray job submit` against a token-protected dashboard."""
    template = spec.get("submitterPodTemplate")
    if not template:
        return ["spec.submitterPodTemplate is missing: its container must set RAY_AUTH_MODE=token and the token"]
    problems = []
    for container in _containers(template):
        at = f"spec.submitterPodTemplate.containers[{container.get('name')}]"
        problems += container_token_problems(container, at, needs_token=True)
    return problems


def token_secret(doc: dict) -> str | None:
    """The Secret a RayCluster's or a RayJob submitter's token comes from."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        return (spec.get("authOptions") or {}).get("secretName")
    for container in _containers(spec.get("submitterPodTemplate")):
        ref = ((_env(container).get("RAY_AUTH_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        if ref.get("name"):
            return ref["name"]
    return None


# ------------------------------------------------------------------------------ NetworkPolicy


def _selects(selector: Any, labels: dict[str, str]) -> bool:
    """Does a label selector (matchLabels only; matchExpressions make it unreadable here) select `labels`?"""
    if not isinstance(selector, dict) or selector.get("matchExpressions"):
        return False
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _ports(rule: dict) -> set[int] | None:
    """The ports an ingress rule admits; None = every port."""
    if not rule.get("ports"):
        return None
    return {p.get("port") for p in rule["ports"] if isinstance(p, dict)}


def _peer(peer: dict, cluster: str, submitters: list[dict]) -> str:
    """What an ingress peer is: cluster, submitter, operator, or other."""
    if set(peer) - {"podSelector", "namespaceSelector"} or "podSelector" not in peer:
        return "other"  # an ipBlock, or a whole namespace
    pods = peer["podSelector"]
    labels = pods.get("matchLabels") or {} if isinstance(pods, dict) else {}
    if "namespaceSelector" not in peer and labels.get("ray.io/cluster") == cluster:
        return "cluster"
    if "namespaceSelector" not in peer and labels and any(_selects(pods, s) for s in submitters):
        return "submitter"
    if labels == OPERATOR:
        return "operator"
    return "other"


def network_policy_problems(raycluster: dict, around: list) -> list[str]:
    """Some NetworkPolicy beside the RayCluster selects its pods and admits to Ray's ports only the
    cluster's own pods (and, to the job API, its RayJobs' submitter pods and the KubeRay operator)."""
    cluster = (raycluster.get("metadata") or {}).get("name")
    head_labels = {"ray.io/cluster": cluster, "ray.io/node-type": "head"}
    policies = [
        d
        for d in around
        if isinstance(d, dict)
        and d.get("kind") == "NetworkPolicy"
        and _selects((d.get("spec") or {}).get("podSelector"), head_labels)
    ]
    if not policies:
        return [
            f"no NetworkPolicy selects the pods of RayCluster {cluster} (podSelector matchLabels ray.io/cluster: "
            f"{cluster}): any pod in the Kubernetes cluster could reach Ray's ports {list(RAY_PORTS)}"
        ]
    submitters = [
        ((d.get("spec") or {}).get("submitterPodTemplate") or {}).get("metadata", {}).get("labels") or {}
        for d in around
        if isinstance(d, dict)
        and d.get("kind") == "RayJob"
        and ((d.get("spec") or {}).get("clusterSelector") or {}).get("ray.io/cluster") == cluster
    ]
    problems = []
    for policy in policies:
        name, spec = (policy.get("metadata") or {}).get("name"), policy.get("spec") or {}
        if "Ingress" not in (spec.get("policyTypes") or ["Ingress"]):
            problems.append(f"NetworkPolicy {name}: policyTypes has no Ingress: it restricts nothing coming in")
        for i, rule in enumerate(spec.get("ingress") or []):
            peers, ports = rule.get("from"), _ports(rule)
            if not peers:
                problems.append(f"NetworkPolicy {name}: ingress[{i}] has no `from`: it admits every source")
                continue
            for peer in peers:
                kind = _peer(peer, cluster, submitters)
                reached = sorted(RAY_PORTS if ports is None else ports & set(RAY_PORTS))
                allowed = {"cluster"} | ({"submitter", "operator"} if reached == [8265] else set())
                if reached and kind not in allowed:
                    problems.append(
                        f"NetworkPolicy {name}: ingress[{i}] admits {peer} to ports {reached}; only the pods of "
                        f"RayCluster {cluster} may reach them (the job API 8265 also its submitter and the operator)"
                    )
    for labels in submitters:
        if not any(
            _peer(peer, cluster, [labels]) == "submitter" and (_ports(rule) is None or 8265 in _ports(rule))
            for policy in policies
            for rule in (policy.get("spec") or {}).get("ingress") or []
            for peer in rule.get("from") or []
        ):
            problems.append(
                f"the NetworkPolicy admits no RayJob submitter pod of RayCluster {cluster} (labels {labels}) to the "
                "job API (8265): `ray job submit` would time out; label submitterPodTemplate and admit that label"
            )
    return problems
