"""A real PostgreSQL server for tests: Debian's `postgresql` server binaries, started in a temporary
folder on a free port and stopped afterwards, without touching any server already on the machine.

initdb refuses to run as root, so as root the server is created and run as the unprivileged
`postgres` user (`runuser -u postgres --`); otherwise as the current user. Connections over TCP
(127.0.0.1) need a password (scram-sha-256), so tests can use a wrong one; the superuser and a
test role, `afm`, have known passwords, and the test role's password holds the characters that
URL parsers split on (`/`, `#`, `?`, `@` percent-encoded), so redaction is tested on the hard form.

No server binaries is a test failure, not a skip, unless $AFM_RAY_ALLOW_NO_POSTGRES=1 says a
machine without them is expected (`.ci/run` installs them).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "pg-super-" + uuid.uuid4().hex[:8]
#: The test role; its password is generated per session and contains / # ? : and a space-free @ form.
ROLE = "afm"
ROLE_PASSWORD = f"Pw/{uuid.uuid4().hex[:10]}#q?x:S3CRET"
ALLOW_NONE_ENV = "AFM_RAY_ALLOW_NO_POSTGRES"


def server_binaries() -> Path | None:
    """The folder of initdb and pg_ctl: $AFM_RAY_PG_BIN, the newest /usr/lib/postgresql/*/bin, or PATH."""
    if os.environ.get("AFM_RAY_PG_BIN"):
        return Path(os.environ["AFM_RAY_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server: `url(database)` gives an SQLAlchemy URL, `create_database()` a fresh database."""

    def __init__(self, bindir: Path, folder: Path, port: int):
        self.bindir, self.folder, self.port, self.host = bindir, folder, port, "127.0.0.1"
        self.datadir = folder / "data"
        self.as_postgres = os.geteuid() == 0

    # ----------------------------------------------------------------------------- the process

    def _command(self, *args: str) -> list[str]:
        return ["runuser", "-u", SUPERUSER, "--", *args] if self.as_postgres else list(args)

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run(self._command(*args), capture_output=True, text=True, timeout=timeout, cwd=self.folder)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")

    def start(self) -> None:
        pwfile = self.folder / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        if self.as_postgres:
            shutil.chown(self.folder, SUPERUSER)
            shutil.chown(pwfile, SUPERUSER)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",  # the unix socket lives in this 0700 folder, only its owner reaches it
            "--encoding=UTF8",
            "--no-sync",
        )
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses={self.host} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-o", options, "-l", str(self.folder / "log"), "-w",
            "-t", "60", "start",
        )  # fmt: skip
        self.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD %s", (ROLE_PASSWORD,))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop", timeout=60)

    def log(self) -> str:
        path = self.folder / "log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    # ----------------------------------------------------------------------------- databases

    def url(
        self,
        database: str = "postgres",
        *,
        user: str = ROLE,
        password: str | None = None,
        port: int | None = None,
        raw_password: bool = False,
    ) -> str:
        """An SQLAlchemy URL. The password is percent-encoded unless `raw_password` (SQLAlchemy also
        takes it raw: everything between the first ':' and the '@' is the password)."""
        password = (SUPERUSER_PASSWORD if user == SUPERUSER else ROLE_PASSWORD) if password is None else password
        secret = password if raw_password else quote(password, safe="")
        return f"postgresql://{user}:{secret}@{self.host}:{port or self.port}/{database}"

    def execute(self, sql: str, params: tuple = (), database: str = "postgres") -> list[tuple]:
        import psycopg  # the driver SQLAlchemy 2.1 uses for postgresql:// (the `postgres` extra)

        with psycopg.connect(
            host=self.host, port=self.port, user=SUPERUSER, password=SUPERUSER_PASSWORD, dbname=database,
            autocommit=True,  # CREATE DATABASE cannot run in a transaction
            cursor_factory=psycopg.ClientCursor,  # utility statements take no server-side parameters
        ) as conn, conn.cursor() as cur:  # fmt: skip
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str | None = None, owner: str = ROLE) -> str:
        """A new, empty database owned by `owner`; returns its name."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self.execute(f'CREATE DATABASE "{name}" OWNER {owner}')
        return name


def start_postgres() -> PostgresServer:
    """A started server in a new temporary folder (not under pytest's tmp: that is 0700 for root, and
    the server runs as `postgres`). Raises RuntimeError with the server's log when it cannot start;
    a port taken between choosing and binding it is retried."""
    bindir = server_binaries()
    if bindir is None or not (bindir / "initdb").exists():
        raise FileNotFoundError("no PostgreSQL server binaries (apt-get install -y postgresql)")
    error: Exception | None = None
    for _ in range(3):
        folder = Path(tempfile.mkdtemp(prefix="afm-ray-pg-"))
        server = PostgresServer(bindir, folder, _free_port())
        try:
            server.start()
            return server
        except Exception as exc:
            error = RuntimeError(f"{exc}\n{server.log()}")
            server.stop()
            shutil.rmtree(folder, ignore_errors=True)
            time.sleep(1)
    raise RuntimeError(f"PostgreSQL did not start: {error}")


def stop_postgres(server: PostgresServer) -> None:
    server.stop()
    shutil.rmtree(server.folder, ignore_errors=True)
