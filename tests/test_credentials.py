"""Credentials are never printed (afm_ray.credentials): a catalogue of credential-bearing URIs and
texts, each redacted so the secret appears nowhere; the error paths of the commands, whose every
output line is checked for the secret; and the URI read from a file or the environment. No Ray."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from ray_head import free_port

from afm_ray.credentials import RedactingStream, redact_text, redact_uri, remember, uri_from
from afm_ray.errors import ConfigError
from afm_ray.pareto.__main__ import main as pareto_main
from afm_ray.sweep.__main__ import main as sweep_main

SECRET = "S3CRET"  # every credential below contains it; no output may

# (uri, the redacted form): SQLAlchemy reads everything between the first ':' and the '@' as the
# password, raw '/', '#', '?' and ':' included; urllib's split stops at the first '/', '#' or '?'.
CATALOGUE = [
    ("postgresql://afm:S3CRET@db:5432/mlflow", "postgresql://afm:***@db:5432/mlflow"),
    ("postgresql://afm:S3%2FCR%23ET@db:5432/mlflow", "postgresql://afm:***@db:5432/mlflow"),
    ("postgresql://afm:S3/CRET@db:5432/mlflow", "postgresql://afm:***@db:5432/mlflow"),
    ("postgresql://afm:S3#CRET@db/mlflow", "postgresql://afm:***@db/mlflow"),
    ("postgresql://afm:S3?CRET@db/mlflow", "postgresql://afm:***@db/mlflow"),
    ("postgresql://afm:S3CRET/?#:x@db/mlflow?sslmode=require", "postgresql://afm:***@db/mlflow?sslmode=require"),
    ("postgresql://afm:pa@S3CRET@db/mlflow", "postgresql://afm:***@db/mlflow"),  # a raw '@' too
    ("postgresql+psycopg://afm:S3CRET@[::1]:5432/optuna", "postgresql+psycopg://afm:***@[::1]:5432/optuna"),
    ("postgresql://afm:S3CRET@[::1/optuna", "postgresql://afm:***@[::1/optuna"),  # malformed IPv6: urllib raises
    ("postgresql://afm:S3CRET@[::1]]:x/optuna", "postgresql://afm:***@[::1]]:x/optuna"),
    ("mysql+pymysql://root:S3CRET@db:3306/optuna", "mysql+pymysql://root:***@db:3306/optuna"),
    ("postgresql:///optuna?host=/run/postgresql&password=S3CRET", "postgresql:///optuna?host=/run/postgresql&password=***"),
    ("postgresql://afm@db/optuna?sslpassword=S3CRET&sslmode=verify-full", "postgresql://***@db/optuna?sslpassword=***&sslmode=verify-full"),
    ("https://S3CRET@mlflow.example.com", "https://***@mlflow.example.com"),
    ("https://user:S3CRET@mlflow.example.com:443/api", "https://user:***@mlflow.example.com:443/api"),
    ("https://mlflow.example.com/#access_token=S3CRET", "https://mlflow.example.com/#***"),
    ("s3://bucket/x?X-Amz-Signature=S3CRET&X-Amz-Credential=AKIA%2FS3CRET&X-Amz-Date=1", "s3://bucket/x?X-Amz-Signature=***&X-Amz-Credential=***&X-Amz-Date=1"),
    ("s3://b/p?access_key=AKIA&secret_key=S3CRET;session_token=S3CRET", "s3://b/p?access_key=***&secret_key=***;session_token=***"),
    ("gs://b/t.pt?X-Goog-Signature=S3CRET", "gs://b/t.pt?X-Goog-Signature=***"),
    ("https://acct.blob.core.windows.net/c/x?sv=2024&sig=S3CRET", "https://acct.blob.core.windows.net/c/x?sv=2024&sig=***"),
    ("https://h/x?api%5Fkey=S3CRET&apikey=S3CRET&pwd=S3CRET", "https://h/x?api%5Fkey=***&apikey=***&pwd=***"),
    ("file://user:S3CRET@/abs/path", "file://user:***@/abs/path"),
    # libpq keyword strings
    ("host=db port=5432 dbname=optuna password=S3CRET", "host=db port=5432 dbname=optuna password=***"),
    ("host=db password='S3 CRET x' user=afm", "host=db password=*** user=afm"),
    ("host=db sslpassword = S3CRET", "host=db sslpassword = ***"),
]  # fmt: skip


@pytest.mark.parametrize("uri, shown", CATALOGUE, ids=[shown for _, shown in CATALOGUE])
def test_every_catalogued_credential_is_redacted(uri, shown):
    assert redact_uri(uri) == shown
    assert redact_uri(shown) == shown  # redacting twice changes nothing
    assert SECRET not in redact_text(f"error: --optuna-storage '{uri}': no database answers")
    assert SECRET not in redact_text(f'connect("{uri}") failed; {{"url": "{uri}"}}')


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://afm:S3 CRET@db/x",  # a space in the password
        "can't reach postgresql://afm:S3'CRET x@db:5432/x (refused)",
        "{'password': 'S3CRET', 'host': 'db'}",
        '{"token": "S3CRET"}',
        "retrying https://u:S3CRET@h/x, then sqlite:////a.db.",
        "Set PGPASSWORD=S3CRET or AFM_TOKEN=S3CRET",
        "auth_file=postgresql://afm:S3CRET@db/x",  # a setting that names a kind keeps its value, redacted
    ],
)
def test_secrets_in_running_text_are_redacted(text):
    assert SECRET not in redact_text(text)
    assert SECRET not in redact_uri(text)


@pytest.mark.parametrize(
    "text",
    [
        "s3://bucket/afm-ray",
        "sqlite:////abs/mlflow.db",
        "http://127.0.0.1:5000",
        "see http://host:5000/x and mail a@b.com",
        "(http://[::1]:5000) answered",
        "Set RAY_AUTH_MODE=disabled to opt out",
        "--set 'attack.eps': expected key=value e.g. attack.eps=0.1",
        "registered models:/afm-students@pareto-1 -> version 1",
        "clean: accuracy on the test subset; pgd20: PGD-20 on cross-entropy, step eps/4",
    ],
)
def test_text_without_credentials_is_unchanged(text):
    assert redact_text(text) == text and redact_uri(text) == text


def test_the_stream_backstop_redacts_each_write():
    out = io.StringIO()
    stream = RedactingStream(out)
    print("tracking postgresql://afm:S3CRET@db/x answers", file=stream)
    assert out.getvalue() == "tracking postgresql://afm:***@db/x answers\n" and stream.getvalue() == out.getvalue()


def test_the_mlflow_callback_is_pickled_without_the_password():
    """Tune pickles its callbacks into the sweep's folder (tuner.pkl); unpickled in the process that
    remembered the URI (the sweep's driver, on --resume), the callback has it whole again."""
    from ray import cloudpickle

    from afm_ray.tracking.trial_tracker import TrialTracker

    uri = "postgresql://afm:S3/CRET@db:5432/mlflow-pickled"
    payload = cloudpickle.dumps(TrialTracker(uri, experiment_name="e", parent_run_id="p", sweep_name="s"))
    assert SECRET.encode() not in payload and b"afm:***@db:5432/mlflow-pickled" in payload
    assert cloudpickle.loads(payload).tracking_uri == "postgresql://afm:***@db:5432/mlflow-pickled"
    remember(uri)
    assert cloudpickle.loads(payload).tracking_uri == uri


# ------------------------------------------------------------------------------ where a URI comes from


def test_uri_from_the_flag_a_file_or_the_environment(tmp_path):
    file = tmp_path / "optuna-url"
    file.write_text("# the study's database\n\npostgresql://afm:S3CRET@db/optuna\n")
    env = {"AFM_RAY_OPTUNA_STORAGE": "postgresql://afm:S3CRET@db/from-env"}
    assert uri_from("--optuna-storage", "sqlite:////x.db", None, env, "AFM_RAY_OPTUNA_STORAGE") == "sqlite:////x.db"
    assert uri_from("--optuna-storage", None, str(file), env, "AFM_RAY_OPTUNA_STORAGE").endswith("@db/optuna")
    assert uri_from("--optuna-storage", None, None, env, "AFM_RAY_OPTUNA_STORAGE").endswith("/from-env")
    assert uri_from("--optuna-storage", None, None, {}, "AFM_RAY_OPTUNA_STORAGE") is None
    with pytest.raises(ConfigError, match="^--optuna-storage and --optuna-storage-file: give one of them"):
        uri_from("--optuna-storage", "sqlite:////x.db", str(file), {}, "X")
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match="--tracking-uri-file .*empty: is empty"):
        uri_from("--tracking-uri", None, str(tmp_path / "empty"), {}, "X")
    with pytest.raises(ConfigError, match="--tracking-uri-file .*missing: cannot be read"):
        uri_from("--tracking-uri", None, str(tmp_path / "missing"), {}, "X")


# ------------------------------------------------------------------------------ the commands' error paths


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AFM_RAY_OPTUNA_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AFM_RAY_PROBE_TIMEOUT_S", "3")


def sweep_args(tmp_path, *extra):
    return ["--set", "data.name=digits", "--storage", str(tmp_path / "results"), *extra]


def error_paths(tmp_path):
    closed = free_port()  # nothing listens there
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {
        "optuna: closed port": ["--optuna-storage", f"postgresql://afm:S3/CR#ET@127.0.0.1:{closed}/optuna"],
        "optuna: not a URL": ["--optuna-storage", "postgresql//afm:S3CRET@db/optuna"],
        "optuna: driver missing": ["--optuna-storage", f"postgresql+pg8000://afm:S3CRET@127.0.0.1:{closed}/optuna"],
        "optuna: unknown dialect": ["--optuna-storage", "nosuchdb://afm:S3CRET@db/optuna"],
        "optuna: same database as MLflow": [
            "--optuna-storage", f"postgresql://afm:S3CRET@127.0.0.1:{closed}/one",
            "--tracking-uri", f"postgresql://afm:S3CRET@127.0.0.1:{closed}/one",
        ],
        "optuna: file and flag": ["--optuna-storage", "postgresql://afm:S3CRET@db/x", "--optuna-storage-file", "f"],
        "tracking: server down": ["--tracking-uri", f"http://afm:S3CRET@127.0.0.1:{closed}"],
        "tracking: token in query": ["--tracking-uri", f"http://127.0.0.1:{closed}/?token=S3CRET"],
        "tracking: postgres down": ["--tracking-uri", f"postgresql://afm:S3?CRET@127.0.0.1:{closed}/mlflow"],
        "tracking: file store": ["--tracking-uri", "file://afm:S3CRET@/x/mlruns"],
        "storage: not writable": ["--storage", f"file://user:S3CRET@{blocker}/x"],
        "teacher: signed URL missing": ["--set", f"teacher.checkpoint=file://{tmp_path}/t.pt?X-Amz-Signature=S3CRET"],
    }  # fmt: skip


def test_no_error_path_of_the_sweep_prints_a_credential(tmp_path, clean_env, capsys):
    """Each bad, credential-bearing option: exit 2, one `error:` line, the secret nowhere in the output."""
    for case, extra in error_paths(tmp_path).items():
        code = sweep_main(sweep_args(tmp_path, *extra))
        out, err = capsys.readouterr()
        assert code == 2, (case, out, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (case, err)
        assert SECRET not in out + err and "S3%2F" not in out + err, (case, out + err)


def test_pareto_on_an_unreachable_database_is_one_line_without_the_password(tmp_path, clean_env, capsys):
    uri = f"postgresql://afm:S3/CR#ET@127.0.0.1:{free_port()}/mlflow"
    assert pareto_main(["--experiment", "x", "--tracking-uri", uri]) == 2
    out, err = capsys.readouterr()
    assert "no database server answers at 127.0.0.1:" in err and SECRET not in out + err
    assert "postgresql://afm:***@127.0.0.1:" in err


def test_a_traceback_is_redacted_too(tmp_path):
    """--debug shows the traceback of an error: the interpreter prints it after the command returned,
    through the redacting hook the command installed."""
    closed = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "afm_ray.sweep", "--debug", "--optuna-storage", f"postgresql://a:S3CRET@127.0.0.1:{closed}/x"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "StorageError" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
