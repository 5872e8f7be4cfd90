"""What every check shares: the repository's versions, image tags, start-up commands and the
`python -m afm_ray.X --flag` commands configs run (their flags must exist). Offline, and afm-ray
is read as text, never imported."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import ray

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
RAY_VERSION = ray.__version__
MLFLOW_VERSION = "3.17.2"  # the newest MLflow this stack can install (pyarrow<26)


def dotted(path: Any) -> str:
    return ".".join(str(part) for part in path) or "<top level>"


def did_you_mean(key: str, known: Any) -> str:
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def fields(names: str) -> set[str]:
    return set(names.split())


# ----------------------------------------------------------------------------- versions


def pyproject() -> dict:
    """The repository's pyproject.toml, or {} where there is none."""
    path = ROOT / "pyproject.toml"
    return tomllib.loads(path.read_text()) if path.is_file() else {}


def pyproject_version() -> str | None:
    """pyproject.toml's [project] version, None where it has none."""
    return pyproject().get("project", {}).get("version")


def package_version() -> str | None:
    """afm_ray/__init__.py's __version__, read as text: this script must not import the package."""
    path = ROOT / "afm_ray" / "__init__.py"
    match = path.is_file() and re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", path.read_text(), re.M)
    return match.group(1) if match else None


def expected_version() -> str | None:
    """The version the cluster image must install: pyproject's, or the package's until pyproject exists."""
    return pyproject_version() or package_version()


AFM_IMAGE = re.compile(r"^(?P<repo>(?:\S+/)?afm-ray):(?P<version>[^-\s]+)-ray(?P<ray>[0-9][^-\s]*)(?P<flavour>-\S+)?$")
RAY_IMAGE = re.compile(r"^(?:docker\.io/)?rayproject/ray:(?P<tag>\S+)$")


def image_problems(image: Any, at: str, *, afm_ray: bool = False) -> list[str]:
    """Tag checks; `afm_ray`: the image must be the afm-ray image (it runs Ray and the trials)."""
    if not isinstance(image, str) or not image:
        return [f"{at}: no image"]
    if afm_ray and not AFM_IMAGE.match(image):
        return [
            f"{at}: image {image} is not the afm-ray image (REPOSITORY/afm-ray:<afm-ray version>-ray<Ray "
            "version>-<flavour>, see clusters/build_image.sh): its nodes would have no afm-ray to run"
        ]
    if match := AFM_IMAGE.match(image):
        problems = []
        if match["version"] != expected_version():
            problems.append(
                f"{at}: image {image} installs afm-ray {match['version']}, but pyproject.toml says "
                f"{expected_version()} (rebuild with clusters/build_image.sh and update the tag)"
            )
        if match["ray"] != RAY_VERSION:
            problems.append(f"{at}: image {image} is built on Ray {match['ray']}, the project runs Ray {RAY_VERSION}")
        return problems
    if match := RAY_IMAGE.match(image):
        tag = match["tag"]
        if tag != RAY_VERSION and not tag.startswith(RAY_VERSION + "-"):
            return [f"{at}: image {image} is not Ray {RAY_VERSION} (expected rayproject/ray:{RAY_VERSION}[-...])"]
        return []
    return [
        f"{at}: image {image} is neither the afm-ray image (REPOSITORY/afm-ray:<afm-ray version>-ray<Ray "
        f"version>-<flavour>, see clusters/build_image.sh) nor rayproject/ray:{RAY_VERSION}"
    ]


# ------------------------------------------------------------------------------ commands

INSTALL = re.compile(r"\b(?:pip3?|uv|conda|mamba|micromamba|apt-get|apt|yum|dnf)\b[^;&|\n]*\binstall\b")
MLFLOW_HOST = re.compile(r"--host[= ]+(\S+)")


def command_problems(command: str, at: str) -> list[str]:
    """No installs at start-up; an MLflow server only on the loopback."""
    problems = []
    if match := INSTALL.search(command):
        problems.append(
            f"{at} installs packages at start-up ({match.group(0)!r}): bake them into the image "
            "(clusters/Dockerfile) so a trial starts without installing anything"
        )
    if "mlflow server" in command or "mlflow ui" in command:
        host = MLFLOW_HOST.search(command)
        if not host or host.group(1) not in ("127.0.0.1", "localhost"):
            where = host.group(1) if host else "an unspecified host"
            problems.append(
                f"{at}: the MLflow server listens on {where}; it must say --host 127.0.0.1 "
                "(nothing but SSH is public: reach MLflow through a tunnel)"
            )
    return problems


def strings(node: Any) -> list[str]:
    """Every string in a loaded YAML/JSON tree."""
    if isinstance(node, str):
        return [node]
    values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return [s for value in values for s in strings(value)]


def afm_ray_commands(text: str) -> list[tuple[str, str]]:
    """(module, arguments) for every `python -m afm_ray.X ...` in a shell text or a README."""
    found = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        for part in re.split(r"&&|\|\||;|\|", line):
            if match := re.search(r"python3? -m afm_ray\.(\w+)(.*)", part):
                found.append((match.group(1), match.group(2)))
    return found


def module_sources(module: str) -> list[Path]:
    """Where `python -m afm_ray.<module>` defines its flags: afm_ray/<module>.py, or a package's __main__.py
    and the afm_ray modules it imports from (its parser may live in a shared command-line module)."""
    path, main = ROOT / "afm_ray" / f"{module}.py", ROOT / "afm_ray" / module / "__main__.py"
    if path.is_file() or not main.is_file():
        return [path] if path.is_file() else []
    imported = re.findall(r"^from afm_ray\.(\w+) import", main.read_text(), re.M)
    return [main, *(p for name in imported if (p := ROOT / "afm_ray" / f"{name}.py").is_file())]


FLAG_DEFINITION = re.compile(r"""add_argument\(\s*["'](--[a-z0-9-]+)["']""")


def flag_problems(text: str) -> list[str]:
    """Flags given to `python -m afm_ray.X` that its sources do not define (read as text, not imported)."""
    problems = []
    for module, args in afm_ray_commands(text):
        sources = module_sources(module)
        if not sources:
            problems.append(f"python -m afm_ray.{module}: no such command (afm_ray/{module}/__main__.py)")
            continue
        defined = {flag for source in sources for flag in FLAG_DEFINITION.findall(source.read_text())}
        names = " and ".join(str(source.relative_to(ROOT)) for source in sources)
        verb = "defines" if len(sources) == 1 else "define"
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", args):
            if flag not in defined:
                problems.append(
                    f"python -m afm_ray.{module} {flag}: {names} {verb} no such flag{did_you_mean(flag, defined)}"
                )
    return problems
