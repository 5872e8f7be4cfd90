"""Security rules every cluster file must keep:

- Ray's token authentication is on for every node (`RAY_AUTH_MODE=token`), and the token comes from
  a secret store (AWS Secrets Manager, Google Secret Manager, a Kubernetes Secret), never from a
  file in this repository or a literal in a config; on the host it is a file only the container's
  user may read (uid 1000, the `ray` user of Ray's images: docker/base-deps/Dockerfile in Ray's
  repository), whatever the SSH user's uid is;
- no port is published beyond the cluster: no `docker run -p`, no hostPort or hostNetwork, no
  NodePort or LoadBalancer Service;
- on Kubernetes, a NetworkPolicy admits only the cluster's own pods to its pods, on any port; the
  dashboard's job API (8265) also admits the sweep's submitter pod and the KubeRay operator, which
  polls job status there;
- on Kubernetes, the workers run as a service account of their own, not the head's (KubeRay binds
  the autoscaler's Role, which may patch pods and the RayCluster, to the head's account), with no
  API token mounted.
"""

from __future__ import annotations

import re
from typing import Any

from checks.common import strings

TOKEN_PATH = "/home/ray/.ray/auth_token"  # Ray's default token file inside the image (user ray)
CONTAINER_UID = 1000  # the `ray` user of rayproject/ray images, whom the container runs as
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
        for name, where, commands in node_initialization_commands(cfg):
            writes = [str(c) for c in commands if fetch in str(c) and host_name in str(c)]
            if not writes:
                problems.append(
                    f"{where}: node type {name} never fetches the Ray token ({fetch} ... > {host_file}) before "
                    "Docker starts: its container would start without one"
                )
            for command in writes:
                problems += token_file_problems(command, f"{where} (node type {name})")
    problems += literal_token_problems(strings(cfg))
    problems += published_port_problems(
        shared + list(docker.get("head_run_options") or []) + list(docker.get("worker_run_options") or [])
    )
    return problems


def node_initialization_commands(cfg: dict) -> list[tuple[str, str, list]]:
    """(node type, where its list is, the initialization commands it runs) as Ray runs them: `ray up`
    runs the global list on the head whatever the head's type says (ray/autoscaler/_private/commands.py);
    a worker type's own list replaces the global one (the v2 autoscaler's ray_installer)."""
    found = []
    head = cfg.get("head_node_type")
    for name, node_type in (cfg.get("available_node_types") or {}).items():
        if name != head and "initialization_commands" in node_type:
            found.append((name, f"available_node_types.{name}", node_type["initialization_commands"]))
        else:
            found.append((name, "initialization_commands", cfg.get("initialization_commands") or []))
    return found


def token_file_problems(command: str, at: str) -> list[str]:
    """The command that writes the token file leaves it readable by the container's user only."""
    problems = []
    private = re.search(r"\bumask 0?077\b", command) or re.search(r"\binstall\b[^|;&]*\s-m\s*0?[46]00\b", command)
    if not private:
        problems.append(
            f"{at}: the Ray token file is written without `umask 077` or `install -m 0400`: any user on the host "
            "could read the cluster's token"
        )
    owned = re.search(rf"\binstall\b[^|;&]*\s-o\s*{CONTAINER_UID}\b", command) or re.search(
        rf"\bchown\s+{CONTAINER_UID}\b", command
    )
    if not owned:
        problems.append(
            f"{at}: the Ray token file belongs to the SSH user, but the container reads it as uid {CONTAINER_UID} "
            f"(the image's `ray` user): write it with `sudo install -m 0400 -o {CONTAINER_UID} -g 100 /dev/stdin FILE`"
        )
    return problems


PUBLISH = re.compile(r"^(?:-p|--publish|-P|--publish-all)(?:[ =]|$)|^--(?:net|network)[ =](?!host\b)")


def published_port_problems(options: list[str]) -> list[str]:
    """`docker run` options that publish a port or leave the host's network (Ray runs --net=host)."""
    return [
        f"docker run option {option!r} publishes a container port (or leaves the host network): only SSH may be "
        "reachable from outside; reach the dashboard and MLflow through SSH tunnels"
        for option in (str(o).strip() for o in options)
        if PUBLISH.search(option)
    ]


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
                if kind == "cluster" or (kind in ("submitter", "operator") and ports == {8265}):
                    continue
                reached = "every port" if ports is None else f"ports {sorted(ports, key=str)}"
                problems.append(
                    f"NetworkPolicy {name}: ingress[{i}] admits {peer} to {reached}; only the pods of RayCluster "
                    f"{cluster} may reach its pods (the job API 8265 also its submitter and the operator)"
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


def database_policy_problems(database: dict, around: list, cluster: str) -> list[str]:
    """A NetworkPolicy selects the database's pods and admits only the Ray head of `cluster`, on its port."""
    template = ((database.get("spec") or {}).get("template") or {}).get("metadata") or {}
    labels = template.get("labels") or {}
    name = (database.get("metadata") or {}).get("name")
    policies = [
        d
        for d in around
        if isinstance(d, dict)
        and d.get("kind") == "NetworkPolicy"
        and _selects((d.get("spec") or {}).get("podSelector"), labels)
    ]
    if not policies:
        return [
            f"no NetworkPolicy selects the pods of {name} (labels {labels}): any pod in the Kubernetes cluster "
            "could try the database's password"
        ]
    head = {"ray.io/cluster": cluster, "ray.io/node-type": "head"}
    problems = []
    for policy in policies:
        pname = (policy.get("metadata") or {}).get("name")
        for i, rule in enumerate((policy.get("spec") or {}).get("ingress") or []):
            for peer in rule.get("from") or [{"everyone": True}]:
                pods = peer.get("podSelector") if set(peer) == {"podSelector"} else None
                if pods is None or (pods.get("matchLabels") or {}) != head:
                    problems.append(
                        f"NetworkPolicy {pname}: ingress[{i}] admits {peer} to {name}; only the head of RayCluster "
                        f"{cluster} (matchLabels {head}) may reach the database"
                    )
    return problems
