"""AWS IAM documents (clusters/aws-iam/*.json) against the AWS launcher config: least privilege.

The head's policy (it passes the worker role) may run instances only tagged for this cluster and
of the config's worker types, retag and terminate only those, never stop or start one (the
config says cache_stopped_nodes: false); every node pulls from the afm-ray ECR repository only
and reads only the Ray token's secret; the workers write only under the sweep's storage prefix,
never the MLflow artifacts that the head's MLflow server writes. Conditions are read as IAM
evaluates them for these actions (StringEquals on request and resource tags, on the instance type).
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any

CLUSTER_TAG = "ray-cluster-name"  # what Ray's AWS provider tags every instance it launches with
S3_WRITES = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:PutObjectAcl")
ECR_IMAGE = re.compile(r"^(?P<account>[^.]+)\.dkr\.ecr\.(?P<region>[^.]+)\.amazonaws\.com/(?P<repo>[^:]+):")
SECRET_ID = re.compile(r"secretsmanager get-secret-value\b.*?--secret-id[ =](\S+)")


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


def policy_kind(policy: Any) -> str:
    """trust (an assume-role document), head (it passes roles to what it launches), or node."""
    if any("Principal" in s for s in statements(policy)):
        return "trust"
    return "head" if any(_allows(s, "iam:PassRole") for s in statements(policy)) else "node"


def policy_problems(policy: Any, cfg: dict | None) -> list[str]:
    """Least privilege of a head or worker policy; with the AWS config beside it, checked against it."""
    if not isinstance(policy, dict) or not statements(policy):
        return ["not an IAM policy document (no Statement)"]
    kind = policy_kind(policy)
    if kind == "trust":
        return []
    problems = _wildcard_problems(policy)
    if cfg is None:
        return problems
    if kind == "head":
        problems += iam_problems(policy, cfg) + _instance_problems(policy, cfg)
    else:
        problems += _node_problems(policy, cfg)
    return problems + _ecr_problems(policy, cfg) + _secret_problems(policy, cfg)


def _wildcard_problems(policy: dict) -> list[str]:
    problems = []
    for s in statements(policy):
        for action in _listed(s.get("Action")):
            if s.get("Effect") == "Allow" and (action == "*" or action.endswith(":*")):
                problems.append(f"{s.get('Sid', 'a statement')}: allows {action}: name the actions it needs")
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
    if not runs:
        problems.append("no statement lets the head run instances (ec2:RunInstances on instance/*)")
    for s in runs:
        sid = s.get("Sid", "ec2:RunInstances")
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
                    f"{s.get('Sid', action)}: {action} must be limited to instances tagged {CLUSTER_TAG}={cluster} "
                    f'(Condition StringEquals "aws:ResourceTag/{CLUSTER_TAG}")'
                )
    return problems


def _mlflow_artifacts(cfg: dict) -> str | None:
    """The MLflow server's S3 artifact root from the config's start commands, as an object ARN prefix."""
    text = " ".join(str(c) for c in cfg.get("head_start_ray_commands") or [])
    match = re.search(r"--artifacts-destination[ =]s3://(\S+)", text)
    return f"arn:aws:s3:::{match.group(1).rstrip('/')}/" if match else None


def _node_problems(policy: dict, cfg: dict) -> list[str]:
    """A worker reads the bucket and writes only the sweep's storage; it launches nothing."""
    problems = []
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"):
        if any(_allows(s, action) for s in statements(policy)):
            problems.append(f"a worker's role allows {action}: only the head launches and terminates nodes")
    artifacts = _mlflow_artifacts(cfg)
    if artifacts:
        probe = f"{artifacts}0/artifacts/student/model.pth"
        for s in statements(policy):
            writes = [a for a in S3_WRITES if _allows(s, a, probe)]
            if writes:
                problems.append(
                    f"{s.get('Sid', 'a statement')}: lets the workers {', '.join(writes)} in {artifacts[13:]} "
                    "(MLflow's artifacts, written by the head's MLflow server only): allow writes under the sweep's "
                    "--storage prefix instead, e.g. arn:aws:s3:::BUCKET/afm-ray/*"
                )
    return problems


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
                f"{s.get('Sid', 'a statement')}: ECR pulls on {wide}: scope them to the image's repository "
                f"(arn:aws:ecr:REGION:ACCOUNT_ID{repository})"
            )
    return problems


def _secret_problems(policy: dict, cfg: dict) -> list[str]:
    """Every node reads the Ray token's secret, and no other secret."""
    text = " ".join(str(c) for c in cfg.get("initialization_commands") or [])
    match = SECRET_ID.search(text)
    if not match:
        return []  # the launcher check reports a config that fetches no token
    wanted = f":secret:{match.group(1)}"
    readable = [
        r for s in statements(policy) if _allows(s, "secretsmanager:GetSecretValue") for r in _listed(s.get("Resource"))
    ]
    problems = [
        f"secretsmanager:GetSecretValue on {r}: allow only the Ray token's secret" for r in readable if wanted not in r
    ]
    if not any(wanted in r for r in readable):
        problems.append(f"no statement allows secretsmanager:GetSecretValue on the Ray token's secret ({wanted[8:]})")
    return problems
