"""Create the PostgreSQL databases of MLflow and of the Optuna study if they are missing (idempotent).

The head of clusters/aws.yaml and gcp.yaml runs it at every `ray up`, inside the afm-ray image, with
the two URLs that the head's environment file holds (fetched from the cloud's secret store, never
written in a config):

    MLFLOW_BACKEND_STORE_URI=postgresql://afm:...@HOST:5432/mlflow?sslmode=require
    AFM_RAY_OPTUNA_STORAGE=postgresql://afm:...@HOST:5432/optuna?sslmode=require

MLflow and Optuna each keep an Alembic `alembic_version` table, so they need a database each. A
managed server starts with one (RDS: --db-name; Cloud SQL creates both with gcloud), so this makes
the other: it connects to the server's `postgres` database as the same user and runs CREATE DATABASE.
One line per store; a failure is one line on stderr and exit 1; no password is ever printed.
"""

from __future__ import annotations

import os
import sys

STORES = ("MLFLOW_BACKEND_STORE_URI", "AFM_RAY_OPTUNA_STORAGE")


def ensure_database(url_text: str) -> str:
    """Connect to the URL's database, creating it first if the server says it does not exist; what was done."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    url = make_url(url_text)
    shown = url.render_as_string(hide_password=True)
    if not url.drivername.startswith("postgresql"):
        return f"{shown}: not PostgreSQL, nothing to create"
    try:
        sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10}).connect().close()
        return f"{shown}: exists"
    except sqlalchemy.exc.OperationalError as exc:
        if "does not exist" not in str(exc.orig):
            raise
    server = sqlalchemy.create_engine(
        url.set(database="postgres"), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10}
    )
    with server.connect() as conn:
        name = conn.dialect.identifier_preparer.quote(url.database)
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    return f"{shown}: created"


def one_line(exc: BaseException, secrets: list[str]) -> str:
    """An error as one line, with every password of `secrets` masked."""
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return f"{type(exc).__name__}: {text}"


def main() -> int:
    from sqlalchemy.engine import make_url

    urls = {name: os.environ[name] for name in STORES if os.environ.get(name)}
    if not urls:
        print(f"create_databases: error: none of {', '.join(STORES)} is set in this environment", file=sys.stderr)
        return 1
    for name, text in urls.items():
        try:
            print(f"create_databases: {name}: {ensure_database(text)}")
        except Exception as exc:  # any failure of the driver or the server: one line, no password
            try:
                secrets = [make_url(text).password or ""]
            except Exception:
                secrets = [text]  # an unparsable URL is not printed at all
            print(f"create_databases: error: {name}: {one_line(exc, secrets)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
