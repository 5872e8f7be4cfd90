"""The package works outside the checkout: a wheel built from the repository, installed into a
fresh virtualenv without -e, finds its search spaces (package data, importlib.resources) and runs
from an empty folder.

The fresh venv gets the dependencies of the environment running the tests through a .pth line
(nothing is downloaded, and the CPU torch of that environment is the one it sees); the wheel
itself is installed with --no-deps, so the afm_ray imported is the installed one, not the
checkout (PYTHONPATH is cleared) nor an editable install of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted(p.name for p in (ROOT / "afm_ray" / "search_spaces").glob("*.yaml"))
RECIPES = sorted(p.name for p in (ROOT / "afm_ray" / "recipes").glob("*.yaml"))


def _source_tree(target: Path) -> Path:
    """The files git would ship (tracked and new, not ignored), copied: the build writes build/ and
    *.egg-info next to its sources, which must not land in the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with the wheel installed, the wheel)"""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files a wheel ships")
    tmp = tmp_path_factory.mktemp("wheel")
    source = _source_tree(tmp / "src")
    # No build isolation: the build backend (setuptools) is the one installed here, nothing is fetched.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), "."],
         cwd=source)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("afm_ray-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    shared = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    # A path line only: the .pth files in there (an editable afm-ray's finder among them) are not run.
    (site / "shared-dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(shared)))
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)])
    return python, wheel


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "HOME": str(home), "AFM_RAY_CACHE": str(home / "cache")}


def test_wheel_carries_the_search_spaces(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"afm_ray/search_spaces/{name}" for name in SPACES} <= names, sorted(names)
    assert RECIPES and {f"afm_ray/recipes/{name}" for name in RECIPES} <= names, sorted(names)
    assert not any(name.startswith(("tests/", "benchmarks/", "clusters/")) for name in names)


def test_installed_package_runs_from_an_empty_folder(installed, tmp_path):
    python, _ = installed
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _clean_env(tmp_path)
    # TODO(lead): once `--dry-run` (issue 9) is merged, run `python -m afm_ray.sweep --dry-run` here too.
    script = f"""
import afm_ray, torch
from pathlib import Path
from afm_ray.search.space import load_search_space, shipped_spaces
from afm_ray.preflight import sweep_checks
assert Path(afm_ray.__file__).is_relative_to({str(python.parent.parent)!r}), afm_ray.__file__
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, torch.__version__
assert shipped_spaces() == {[name[: -len(".yaml")] for name in SPACES]!r}, shipped_spaces()
space = load_search_space()  # no argument: the embedded default, from the installed package
assert space.path == "default" and space.name == "embedded-default"
for _, check in sweep_checks(space, str(Path.cwd() / "ray_results"), "sqlite:///" + str(Path.cwd() / "mlflow.db")):
    print(check())
"""
    proc = _run([str(python), "-c", script], cwd=empty, env=env)
    lines = proc.stdout.splitlines()
    assert lines[0] == "data: mnist5k" and lines[-1].startswith("tracking: sqlite:///"), proc.stdout
    assert any(line.startswith("teacher: to be trained before the first trial: small_cnn") for line in lines)
    help_text = _run([str(python), "-m", "afm_ray.sweep", "--help"], cwd=empty, env=env).stdout
    assert "cifar10_resnet18" in help_text  # --space names the shipped spaces
    bad = subprocess.run(
        [str(python), "-m", "afm_ray.sweep", "--space", "nope"], cwd=empty, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: search space 'nope' is neither a file nor a shipped")
    # The final stage's recipes are package data too: listed, and each loads from the installed package.
    listed = _run([str(python), "-m", "afm_ray.final", "--list-recipes"], cwd=empty, env=env).stdout
    for name in RECIPES:
        assert f"recipe {name[: -len('.yaml')]} (" in listed, listed
