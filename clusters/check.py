"""Check the cluster files before `ray up` or `kubectl apply`: offline, no cloud, no cluster, no network.

    python clusters/check.py              # every file under clusters/ it knows how to check
    python clusters/check.py ~/.afm-ray/aws.yaml ~/.afm-ray/raycluster.yaml   # your filled-in copies

One line per problem (`<file>: <where>: <problem>`) and exit status 1, or a one-line summary
and 0; a missing file or one it does not know is one line on stderr and exit status 2. It
needs ray, pyyaml, jsonschema and packaging (and tomli on Python 3.10), not afm-ray itself.
clusters/README.md says what it checks, rule by rule.

This file finds each file's kind and runs its checks; the checks live in clusters/checks/:

- launcher.py: Ray cluster launcher configs (a YAML mapping with `provider`): the schema inside the
  installed Ray wheel (ray/autoscaler/ray-schema.json), this project's rules, then Ray's own
  preparation (`prepare_config`, `validate_config`, the v2 autoscaler's `AutoscalingConfig`).
- kuberay.py: KubeRay manifests (YAML documents with `kind`): KubeRay 1.7.0's CRDs (crd.py, the
  schemas vendored in kuberay-1.7.0.json), this project's rules, and Ray's own translation of each
  RayCluster into the autoscaler's config.
- fit.py: every shipped search space (afm_ray/search_spaces/*.yaml, read as YAML) fits a worker type
  of every cluster, and the head holds the trials' drivers; machines.py: what each cloud machine
  type is, the NVIDIA driver of each boot image, the driver torch's CUDA build needs.
- stores.py: no MLflow or Optuna store is a file on the head; no credential in a file.
- security.py: Ray token authentication with the token from a secret store, in a file only the
  container's user reads; no published port; NetworkPolicies admitting only the cluster's own pods;
  KubeRay workers with their own service account.
- iam.py: the AWS IAM documents grant least privilege and every action Ray's AWS provider needs.
- build.py: the job runtime env, the Dockerfile, its .dockerignore and the constraints, checked
  against pyproject.toml and Ray; readme.py: the commands of clusters/README.md.
- common.py: versions, image tags, start-up commands; `python -m afm_ray.X --flag` in any of them
  must use a flag that afm_ray/X.py (or the package's __main__.py and the afm_ray modules it
  imports) defines.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

# clusters/checks is imported as the package `checks`, whether this file runs as a script (its
# folder is then sys.path[0]) or is loaded by path (tests/test_clusters.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checks.build import constraints_problems, dockerfile_problems, dockerignore_problems, runtime_env_problems  # noqa: E402
from checks.common import CLUSTERS, ROOT, flag_problems, strings, tomllib  # noqa: E402
from checks.iam import policy_problems  # noqa: E402
from checks.kuberay import kuberay_problems, kuberay_reference_problems  # noqa: E402
from checks.launcher import launcher_problems  # noqa: E402
from checks.readme import readme_problems  # noqa: E402

# Each check module by its name, for the tests that reach past the functions above.
CHECKS = {
    name: importlib.import_module(f"checks.{name}")
    for name in "build common crd fit iam kuberay launcher machines readme security stores".split()
}


def _yaml_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def file_kind(path: Path) -> str | None:
    """What `path` is: launcher, kuberay, runtime-env, dockerfile, dockerignore, constraints, iam, readme; None if
    unknown."""
    name = path.name
    if name == "Dockerfile":
        return "dockerfile"
    if name.endswith(".dockerignore"):
        return "dockerignore"
    if path.suffix == ".txt" and "constraints" in name:
        return "constraints"
    if path.suffix == ".json":
        return None if path.parent.name == "checks" else "iam"  # checks/ holds KubeRay's schemas, not a policy
    if path.name == "README.md" and path.parent.name == "clusters":
        return "readme"
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
            ".dockerignore, constraints .txt, IAM .json or clusters/README.md)"
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
    elif kind == "readme":
        problems = readme_problems(text)
    elif kind in TEXT_CHECKS:
        problems = TEXT_CHECKS[kind](text)
    else:
        try:
            policy = json.loads(text)
        except json.JSONDecodeError as exc:
            return [f"not valid JSON: {exc}"]
        # A policy is compared with the AWS config beside it, where there is one (a broken aws.yaml is
        # reported as itself).
        config = next((p for p in (path.parent / "aws.yaml", path.parent.parent / "aws.yaml") if p.is_file()), None)
        cfg = yaml.safe_load(config.read_text()) if config and file_kind(config) == "launcher" else None
        problems = policy_problems(policy, cfg, path.name)
    # Ray's exceptions and YAML's errors span lines; a problem is one line of output, said once.
    return list(dict.fromkeys(" ".join(p.split()) for p in problems))


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
            bad = (
                "not a launcher config, KubeRay manifest, runtime env, Dockerfile, .dockerignore, constraints, IAM "
                "or README"
            )
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
