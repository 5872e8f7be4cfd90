"""What the cluster nodes run before Ray starts (clusters/node/, and the configs' token command), run here.

- gpu_check.py on this machine's CPU build of torch takes its failure path for real: exit 1, one line
  that says why; its reasons for a real GPU host (no driver, a driver older than torch's CUDA) are
  checked on the values nvidia-smi would report.
- create_databases.py against a server that refuses the connection: exit 1, one line, no password.
  (Against a real PostgreSQL, creating the second database, it needs the project's PostgreSQL test
  server.)
- The exact command aws.yaml and gcp.yaml run to store the Ray token, with the secret store's answer
  replaced by a fixed string: the file is mode 0400, owned by uid 1000 (the container's `ray` user),
  readable by uid 1000 and by no other unprivileged user.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NODE = ROOT / "clusters" / "node"


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(NODE / script)], env=env, capture_output=True, text=True, timeout=300)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_BACKEND_STORE_URI", "AFM_RAY_OPTUNA_STORAGE")}
    return {**env, **extra}


# ------------------------------------------------------------------------------ gpu_check.py


def test_gpu_check_fails_a_node_whose_torch_cannot_use_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU: the failure path needs one without")
    result = _run("gpu_check.py", _clean_env())
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: torch "), result.stderr
    assert "cannot use a GPU on this node: " in lines[0] and not result.stdout
    if torch.version.cuda is None:
        assert "this torch is a CPU build" in lines[0]


def test_gpu_check_names_the_driver_torch_needs():
    gpu_check = _load(NODE / "gpu_check.py")
    assert "older than CUDA 13.0 needs (>= 580)" in gpu_check.why_not("13.0", "570.172.08")
    assert "present but CUDA cannot initialise" in gpu_check.why_not("13.0", "580.95.05")
    assert "sees no NVIDIA driver" in gpu_check.why_not("13.0", None)
    assert "CPU build" in gpu_check.why_not(None, "580.95.05")


def test_gpu_check_and_check_py_agree_on_the_drivers():
    """The node's table and check.py's are the same (the node cannot import clusters/checks)."""
    machines = _load(ROOT / "clusters" / "checks" / "machines.py")
    assert _load(NODE / "gpu_check.py").CUDA_MIN_DRIVER == machines.CUDA_MIN_DRIVER


# ------------------------------------------------------------------------------ create_databases.py


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_create_databases_says_what_failed_without_the_password():
    url = f"postgresql://afm:S3CRET-pw@127.0.0.1:{_free_port()}/optuna"  # nothing listens there
    result = _run("create_databases.py", _clean_env(AFM_RAY_OPTUNA_STORAGE=url))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("create_databases: error: AFM_RAY_OPTUNA_STORAGE: "), lines
    assert "S3CRET" not in result.stdout + result.stderr


def test_create_databases_needs_a_url():
    result = _run("create_databases.py", _clean_env())
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "create_databases: error: none of MLFLOW_BACKEND_STORE_URI, AFM_RAY_OPTUNA_STORAGE is set in this environment"
    ]


def test_create_databases_leaves_other_stores_alone(tmp_path):
    url = f"sqlite:///{tmp_path}/x.db"
    result = _run("create_databases.py", _clean_env(MLFLOW_BACKEND_STORE_URI=url))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"create_databases: MLFLOW_BACKEND_STORE_URI: {url}: not PostgreSQL, nothing to create"
    ]
    assert not (tmp_path / "x.db").exists()


# ------------------------------------------------------------------------------ the token file


def _token_commands() -> list[tuple[str, str]]:
    """(where, command) for every command of the launcher configs that stores the Ray token."""
    found = []
    for name in ("aws.yaml", "gcp.yaml"):
        cfg = yaml.safe_load((ROOT / "clusters" / name).read_text())
        lists = [("initialization_commands", cfg["initialization_commands"])]
        lists += [
            (n, t["initialization_commands"])
            for n, t in cfg["available_node_types"].items()
            if "initialization_commands" in t
        ]
        found += [(f"{name} {where}", c) for where, commands in lists for c in commands if "ray_auth_token" in c]
    return found


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv (util-linux)")
@pytest.mark.parametrize("where,command", _token_commands(), ids=[w for w, _ in _token_commands()])
def test_token_file_is_readable_by_the_container_user_only(where, command):
    # The secret store's answer becomes a fixed token; `sudo` is dropped (this test already runs as root).
    fetch = re.search(r"token=\$\((.*?)\)", command, re.S)
    assert fetch and "sudo install -m 0400 -o 1000 -g 100 /dev/stdin" in command, command
    local = command.replace(fetch.group(1), "printf f00-token").replace("sudo ", "")
    home = Path(tempfile.mkdtemp(prefix="afm-ray-home-"))
    try:
        home.chmod(0o755)  # traversable, as a home directory is
        subprocess.run(["bash", "-c", local], env={**os.environ, "HOME": str(home)}, check=True, timeout=60)
        token = home / ".afm-ray" / "ray_auth_token"
        info = token.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o400, 1000, 100), oct(info.st_mode)

        def read_as(uid: int) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["setpriv", f"--reuid={uid}", "--regid=100", "--clear-groups", "cat", str(token)],
                capture_output=True,
                text=True,
                timeout=60,
            )

        assert read_as(1000).stdout == "f00-token"
        other = read_as(1001)
        assert other.returncode != 0 and "Permission denied" in other.stderr
    finally:
        shutil.rmtree(home)
