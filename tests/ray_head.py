"""A Ray head started by a test and stopped without touching any other Ray on the machine.

`ray stop` stops every Ray of the user, a developer's own sweep included. A head started here
runs `ray start --block` in a new session, so everything it spawns (GCS, raylet, dashboard,
workers, and the nodes an autoscaler launches) shares that session id; stopping signals
exactly the processes of that session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 180) -> None:
    """Wait until a server answers at `url`, with any HTTP status (401 from a token-protected
    Ray dashboard counts: it is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def own_ports() -> list[str]:
    """Free ports for the head's fixed-port services (agent, client server, metrics): their
    defaults (52365, 10001, ...) collide with any other Ray already running on the machine."""
    flags = (
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
    )
    return [f"{flag}={free_port()}" for flag in flags]


def session_processes(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:  # exited meanwhile
                pass
    return pids


def stop_session(sid: int, grace_s: float = 15) -> None:
    """SIGTERM every process of the session, then SIGKILL what is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        for pid in session_processes(sid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while session_processes(sid) and time.monotonic() < deadline:
            time.sleep(0.5)


@contextmanager
def ray_head(
    env: Mapping[str, str], *extra_args: str, num_cpus: int = 2, port: int | None = None
) -> Iterator[dict[str, str]]:
    """Start a Ray head (GCS on `port`, default a free one); yields {"gcs": host:port, "dashboard": http://...,
    "temp_dir": ..., "pid": the session's leader}; stops only its own processes."""
    gcs_port, dashboard_port = port or free_port(), free_port()
    # A short temp dir: Ray's Unix sockets live below it and paths are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    log = Path(temp_dir) / "ray_start.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                f"--port={gcs_port}",
                f"--dashboard-port={dashboard_port}",
                f"--num-cpus={num_cpus}",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                *own_ports(),
                *extra_args,
            ],
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # `ray start` prints this once the node, its agent and the dashboard are up (without
        # --block it returns at this point).
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        yield {"gcs": f"127.0.0.1:{gcs_port}", "dashboard": dashboard, "temp_dir": temp_dir, "pid": head.pid}
    finally:
        stop_session(head.pid)
