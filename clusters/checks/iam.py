"""AWS IAM documents (clusters/aws-iam/*.json) against the AWS launcher config: least privilege, and
nothing Ray's AWS provider needs left out.

Which policy a file is comes from its name: head-policy.json (the launcher's head: it launches and
terminates the workers), worker-policy.json (the GPU workers, on EC2 and as EKS pods),
kuberay-head-policy.json (the KubeRay head pod on EKS: the bucket only), ec2-trust.json (whom the
roles trust). A copy under another name is read by its content (iam:PassRole makes a launcher head).

- Every action is named: no `*`, no partial wildcard (`iam:*Role*`, `s3:*Object*`), no NotAction or
  NotResource, which grant everything they do not list.
- S3 writes only under a prefix (the sweep's storage, MLflow's artifacts), never on the whole bucket,
  where the data and the teachers are: the workers never on MLflow's artifacts.
- The launcher's head has every action Ray 2.60's AWS node provider calls on the head
  (ray/autoscaler/_private/aws/node_provider.py: BOTO_TO_IAM maps each call to its IAM action,
  tests/test_clusters.py checks the map against the installed Ray), on the resources a launch
  uses; it runs instances only tagged for this cluster and of the config's worker types, retags and
  terminates only those, never stops or starts one (the config says cache_stopped_nodes: false).
- ECR pulls only from the afm-ray repository; each policy reads exactly the secrets its nodes fetch
  (the head: the Ray token and the database URLs; the workers: the token).
Conditions are read as IAM evaluates them for these actions (StringEquals on request and resource
tags, on the instance type).
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any

CLUSTER_TAG = "ray-cluster-name"  # what Ray's AWS provider tags every instance it launches with
S3_WRITES = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:PutObjectAcl")
ECR_IMAGE = re.compile(r"^(?P<account>[^.]+)\.dkr\.ecr\.(?P<region>[^.]+)\.amazonaws\.com/(?P<repo>[^:]+):")
SECRET_ID = re.compile(r"secretsmanager get-secret-value\b.*?--secret-id[ =](\S+)")
# Every EC2 call of Ray 2.60's AWS node provider (ray/autoscaler/_private/aws/node_provider.py) and
# the IAM action it needs; NOT_ON_THE_HEAD: those this cluster's head never makes, and why.
BOTO_TO_IAM = {
    "instances.filter": "ec2:DescribeInstances",
    "create_instances": "ec2:RunInstances",
    "create_tags": "ec2:CreateTags",
    "terminate": "ec2:TerminateInstances",
    "terminate_instances": "ec2:TerminateInstances",
    "stop": "ec2:StopInstances",
    "stop_instances": "ec2:StopInstances",
    "start_instances": "ec2:StartInstances",
    "describe_images": "ec2:DescribeImages",
    "describe_instance_types": "ec2:DescribeInstanceTypes",
}
NOT_ON_THE_HEAD = {
    "ec2:StopInstances": "cache_stopped_nodes: false terminates idle nodes",
    "ec2:StartInstances": "cache_stopped_nodes: false: no stopped node is reused",
    "ec2:DescribeImages": "called only for the CloudWatch agent, which the config does not use",
    "ec2:DescribeInstanceTypes": "called by `ray up` on your machine to fill in undeclared resources",
}
# What one RunInstances touches besides the instance (AWS's resource-level permissions for it).
LAUNCH_RESOURCES = ("image", "subnet", "security-group", "network-interface", "volume", "key-pair")


def statements(policy: Any) -> list[dict]:
    """The statements of a policy document, whatever their shape."""
    found = policy.get("Statement", []) if isinstance(policy, dict) else []
    found = [found] if isinstance(found, dict) else found
    return [s for s in found if isinstance(s, dict)]


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)]


def _allows(statement: dict, action: str, resource: str | None = None) -> bool:
    """Does this Allow statement grant `action` (on `resource`, when given), conditions aside?"""
    if statement.get("Effect") != "Allow":
        return False
    if not any(fnmatchcase(action.lower(), a.lower()) for a in _listed(statement.get("Action"))):
        return False
    return resource is None or any(fnmatchcase(resource, r) for r in _listed(statement.get("Resource")))


def _on_instances(statement: dict) -> bool:
    """Does the statement's Resource cover EC2 instances (any region and account)?"""
    return any(
        r == "*" or re.fullmatch(r"arn:aws:ec2:[^:]*:[^:]*:instance/.*", r) for r in _listed(statement.get("Resource"))
    )


def _string_equals(statement: dict, key: str) -> set[str]:
    condition = (statement.get("Condition") or {}).get("StringEquals") or {}
    return set(_listed(condition.get(key)))


def _sid(statement: dict, default: str = "a statement") -> str:
    return statement.get("Sid", default)


def iam_problems(head_policy: dict, cfg: dict) -> list[str]:
    """The head's policy lets it pass the role of every instance profile it launches workers with."""
    types = cfg.get("available_node_types") or {}

    def profile(node_type: dict) -> str | None:
        return ((node_type.get("node_config") or {}).get("IamInstanceProfile") or {}).get("Name")

    head_profile = profile(types.get(cfg.get("head_node_type")) or {})
    # The README names each role after its instance profile.
    workers = {profile(t) for t in types.values()} - {head_profile, None}
    passed = {
        resource.rsplit("/", 1)[-1]
        for s in statements(head_policy)
        if _allows(s, "iam:PassRole")
        for resource in _listed(s.get("Resource"))
    }
    if workers <= passed:
        return []
    return [
        f"iam:PassRole: the head may pass roles {sorted(passed)} but launches workers with {sorted(workers)}: "
        "clusters/aws-iam/head-policy.json must allow iam:PassRole on each"
    ]


def policy_kind(policy: Any, name: str = "") -> str:
    """trust, head (the launcher's), pod-head (KubeRay's head pod) or worker."""
    if any("Principal" in s for s in statements(policy)) or name.endswith("trust.json"):
        return "trust"
    if name.endswith("kuberay-head-policy.json"):
        return "pod-head"
    if name.endswith("head-policy.json"):
        return "head"
    if name.endswith("worker-policy.json"):
        return "worker"
    return "head" if any(_allows(s, "iam:PassRole") for s in statements(policy)) else "worker"


def policy_problems(policy: Any, cfg: dict | None, name: str = "") -> list[str]:
    """Least privilege of a policy (its kind from its file `name`); with the AWS config beside it,
    checked against it."""
    if not isinstance(policy, dict) or not statements(policy):
        return ["not an IAM policy document (no Statement)"]
    kind = policy_kind(policy, name)
    if kind == "trust":
        return []
    problems = _wildcard_problems(policy) + _s3_scope_problems(policy)
    if cfg is None:
        return problems
    if kind == "head":
        problems += iam_problems(policy, cfg) + _instance_problems(policy, cfg) + _required_problems(policy, cfg)
    else:
        problems += _node_problems(policy, cfg, kind)
    if kind in ("head", "pod-head"):
        problems += _artifact_writer_problems(policy, cfg)
    if kind != "pod-head":
        problems += _ecr_problems(policy, cfg)
    return problems + _secret_problems(policy, cfg, kind)


def _wildcard_problems(policy: dict) -> list[str]:
    problems = []
    for s in statements(policy):
        for key in ("NotAction", "NotResource"):
            if key in s and s.get("Effect") == "Allow":
                problems.append(
                    f"{_sid(s)}: Allow with {key} grants everything it does not list: name the actions and resources"
                )
        for action in _listed(s.get("Action")):
            if s.get("Effect") == "Allow" and ("*" in action or "?" in action):
                problems.append(f"{_sid(s)}: allows {action}: a wildcard grants actions nobody reviewed; name them")
    return problems


def _s3_scope_problems(policy: dict) -> list[str]:
    """S3 writes only under a named prefix of a named bucket."""
    problems = []
    for s in statements(policy):
        writes = [a for a in S3_WRITES if _allows(s, a)]
        if not writes:
            continue
        for resource in _listed(s.get("Resource")):
            match = re.fullmatch(r"arn:aws:s3:::([^/*?]+)/([^*?]+/)\*", resource)
            if not match:
                problems.append(
                    f"{_sid(s)}: {', '.join(writes)} on {resource}: that reaches the whole bucket (the data and the "
                    "teachers too); scope writes by prefix, e.g. arn:aws:s3:::BUCKET/afm-ray/*"
                )
    return problems


def _region_account(cfg: dict) -> tuple[str, str]:
    image = ECR_IMAGE.match(str((cfg.get("docker") or {}).get("image", "")))
    region = (cfg.get("provider") or {}).get("region", "us-west-2")
    return region, image["account"] if image else "ACCOUNT_ID"


def _required_problems(policy: dict, cfg: dict) -> list[str]:
    """Every action Ray's AWS provider makes on the head, on the resources it makes them on."""
    region, account = _region_account(cfg)
    types = cfg.get("available_node_types") or {}
    spot = any(
        str(((t.get("node_config") or {}).get("InstanceMarketOptions") or {}).get("MarketType", "")).lower() == "spot"
        for t in types.values()
    )
    needed = {
        action: [f"arn:aws:ec2:{region}:{account}:instance/i-0"]
        for action in sorted(set(BOTO_TO_IAM.values()) - set(NOT_ON_THE_HEAD))
    }
    needed["ec2:DescribeInstances"] = ["*"]
    needed["ec2:RunInstances"] += [
        f"arn:aws:ec2:{region}:{'' if kind == 'image' else account}:{kind}/x" for kind in LAUNCH_RESOURCES
    ] + ([f"arn:aws:ec2:{region}:{account}:spot-instances-request/x"] if spot else [])
    parameters = {
        str((t.get("node_config") or {}).get("ImageId", "")).removeprefix("resolve:ssm:")
        for t in types.values()
        if str((t.get("node_config") or {}).get("ImageId", "")).startswith("resolve:ssm:")
    }
    if parameters:  # EC2 resolves the parameter with the caller's rights
        needed["ssm:GetParameters"] = [f"arn:aws:ssm:{region}::parameter{p}" for p in sorted(parameters)]
    problems = []
    for action, resources in needed.items():
        missing = [r for r in resources if not any(_allows(s, action, r) for s in statements(policy))]
        if missing:
            problems.append(
                f"the head may not {action} on {', '.join(missing)}: Ray's AWS provider needs it on the head "
                "(ray/autoscaler/_private/aws/node_provider.py), so workers would never start"
            )
    return problems


def _worker_types(cfg: dict) -> set[str]:
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    return {(t.get("node_config") or {}).get("InstanceType") for name, t in types.items() if name != head} - {None}


def _instance_problems(policy: dict, cfg: dict) -> list[str]:
    """Run, retag and terminate only this cluster's instances, of its worker types; no stop or start."""
    cluster, wanted = cfg.get("cluster_name", "default"), _worker_types(cfg)
    problems = []
    for action in ("ec2:StopInstances", "ec2:StartInstances"):
        if any(_allows(s, action) for s in statements(policy)):
            problems.append(
                f"allows {action}: the config terminates idle nodes (provider.cache_stopped_nodes: false), so the "
                "head never stops or starts one"
            )
    if (cfg.get("provider") or {}).get("cache_stopped_nodes") is not False:
        problems.append("aws.yaml must say provider.cache_stopped_nodes: false, or Ray stops idle nodes for reuse")
    runs = [s for s in statements(policy) if _allows(s, "ec2:RunInstances") and _on_instances(s)]
    for s in runs:
        sid = _sid(s, "ec2:RunInstances")
        if _string_equals(s, f"aws:RequestTag/{CLUSTER_TAG}") != {cluster}:
            problems.append(
                f"{sid}: ec2:RunInstances on instances must require the tag {CLUSTER_TAG}={cluster} "
                f'(Condition StringEquals "aws:RequestTag/{CLUSTER_TAG}")'
            )
        if _string_equals(s, "ec2:InstanceType") != wanted:
            problems.append(
                f"{sid}: ec2:RunInstances must be limited to the worker types of the config {sorted(wanted)} "
                f'(Condition StringEquals "ec2:InstanceType"), found {sorted(_string_equals(s, "ec2:InstanceType"))}'
            )
    for action in ("ec2:TerminateInstances", "ec2:CreateTags"):
        for s in (s for s in statements(policy) if _allows(s, action) and _on_instances(s)):
            at_launch = action == "ec2:CreateTags" and _string_equals(s, "ec2:CreateAction") == {"RunInstances"}
            if not at_launch and _string_equals(s, f"aws:ResourceTag/{CLUSTER_TAG}") != {cluster}:
                problems.append(
                    f"{_sid(s, action)}: {action} must be limited to instances tagged {CLUSTER_TAG}={cluster} "
                    f'(Condition StringEquals "aws:ResourceTag/{CLUSTER_TAG}")'
                )
    return problems


def _mlflow_artifacts(cfg: dict) -> str | None:
    """The MLflow server's S3 artifact root from the config's start commands, as an object ARN prefix."""
    text = " ".join(str(c) for c in cfg.get("head_start_ray_commands") or [])
    match = re.search(r"--artifacts-destination[ =]s3://(\S+)", text)
    return f"arn:aws:s3:::{match.group(1).rstrip('/')}/" if match else None


def _node_problems(policy: dict, cfg: dict, kind: str) -> list[str]:
    """A worker (or the KubeRay head pod) launches nothing; a worker never writes MLflow's artifacts."""
    problems = []
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"):
        if any(_allows(s, action) for s in statements(policy)):
            who = "a worker's role" if kind == "worker" else "the KubeRay head's role"
            problems.append(
                f"{who} allows {action}: only the launcher's head launches and terminates nodes (on Kubernetes, "
                "the autoscaler uses the Kubernetes API)"
            )
    artifacts = _mlflow_artifacts(cfg)
    if artifacts and kind == "worker":
        probe = f"{artifacts}0/artifacts/student/model.pth"
        for s in statements(policy):
            writes = [a for a in S3_WRITES if _allows(s, a, probe)]
            if writes:
                problems.append(
                    f"{_sid(s)}: lets the workers {', '.join(writes)} in {artifacts[13:]} "
                    "(MLflow's artifacts, written by the head's MLflow server only): allow writes under the sweep's "
                    "--storage prefix instead, e.g. arn:aws:s3:::BUCKET/afm-ray/*"
                )
    return problems


def _artifact_writer_problems(policy: dict, cfg: dict) -> list[str]:
    """MLflow's server runs with the head's identity (on the launcher's head; in the KubeRay head pod as
    a sidecar): that identity must write MLflow's artifacts, or every student upload fails."""
    artifacts = _mlflow_artifacts(cfg)
    if not artifacts:
        return []
    probe = f"{artifacts}0/artifacts/student/model.safetensors"
    if any(_allows(s, "s3:PutObject", probe) for s in statements(policy)):
        return []
    return [
        f"the head may not s3:PutObject in {artifacts[13:]}: MLflow's server runs as the head and writes the "
        "students there; every upload would fail (allow writes on that prefix)"
    ]


def _ecr_problems(policy: dict, cfg: dict) -> list[str]:
    image = ECR_IMAGE.match(str((cfg.get("docker") or {}).get("image", "")))
    if not image:
        return []
    repository = f":repository/{image['repo']}"
    problems = []
    for s in statements(policy):
        actions = [a for a in _listed(s.get("Action")) if a.lower().startswith("ecr:")]
        if s.get("Effect") != "Allow" or not actions or actions == ["ecr:GetAuthorizationToken"]:
            continue  # GetAuthorizationToken has no resource to scope: AWS requires "*"
        wide = [r for r in _listed(s.get("Resource")) if not r.endswith(repository)]
        if wide:
            problems.append(
                f"{_sid(s)}: ECR pulls on {wide}: scope them to the image's repository "
                f"(arn:aws:ecr:REGION:ACCOUNT_ID{repository})"
            )
    return problems


def fetched_secrets(cfg: dict) -> tuple[set[str], set[str]]:
    """(the secrets the head fetches, those the workers fetch) in the config's initialization commands:
    `ray up` runs the global list on the head; a worker type's own list replaces it."""
    head_name = cfg.get("head_node_type")
    head = set(SECRET_ID.findall(" ".join(str(c) for c in cfg.get("initialization_commands") or [])))
    workers: set[str] = set()
    for name, node_type in (cfg.get("available_node_types") or {}).items():
        if name == head_name:
            continue
        commands = node_type.get("initialization_commands", cfg.get("initialization_commands") or [])
        workers |= set(SECRET_ID.findall(" ".join(str(c) for c in commands)))
    return head, workers


def _secret_problems(policy: dict, cfg: dict, kind: str) -> list[str]:
    """A policy reads exactly the secrets its nodes fetch."""
    head, workers = fetched_secrets(cfg)
    wanted = {"head": head, "worker": workers}.get(kind, set())
    readable = [
        r for s in statements(policy) if _allows(s, "secretsmanager:GetSecretValue") for r in _listed(s.get("Resource"))
    ]
    problems = [
        f"secretsmanager:GetSecretValue on {r}: allow only the secrets these nodes fetch ({', '.join(sorted(wanted))})"
        if wanted
        else f"secretsmanager:GetSecretValue on {r}: these nodes fetch no secret"
        for r in readable
        if not any(f":secret:{secret}-" in r for secret in wanted)
    ]
    for secret in sorted(wanted):
        if not any(f":secret:{secret}-" in r for r in readable):
            problems.append(f"no statement allows secretsmanager:GetSecretValue on the secret {secret} the nodes fetch")
    return problems
