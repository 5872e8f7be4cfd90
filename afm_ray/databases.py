"""Is the database there? A bounded probe of an SQL database server (PostgreSQL, MySQL) that holds
MLflow's backend store or the Optuna study, run before a sweep starts, saying in one line what is
wrong: the server does not answer, the credentials are refused, the database does not exist, or
its driver is not installed. And the rules that keep two stores apart and their tables whole:

- MLflow and Optuna both version their tables with Alembic in a table named `alembic_version`, so
  one database cannot hold both (each refuses the other's revision): `check_separate_stores`.
- Two sweeps that start at once on a new database would both create the tables and one would fail
  on a duplicate: `schema_lock` serialises that first use (a PostgreSQL advisory lock).

SQLAlchemy is imported inside the functions: a sweep imports this before Ray and MLflow.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

from afm_ray.credentials import redact_text, redact_uri
from afm_ray.endpoints import bounded, probe_timeout_s
from afm_ray.errors import UserError, one_line

#: Backends that are a server to probe (SQLite is a file: its own checks in sweep/plan.py).
SERVER_BACKENDS = ("postgresql", "mysql", "mariadb", "mssql", "oracle")
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}
#: The tables that say which application a database belongs to.
_MLFLOW_TABLES = {"experiments", "runs"}
_OPTUNA_TABLES = {"studies", "version_info"}
#: pg_advisory_lock key of the first use of a database (any 64-bit number the sweep owns).
_SCHEMA_LOCK_KEY = 0x41464D52  # "AFMR"
_HELD: set[tuple | None] = set()  # the databases whose lock this process holds


def backend(url: str) -> str:
    """The SQLAlchemy backend name of `url` ("postgresql", "sqlite", ...), or "" if it is no SQLAlchemy URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).get_backend_name()
    except (ArgumentError, ValueError):
        return ""


def is_server_url(url: str) -> bool:
    return backend(url) in SERVER_BACKENDS


def _where(url: str) -> tuple[str, int, str]:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = parsed.get_backend_name()
    host = parsed.host or parsed.query.get("host") or os.environ.get("PGHOST") or "localhost"
    return str(host), int(parsed.port or _DEFAULT_PORTS.get(name, 0)), parsed.database or ""


def probe_database(url: str, label: str, error: type[UserError], timeout_s: float | None = None) -> set[str]:
    """Connect to the database of `url` once, within `timeout_s` (default: probe_timeout_s()), and
    return the names of its tables. Raises `error` with one line naming `label` (the option, its URL
    redacted) and what is wrong: driver missing, unreachable, authentication failed, database missing."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    timeout_s = timeout_s or probe_timeout_s()
    parsed = make_url(url)
    host, port, database = _where(url)
    user = parsed.username or os.environ.get("PGUSER") or "(default user)"
    try:
        engine = create_engine(
            url, poolclass=NullPool, connect_args={"connect_timeout": max(2, math.ceil(timeout_s))}
        )  # libpq and PyMySQL both take connect_timeout, in whole seconds (libpq's least is 2)
    except ImportError as exc:
        extra = " pip install 'afm-ray[postgres]'" if parsed.get_backend_name() == "postgresql" else ""
        raise error(f"{label}: its database driver is not installed ({one_line(exc)});{extra}") from None

    def connect() -> set[str]:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())

    try:
        return bounded(connect, timeout_s + 2)
    except TimeoutError:
        raise error(f"{label}: no database server answers at {host}:{port} within {timeout_s:g} s") from None
    except Exception as exc:  # the driver's OperationalError, wrapped by SQLAlchemy
        cause = getattr(exc, "orig", None) or exc
        raise error(f"{label}: {_reason(cause, host, port, database, user)}") from None
    finally:
        engine.dispose()


def _reason(exc: BaseException, host: str, port: int, database: str, user: str) -> str:
    """One line for a failed connection, from the driver's SQLSTATE or (for connection failures,
    which carry none) its message."""
    text = one_line(exc)
    lower, state = text.lower(), str(getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None) or "")
    if state == "3D000" or ("database" in lower and "does not exist" in lower) or "unknown database" in lower:
        return f"database {database!r} does not exist on {host}:{port}; create it (createdb {database}) or fix the name"
    if (
        state.startswith("28")
        or "authentication failed" in lower
        or "access denied" in lower
        or "no password supplied" in lower
        or ("role" in lower and "does not exist" in lower)
        or "pg_hba.conf" in lower
    ):
        return (
            f"authentication failed for user {user!r} at {host}:{port}; check the password (in the URL, a "
            "--*-file, $PGPASSWORD or ~/.pgpass) and that the user may connect"
        )
    for words, why in (
        (("refused",), "connection refused"),
        (("timeout", "timed out"), "no answer"),
        (("translate host name", "not known", "nodename nor servname", "name resolution"), "unknown host"),
        (("no route to host", "network is unreachable"), "no route to host"),
        (("can't connect",), "cannot connect"),
    ):
        if any(w in lower for w in words):
            return f"no database server answers at {host}:{port} ({why}); start it or fix the host and port"
    return f"cannot use the database at {host}:{port}: {redact_text(text)}"


def check_tables(tables: set[str], label: str, owner: str, error: type[UserError]) -> None:
    """The database of `label` holds no other application's tables: `owner` is "mlflow" or "optuna"."""
    other, theirs = ("Optuna", _OPTUNA_TABLES) if owner == "mlflow" else ("MLflow", _MLFLOW_TABLES)
    if theirs <= tables:
        raise error(
            f"{label}: this database holds {other}'s tables; MLflow and Optuna each need a database of their "
            "own (both keep an alembic_version table), e.g. CREATE DATABASE optuna"
        )


def _identity(url: str) -> tuple | None:
    """What names one database: (backend, host, port, name) of a server, ("sqlite", absolute path) of a file."""
    name = backend(url)
    if name == "sqlite":
        from sqlalchemy.engine import make_url

        database = make_url(url).database or ""
        return ("sqlite", str(Path(database).expanduser().resolve())) if database not in ("", ":memory:") else None
    if name in SERVER_BACKENDS:
        return (name, *_where(url))
    return None


def check_separate_stores(tracking_uri: str, optuna_url: str, error: type[UserError]) -> None:
    """MLflow's backend store and the Optuna study are not one database (see the module docstring)."""
    same = _identity(tracking_uri)
    if same is not None and same == _identity(optuna_url):
        raise error(
            f"--optuna-storage {redact_uri(optuna_url)} and --tracking-uri {redact_uri(tracking_uri)} name the same "
            "database; MLflow and Optuna each need one of their own (both keep an alembic_version table), "
            "e.g. .../mlflow and .../optuna on the same server"
        )


@contextlib.contextmanager
def schema_lock(url: str) -> Iterator[None]:
    """Hold a lock on the database of `url` while the block creates MLflow's or Optuna's tables, so
    two sweeps that start at once on a new database do not both create them. PostgreSQL only (an
    advisory lock, released with its connection); elsewhere a no-op. Re-entrant in a process: a
    second lock on its own connection would wait for the first for ever."""
    held = _identity(url)
    if backend(url) != "postgresql" or held in _HELD:
        yield
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            _HELD.add(held)
            try:
                yield
            finally:
                _HELD.discard(held)
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _SCHEMA_LOCK_KEY})
    finally:
        engine.dispose()
