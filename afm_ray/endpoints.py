"""Is a service there? Bounded probes of the network services a command talks to, run before
it starts: an MLflow tracking server over HTTP and a Ray cluster's address.

Without them, an unreachable MLflow server costs MLflow's own retries (minutes, silently), and
`ray.init` on a wrong address waits for a GCS that never answers (it does not give up). Each
probe here is bounded in time, name resolution included, and fails with one line. Standard
library only: a probe runs before Ray, MLflow or torch is imported.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

from afm_ray.errors import ClusterError, ConfigError, TrackingError, one_line

T = TypeVar("T")

#: Seconds a probe may take, name resolution included, unless $AFM_RAY_PROBE_TIMEOUT_S says otherwise.
PROBE_TIMEOUT_S = 5.0
#: What every HTTP/2 server, gRPC included, sends first: a SETTINGS frame (RFC 9113, 3.4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS_FRAME = 0x4


def probe_timeout_s() -> float:
    """$AFM_RAY_PROBE_TIMEOUT_S (seconds, > 0), else PROBE_TIMEOUT_S."""
    text = os.environ.get("AFM_RAY_PROBE_TIMEOUT_S", "")
    try:
        value = float(text) if text else PROBE_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"$AFM_RAY_PROBE_TIMEOUT_S: got {text!r}, expected a number of seconds > 0")
    return value


def bounded(fn: Callable[[], T], timeout_s: float) -> T:
    """`fn()` in a daemon thread, given up after `timeout_s` (TimeoutError). Socket timeouts
    do not cover name resolution (getaddrinfo blocks), this does."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="afm-ray-probe")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def check_mlflow_server(uri: str, timeout_s: float | None = None) -> None:
    """An http(s) tracking URI answers MLflow's /health with 200 within `timeout_s` (default:
    probe_timeout_s())."""
    timeout_s = timeout_s or probe_timeout_s()
    url = uri.rstrip("/") + "/health"

    def get() -> int:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status

    try:
        status = bounded(get, timeout_s + 1)
    except urllib.error.HTTPError as exc:
        raise TrackingError(
            f"tracking URI {uri}: {url} answered HTTP {exc.code}; is it an MLflow server "
            "(mlflow server --host 127.0.0.1 --port 5000)?"
        ) from None
    except (TimeoutError, urllib.error.URLError, OSError, ValueError) as exc:
        reason = one_line(getattr(exc, "reason", exc))
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it "
            "(mlflow server --host 127.0.0.1 --port 5000) or pass another --tracking-uri"
        ) from None
    if status != 200:
        raise TrackingError(f"tracking URI {uri}: {url} answered HTTP {status}, expected 200 from an MLflow server")


def parse_ray_address(address: str) -> tuple[str, str, int] | None:
    """(kind, host, port) of a Ray address: kind "gcs" for host:port, "client" for ray://;
    None for `auto` and `local`, which name no endpoint. A ClusterError for anything else."""
    if address in ("auto", "local"):
        return None
    hint = "expected host:port of the head's GCS (e.g. 10.0.0.5:6379), ray://host:10001, auto or local"
    if "://" in address:
        parsed = urlparse(address)
        if parsed.scheme != "ray":
            extra = " (that is the dashboard's job-submission address; use it with `ray job submit`)"
            raise ClusterError(f"--address {address}: {hint}{extra if parsed.scheme.startswith('http') else ''}")
        host, port, kind = parsed.hostname, _port(parsed, 10001, address, hint), "client"
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise ClusterError(f"--address {address}: {hint}")
        host, port, kind = host.strip("[]"), int(port_text), "gcs"
    if not host or not 0 < port < 65536:
        raise ClusterError(f"--address {address}: {hint}")
    return kind, host, port


def _port(parsed: object, default: int, address: str, hint: str) -> int:
    try:
        return parsed.port or default  # type: ignore[attr-defined]
    except ValueError:  # a port that is not a number
        raise ClusterError(f"--address {address}: {hint}") from None


def check_ray_address(address: str | None, timeout_s: float | None = None) -> None:
    """A Ray address answers, and speaks gRPC (as Ray's GCS and client server do), within
    `timeout_s` (default: probe_timeout_s()): `ray.init` would wait for ever on a foreign port."""
    timeout_s = timeout_s or probe_timeout_s()
    endpoint = parse_ray_address(address) if address else None
    if endpoint is None:
        return
    kind, host, port = endpoint
    what = "Ray client server" if kind == "client" else "Ray GCS"

    def probe() -> bytes:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            if os.environ.get("RAY_USE_TLS", "0") not in ("0", ""):
                return b""  # TLS first: a plaintext preface would only be refused
            sock.sendall(_HTTP2_PREFACE)
            return sock.recv(9)

    try:
        header = bounded(probe, timeout_s + 1)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"--address {address}: no {what} answers at {host}:{port} ({one_line(exc)}); start the cluster "
            "(ray start --head) or leave --address and $RAY_ADDRESS unset for a local Ray"
        ) from None
    if header and (len(header) < 4 or header[3] != _SETTINGS_FRAME):
        raise ClusterError(
            f"--address {address}: something answers at {host}:{port} but it is not a {what} (it does not speak "
            "gRPC); the head's GCS port is 6379 unless `ray start --port` chose another"
        )
    if not header and os.environ.get("RAY_USE_TLS", "0") in ("0", ""):
        raise ClusterError(f"--address {address}: {host}:{port} closed the connection; it is not a {what}")
