"""What builds and ships the image and the job: the job runtime env, the Dockerfile, its
.dockerignore and the constraints, checked against pyproject.toml and Ray."""

from __future__ import annotations

import re
from typing import Any

from packaging.requirements import Requirement

from checks.common import MLFLOW_VERSION, RAY_VERSION, expected_version, pyproject

RUNTIME_ENV_KEYS = {"working_dir", "excludes", "env_vars", "config"}  # the image has the rest: no pip, uv, conda


def runtime_env_problems(env: Any) -> list[str]:
    """`ray job submit --runtime-env`: upload the working dir (your own spaces), never the package source,
    install nothing."""
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
    needed = {"pyproject.toml", "afm_ray", "clusters/constraints.txt"}  # afm_ray/ holds the shipped spaces
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
