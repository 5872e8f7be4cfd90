"""The stores on a real PostgreSQL server (tests/postgres.py), checked before a sweep starts: what
the preflight says for each thing that can be wrong (one line, the password never in it), the
rules that keep MLflow's and Optuna's tables apart, libpq's own password mechanisms, and the Optuna
storage pickled without its password. No Ray here; the sweeps on PostgreSQL are in
tests/test_sweep_postgres.py."""

from __future__ import annotations

import pickle
import subprocess
import sys

import optuna
import pytest
from postgres import ROLE, ROLE_PASSWORD
from ray_head import free_port

from afm_ray.credentials import remember
from afm_ray.databases import probe_database
from afm_ray.errors import StorageError, TrackingError
from afm_ray.preflight import check_optuna_storage, check_tracking_uri
from afm_ray.sweep.__main__ import main as sweep_main
from afm_ray.sweep.driver import optuna_storage

SECRET = "S3CRET"  # in the test role's password (tests/postgres.py)
assert SECRET in ROLE_PASSWORD


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AFM_RAY_OPTUNA_STORAGE", "PGPASSWORD", "PGPASSFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def preflight_error(tmp_path, capsys, *extra: str) -> str:
    """The sweep's one-line error for these options (it stops before Ray starts)."""
    code = sweep_main(["--set", "data.name=digits", "--storage", str(tmp_path / "results"), *extra])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert SECRET not in out + err and "S3%2F" not in out + err, out + err
    assert not (tmp_path / "results").exists()
    return err.strip()


@pytest.mark.parametrize("store", ["--optuna-storage", "--tracking-uri"])
def test_each_wrong_setting_is_named_in_one_line(postgres, pg_database, tmp_path, clean_env, capsys, store):
    """Wrong password, missing database, closed port, driver not installed: for either store."""
    other = "--tracking-uri" if store == "--optuna-storage" else "--optuna-storage"
    fine = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"] if other == "--tracking-uri" else []
    label = "--optuna-storage" if store == "--optuna-storage" else "tracking URI"
    cases = {
        postgres.url(pg_database, password="wrong-S3CRET"): f"authentication failed for user '{ROLE}' at 127.0.0.1:",
        postgres.url("no_such_db"): "database 'no_such_db' does not exist on 127.0.0.1:",
        postgres.url(pg_database, port=free_port()): "no database server answers at 127.0.0.1:",
        postgres.url(pg_database).replace(
            "postgresql://", "postgresql+pg8000://"
        ): "its database driver is not installed",
    }
    for url, expected in cases.items():
        err = preflight_error(tmp_path, capsys, store, url, *fine)
        assert err.startswith(f"error: {label} 'postgresql") and expected in err, err
    assert "pip install 'afm-ray[postgres]'" in err


def test_the_two_stores_need_two_databases(postgres, tmp_path, clean_env, capsys):
    """MLflow and Optuna both keep an alembic_version table: one database cannot hold both."""
    one = postgres.url(postgres.create_database())
    err = preflight_error(tmp_path, capsys, "--tracking-uri", one, "--optuna-storage", one)
    assert "name the same database" in err
    check_tracking_uri(one)  # creates MLflow's tables
    with pytest.raises(StorageError, match="this database holds MLflow's tables; MLflow and Optuna each need"):
        check_optuna_storage(one, f"sqlite:///{tmp_path / 'mlflow.db'}")
    other = postgres.url(postgres.create_database())
    optuna_storage(other)  # creates Optuna's tables
    with pytest.raises(TrackingError, match="this database holds Optuna's tables"):
        check_tracking_uri(other)


def test_good_stores_pass_and_the_password_may_come_from_libpq(postgres, tmp_path, clean_env, monkeypatch):
    """A URL with no password at all: libpq takes it from $PGPASSWORD or a password file
    ($PGPASSFILE, ~/.pgpass), so no credential is in any URL, command line, param or pickle."""
    mlflow_db, optuna_db = postgres.create_database(), postgres.create_database()
    check_tracking_uri(postgres.url(mlflow_db))
    check_optuna_storage(postgres.url(optuna_db), postgres.url(mlflow_db))
    no_password = f"postgresql://{ROLE}@{postgres.host}:{postgres.port}/{optuna_db}"
    with pytest.raises(StorageError, match="authentication failed"):
        check_optuna_storage(no_password)
    passfile = tmp_path / "pgpass"
    escaped = ROLE_PASSWORD.replace("\\", "\\\\").replace(":", "\\:")
    passfile.write_text(f"{postgres.host}:{postgres.port}:*:{ROLE}:{escaped}\n")
    passfile.chmod(0o600)  # libpq ignores a password file others can read
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    check_optuna_storage(no_password)
    check_tracking_uri(f"postgresql://{ROLE}@{postgres.host}:{postgres.port}/{mlflow_db}")
    monkeypatch.delenv("PGPASSFILE")
    monkeypatch.setenv("PGPASSWORD", ROLE_PASSWORD)
    optuna.create_study(study_name="via-env", storage=no_password, directions=["maximize", "maximize"])


def test_the_optuna_storage_is_pickled_without_its_password(postgres, pg_database):
    url = postgres.url(pg_database)
    storage = optuna_storage(url)
    study = optuna.create_study(study_name="pickled", storage=storage)
    payload = pickle.dumps(storage)
    assert SECRET.encode() not in payload and b"afm:***@127.0.0.1" in payload
    remember(url)  # the sweep's driver remembers its URLs, also on --resume
    restored = pickle.loads(payload)
    assert restored.url == url
    assert [s.study_name for s in restored.get_all_studies()] == [study.study_name]


FIRST_USE = """
import sys
from afm_ray.databases import schema_lock
with schema_lock(sys.argv[2]):
    if sys.argv[1] == "mlflow":
        from mlflow.tracking import MlflowClient
        MlflowClient(sys.argv[2]).search_experiments(max_results=1)
    else:
        from afm_ray.sweep.driver import optuna_storage
        optuna_storage(sys.argv[2])
"""


@pytest.mark.parametrize("kind", ["mlflow", "optuna"])
def test_processes_create_the_tables_of_a_new_database_one_at_a_time(postgres, kind):
    """Without the lock, two sweeps that start at once on a new database both create the tables and
    one fails on a duplicate (measured: 4 of 8 processes for MLflow, 3 of 8 for Optuna)."""
    for _ in range(2):
        url = postgres.url(postgres.create_database())
        procs = [
            subprocess.Popen([sys.executable, "-c", FIRST_USE, kind, url], stderr=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        failures = [err for proc in procs if (err := proc.communicate(timeout=300)[1]) and proc.returncode]
        assert failures == []
    assert {"mlflow": "experiments", "optuna": "studies"}[kind] in probe_database(url, "x", StorageError)
