"""afm_ray.pareto: the front on hand-computed examples, read from real MLflow (SQLite) runs.

The sweep experiment below is built by hand in the layout the sweep logs: a parent run tagged
afm_ray.role=sweep and child runs tagged afm_ray.role=trial (mlflow.parentRunId = the parent)
with a trial status. Every expected front in this file was worked out by hand in the comments.
The domination math itself is tested in test_front.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from helpers import digits, mlflow_store, trained_student
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from afm_ray.names import Objective
from afm_ray.pareto.__main__ import main
from afm_ray.pareto.ranking import objective_bounds, rank_trials
from afm_ray.pareto.registry import register_front
from afm_ray.pareto.report import axis_label, format_table, plot_front, summary, write_table
from afm_ray.tracking.mlflow_runs import load_trials, translate_filter, trial_filter
from afm_ray.tracking.student_model import fetch_student, log_student

REPO = Path(__file__).resolve().parents[1]
# SQLAlchemy 2 deprecation inside MLflow's own store; nothing this module can act on.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")
NAN = float("nan")

# --------------------------------------------------------------------------- objectives and filters


def test_objectives_parse():
    assert Objective.parse_all(["aa_acc:max", "params:min"]) == (Objective("aa_acc", "max"), Objective("params", "min"))
    for bad in ("aa_acc", "aa_acc:up", ":max"):
        with pytest.raises(ValueError, match="expected NAME:max or NAME:min"):
            Objective.parse_all([bad])
    with pytest.raises(ValueError, match="more than once: aa_acc"):
        Objective.parse_all(["aa_acc:max", "aa_acc:min"])


def test_filters():
    assert translate_filter("params.method = 'rslad'") == "params.`method.name` = 'rslad'"
    for unchanged in (
        "params.`method.name` = 'x'",
        "params.method.name = 'x'",
        "tags.note = 'params.method'",
        "params.method_x = '1'",
    ):
        assert translate_filter(unchanged) == unchanged
    assert trial_filter("params.method = 'ard'", "abc") == (
        "tags.`afm_ray.role` = 'trial' and tags.`mlflow.parentRunId` = 'abc' and params.`method.name` = 'ard'"
    )


# --------------------------------------------------------------------------- MLflow fixtures

T0 = 1_700_000_000_000  # start times (ms) fix the order of exact ties


def _add_trial(
    client, exp_id, parent, name, metrics, *, status="FINISHED", trial_status="completed", method="advfunmatch", step=0
):
    tags = {"mlflow.parentRunId": parent, "afm_ray.role": "trial", "afm_ray.trial_id": name}
    if trial_status is not None:
        tags["afm_ray.trial_status"] = trial_status
    run = client.create_run(exp_id, start_time=T0 + 1000 * step, tags=tags, run_name=name)
    rid = run.info.run_id
    params = {
        "method.name": method,
        "attack.eps": "0.3",
        "attack.steps": "10",
        "method.tau": "1.0",
        "augment.policy": "autoaugment",
        "data.name": "digits",
    }
    client.log_batch(
        rid,
        metrics=[Metric(k, v, T0, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
    )
    client.log_metric(rid, "val/clean_acc", 0.5, step=1)  # a per-epoch curve, never an objective
    if status != "RUNNING":
        client.set_terminated(rid, status)
    return rid


@pytest.fixture(scope="module")
def sweep_db(tmp_path_factory):
    """Experiment 'sweep-a': sweep 1 with 11 trials of every kind, sweep 2 with one trial."""
    store = mlflow_store(tmp_path_factory.mktemp("mlflow"), "sweep-a")
    root, uri, client, exp = store["root"], store["uri"], store["client"], store["exp"]
    client.create_experiment("empty-exp", artifact_location=str(root / "artifacts2"))
    p1 = client.create_run(exp, run_name="sweep-one", tags={"afm_ray.role": "sweep"}).info.run_id
    p2 = client.create_run(exp, run_name="sweep-two", tags={"afm_ray.role": "sweep"}).info.run_id
    M = 1e6
    spec = {  # name: (aa_acc, clean_acc, params, kwargs)
        "t1": (0.45, 0.80, 1.0 * M, {}),
        "t2": (0.50, 0.75, 2.0 * M, {}),
        "t3": (0.40, 0.85, 0.5 * M, {}),
        "t4": (0.45, 0.80, 1.0 * M, {}),  # identical to t1 on every objective
        "t5": (0.42, 0.78, 3.0 * M, {}),  # dominated by t1/t4 in 2-D and 3-D
        "t6": (0.60, 0.90, 1.0 * M, {"status": "FAILED", "trial_status": "failed"}),
        "t7": (0.55, 0.88, 1.0 * M, {"trial_status": "early_stopped"}),
        "t8": (NAN, 0.95, 1.0 * M, {}),  # aa_acc logged as NaN
        "t9": (None, 0.99, 1.0 * M, {}),  # aa_acc never logged
        "t10": (0.70, 0.70, 1.0 * M, {"status": "RUNNING", "trial_status": "running"}),
        "t11": (0.30, 0.70, 0.2 * M, {"method": "rslad"}),  # front only with params:min
    }
    ids = {}
    for step, (name, (aa, clean, params, kw)) in enumerate(spec.items()):
        metrics = {"clean_acc": clean, "params": params, "latency_ms": 1.5}
        if aa is not None:
            metrics["aa_acc"] = aa
        ids[name] = _add_trial(client, exp, p1, name, metrics, step=step, **kw)
    ids["t12"] = _add_trial(
        client,
        exp,
        p2,
        "t12",
        {"aa_acc": 0.9, "clean_acc": 0.9, "params": 5 * M, "latency_ms": 3.0},
        method="ard",
        step=20,
    )
    client.create_run(exp, run_name="stray")  # a run without role: never a trial
    return {"uri": uri, "client": client, "p1": p1, "p2": p2, "ids": ids, "root": root}


def _names(sweep_db, run_ids):
    by_id = {v: k for k, v in sweep_db["ids"].items()}
    return [by_id[r] for r in run_ids]


# --------------------------------------------------------------------------- fronts from MLflow


def test_front_from_mlflow_two_objectives(sweep_db):
    trials = load_trials("sweep-a", tracking_uri=sweep_db["uri"], sweep=sweep_db["p1"])
    assert len(trials) == 11  # sweep 2's trial, the parents and the stray run are not trials
    ranked = rank_trials(trials, ["aa_acc:max", "clean_acc:max"])
    names = _names(sweep_db, ranked["run_id"])
    # eligible: t1 t2 t3 t4 t5 t11. t6 (failed), t7 (early-stopped), t10 (running) would dominate
    # them all but never enter; t8/t9 lack aa_acc. Front: t2 (aa .50), t1 = t4 (.45, .80; tie,
    # by start), t3 (.40, .85). Layer 2: t5 (dominated by t1). Layer 3: t11 (dominated by t5).
    front = [n for n, p in zip(names, ranked["pareto"], strict=True) if p]
    assert front == ["t2", "t1", "t4", "t3"]
    assert ranked["rank"].iloc[:4].tolist() == [1, 2, 3, 4]
    layers = dict(zip(names, ranked["front"], strict=True))
    assert layers["t5"] == 2 and layers["t11"] == 3
    reasons = {n: r for n, r in zip(names, ranked["excluded"], strict=True) if r is not None}
    assert reasons == {
        "t6": "failed",
        "t7": "early-stopped",
        "t8": "missing aa_acc",
        "t9": "missing aa_acc",
        "t10": "running",
    }
    assert names[:6] == ["t2", "t1", "t4", "t3", "t5", "t11"]  # front, layer 2, layer 3, excluded


def test_front_from_mlflow_three_objectives(sweep_db):
    trials = load_trials("sweep-a", tracking_uri=sweep_db["uri"], sweep="sweep-one")  # by run name
    ranked = rank_trials(trials, ["aa_acc:max", "clean_acc:max", "params:min"])
    # t11 has the fewest parameters, so it joins the front; t5 is worse than t1 on all three.
    names = _names(sweep_db, ranked.loc[ranked["pareto"], "run_id"])
    assert names == ["t2", "t1", "t4", "t3", "t11"]
    t5 = ranked[ranked["run_id"] == sweep_db["ids"]["t5"]].iloc[0]
    assert t5["front"] == 2 and pd.isna(t5["rank"])


def test_whole_experiment_filter_and_sweep_prefix(sweep_db):
    uri = sweep_db["uri"]
    ranked = rank_trials(load_trials("sweep-a", tracking_uri=uri), ["aa_acc:max", "clean_acc:max"])
    assert _names(sweep_db, ranked.loc[ranked["pareto"], "run_id"]) == ["t12"]  # sweep 2 wins all
    # the user filter is ANDed with the trial selection; params.method means params.`method.name`
    rslad = load_trials("sweep-a", tracking_uri=uri, filter_string="params.method = 'rslad'")
    assert _names(sweep_db, rslad["run_id"]) == ["t11"]
    in_sweep2 = load_trials(
        "sweep-a", tracking_uri=uri, sweep=sweep_db["p2"][:8], filter_string="params.`method.name` = 'ard'"
    )
    assert _names(sweep_db, in_sweep2["run_id"]) == ["t12"]


def test_table_and_csv(sweep_db, tmp_path):
    trials = load_trials("sweep-a", tracking_uri=sweep_db["uri"], sweep=sweep_db["p1"])
    objectives = ["aa_acc:max", "clean_acc:max"]
    ranked = rank_trials(trials, objectives)
    path = write_table(ranked, objectives, tmp_path / "front.csv")
    table = pacsv.read_csv(path).to_pydict()
    assert len(table["run_id"]) == 11
    on_front = {r for r, p in zip(table["run_id"], table["pareto"], strict=True) if p}
    assert _names(sweep_db, sorted(on_front, key=table["run_id"].index)) == ["t2", "t1", "t4", "t3"]
    assert table["excluded"][table["run_id"].index(sweep_db["ids"]["t6"])] == "failed"
    assert {"attack.eps", "method.name", "params", "latency_ms"} <= set(table)
    text = format_table(ranked, objectives)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["rank", "front", "trial", "method"]
    assert lines[2].split()[:3] == ["1", "1", "t2"]  # the trial id the sweep printed, not the run id
    assert "early-stopped" in text and "missing aa_acc" in text
    with pytest.raises(ValueError, match=r"\.parquet or \.csv"):
        write_table(ranked, objectives, tmp_path / "front.xlsx")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--experiment", "nope"], "experiment 'nope' not found .* experiments there: .*sweep-a"),
        (["--experiment", "empty-exp"], "has no trial runs .* no runs at all"),
        (["--experiment", "sweep-a", "--objectives", "foo:max"], "unknown objective 'foo'.*aa_acc, clean_acc"),
        (["--experiment", "sweep-a", "--objectives", "cw_acc:max"], "'cw_acc' was logged by none .*latency_ms"),
        (["--experiment", "sweep-a", "--objectives", "aa_acc"], "expected NAME:max or NAME:min"),
        (["--experiment", "sweep-a", "--sweep", "zzz"], "sweep 'zzz' not found .*sweep-one"),
        (
            ["--experiment", "sweep-a", "--filter", "params.method = 'nope'"],
            "no trial run .* matches --filter .*method.name values: advfunmatch, ard, rslad",
        ),
        (["--experiment", "sweep-a", "--filter", "params.x ~ 3"], "invalid --filter"),
        (["--experiment", "sweep-a", "--out", "t.xlsx"], r"\.parquet or \.csv"),
    ],
)
def test_cli_errors_are_one_clear_line(sweep_db, capsys, args, expected):
    assert main([*args, "--tracking-uri", sweep_db["uri"]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: ")
    assert re.search(expected, err), err


def test_missing_database_is_not_created(tmp_path, capsys):
    db = tmp_path / "typo.db"
    assert main(["--experiment", "x", "--tracking-uri", f"sqlite:///{db}"]) == 2
    assert "no MLflow database at" in capsys.readouterr().err
    assert not db.exists()


# --------------------------------------------------------------------------- CLI


def _run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "afm_ray.pareto", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_table_plot_and_parquet(sweep_db, tmp_path):
    png, out = tmp_path / "front.png", tmp_path / "front.parquet"
    proc = _run_cli(
        "--experiment",
        "sweep-a",
        "--tracking-uri",
        sweep_db["uri"],
        "--sweep",
        sweep_db["p1"][:8],
        "--objectives",
        "aa_acc:max",
        "clean_acc:max",
        "params:min",
        "--plot",
        str(png),
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [
        "rank",
        "front",
        "trial",
        "method",
        "attack.eps",
        "attack.steps",
        "method.tau",
        "augment.policy",
        "aa_acc",
        "%",
        "[95%",
        "CI]",
        "clean_acc",
        "%",
        "[95%",
        "CI]",
        "params",
        "noise",
        "excluded",
    ]
    ids = sweep_db["ids"]
    # t1 and t4 are identical: front members that no interval could tell apart
    assert "~3" in lines[3] and "~2" in lines[4]
    assert [ln.split()[2] for ln in lines[2:7]] == ["t2", "t1", "t4", "t3", "t11"]
    # the legend's example is the table's own tie: rank 2 (t1) and rank 3 (t4)
    assert "'~3' at rank 2: it cannot be told apart from rank 3" in proc.stdout
    assert "5 Pareto-optimal of 6 eligible trials" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    table = pq.read_table(out)
    assert table.schema.metadata[b"afm_ray.objectives"] == b"aa_acc:max,clean_acc:max,params:min"
    rows = table.to_pylist()
    assert {r["run_id"] for r in rows if r["pareto"]} == {ids[n] for n in ("t1", "t2", "t3", "t4", "t11")}
    assert {r["run_id"]: r["rank"] for r in rows if r["pareto"]}[ids["t11"]] == 5
    assert not (tmp_path / "mlflow.db").exists()  # reading never creates a default database


def test_trial_resolves_by_the_id_the_sweep_printed(sweep_db, capsys):
    """`--trial` takes the trial id the sweep printed (its MLflow run name too), or the run id / a prefix."""
    ids, args = sweep_db["ids"], ["--experiment", "sweep-a", "--tracking-uri", sweep_db["uri"], "--sweep", "sweep-one"]
    for ref in ("t3", ids["t3"], ids["t3"][:8]):
        assert main([*args, "--trial", ref]) == 0
        out = capsys.readouterr().out
        assert f"trial t3 (run {ids['t3']}): on the Pareto front, rank 4" in out
    assert main([*args, "--trial", "t6"]) == 0
    assert "trial t6 (run " in (out := capsys.readouterr().out) and "excluded from the front: failed" in out
    assert main([*args, "--trial", "917f2149"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --trial '917f2149' names no trial here; the trials: t2, t1")
        and len(err.splitlines()) == 1
    )


def test_cli_error_exit_status(tmp_path):
    proc = _run_cli("--experiment", "x", cwd=tmp_path)  # default URI: <cwd>/mlflow.db
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: no MLflow database at {tmp_path / 'mlflow.db'} (tracking URI "
        f"sqlite:///{tmp_path / 'mlflow.db'}); pass --tracking-uri or set MLFLOW_TRACKING_URI"
    )


def test_plot_two_objectives(sweep_db, tmp_path):
    trials = load_trials("sweep-a", tracking_uri=sweep_db["uri"], sweep=sweep_db["p1"])
    ranked = rank_trials(trials, ["aa_acc:max", "clean_acc:max"])
    path = plot_front(ranked, ["aa_acc:max", "clean_acc:max"], tmp_path / "sub" / "two.png")
    assert path.stat().st_size > 20_000
    assert axis_label(Objective("params", "min")) == "student parameters (millions, lower is better)"


# --------------------------------------------------------------------------- registry


def verify_registered(
    name: str,
    alias: str = "pareto-1",
    *,
    tracking_uri: str | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """(logged clean_acc, re-measured clean accuracy) of ``models:/name@alias`` on ``data`` = (x in [0,1], y),
    by default the test split that its run's params describe. The student loads from safetensors
    through this URI's client only (the process-wide MLflow URIs belong to the caller)."""
    import math

    from afm_ray.tracking.mlflow_runs import client_for

    client = client_for(tracking_uri)
    model, spec = fetch_student(client, f"models:/{name}@{alias}")
    run = client.get_run(spec["run_id"])
    if data is None:  # the run's params are its whole resolved config
        from afm_ray.config import from_flat
        from afm_ray.data import load_dataset

        d = from_flat(run.data.params, ignore_unknown=True).data
        ds = load_dataset(
            d.name, d.root or None, test_fraction=d.test_fraction, seed=d.seed, image_size=d.image_size or None
        )
        data = (ds.x_test.float() / 255, ds.y_test)
    x, y = data
    with torch.no_grad():
        batches = ((x[i : i + 512], y[i : i + 512]) for i in range(0, len(x), 512))
        correct = sum(int((model(xb).argmax(dim=1).cpu() == yb.cpu()).sum()) for xb, yb in batches)
    return run.data.metrics.get("clean_acc", math.nan), correct / len(x)


@pytest.fixture
def global_uri(sweep_db, monkeypatch, tmp_path):
    """The module's SQLite store (its tables already made), as the global MLflow URI too:
    mlflow.start_run and log_model in the test need it."""
    import mlflow

    uri = sweep_db["uri"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def _digits():
    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def test_register_front_and_load_by_alias(global_uri, tmp_path, capsys):
    import mlflow
    import torch

    x_train, y_train, x_test, y_test = _digits()
    client = MlflowClient(global_uri, global_uri)
    exp = client.create_experiment("digits-sweep", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"afm_ray.role": "sweep"}).info.run_id
    logged = {}
    # "good" is more accurate, "robust" has the better (made-up) aa_acc: both are on the front,
    # and the rank follows aa_acc: robust is pareto-1, good is pareto-2.
    for step, (name, steps, aa) in enumerate([("good", 40, 0.20), ("robust", 12, 0.30)]):
        model = trained_student(steps=steps, x=x_train, y=y_train)
        with torch.no_grad():
            clean = int((model(x_test).argmax(1) == y_test).sum()) / len(y_test)
        rid = _add_trial(client, exp, parent, name, {"clean_acc": clean, "aa_acc": aa}, step=step, status="RUNNING")
        log_student(client, rid, model, input_shape=(1, 8, 8))
        client.set_terminated(rid)
        logged[name] = (rid, clean)
    assert logged["good"][1] > logged["robust"][1] > 0.3  # a real trade-off

    assert main(["--experiment", "digits-sweep", "--register", "afm-students"]) == 0  # URI from env
    out = capsys.readouterr().out
    assert "registered models:/afm-students@pareto-1 -> version 1 (trial robust, run " + logged["robust"][0] in out
    assert "registered models:/afm-students@pareto-2 -> version 2 (trial good, run " + logged["good"][0] in out
    versions = [client.get_model_version("afm-students", v) for v in ("1", "2")]

    for alias, name in (("pareto-1", "robust"), ("pareto-2", "good")):
        mv = client.get_model_version_by_alias("afm-students", alias)
        assert mv.run_id == logged[name][0]
        assert float(mv.tags["clean_acc"]) == logged[name][1]
        assert mv.tags["afm_ray.pareto_rank"] == alias[-1]
        assert mv.tags["afm_ray.trial_id"] == name  # one name per trial: the registry carries the sweep's
        model, spec = fetch_student(client, f"models:/afm-students@{alias}")  # safetensors, sha256 checked
        assert mv.tags["afm_ray.student_sha256"] == client.get_run(spec["run_id"]).data.tags["afm_ray.student_sha256"]
        with torch.no_grad():
            again = int((model(x_test).argmax(1) == y_test).sum()) / len(y_test)
        assert again == logged[name][1]
        # MLflow's own loader works too (the MLmodel names afm_ray.tracking.student_model as its loader)
        logits = mlflow.pyfunc.load_model(f"models:/afm-students@{alias}").predict(x_test.numpy())
        assert int((torch.as_tensor(logits).argmax(1) == y_test).sum()) / len(y_test) == logged[name][1]
    assert verify_registered("afm-students", "pareto-2", data=(x_test, y_test)) == (
        logged["good"][1],
        logged["good"][1],
    )

    # again with one objective: the front is "good" alone; its version is reused, the stale
    # pareto-2 alias goes, and nothing new is registered
    ranked = rank_trials(load_trials("digits-sweep"), ["clean_acc:max"])
    again = register_front(ranked, ["clean_acc:max"], "afm-students")
    assert [v.version for v in again] == [versions[1].version]
    aliases = client.get_registered_model("afm-students").aliases
    assert aliases == {"pareto-1": versions[1].version}
    assert len(client.search_model_versions("name = 'afm-students'")) == 2
    robust = client.get_model_version("afm-students", versions[0].version)
    assert "afm_ray.pareto_rank" not in robust.tags  # no longer on the front
    assert mlflow.get_tracking_uri() == global_uri  # the caller's global URI is restored


def test_registry_uses_only_the_given_uri(global_uri, tmp_path, monkeypatch):
    """register_front and verify_registered work from their tracking_uri alone: the process-wide
    MLflow URIs (here another database) are neither used nor changed."""
    import mlflow
    import torch

    x_train, y_train, x_test, y_test = _digits()
    client = MlflowClient(global_uri, global_uri)
    exp = client.create_experiment("uri-sweep", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"afm_ray.role": "sweep"}).info.run_id
    model = trained_student(steps=10, x=x_train, y=y_train)
    with torch.no_grad():
        clean = int((model(x_test).argmax(1) == y_test).sum()) / len(y_test)
    rid = _add_trial(client, exp, parent, "only", {"clean_acc": clean, "aa_acc": 0.1}, status="RUNNING")
    log_student(client, rid, model, input_shape=(1, 8, 8))
    client.set_terminated(rid)

    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(elsewhere)
    ranked = rank_trials(load_trials("uri-sweep", tracking_uri=global_uri), ["clean_acc:max"])
    [mv] = register_front(ranked, ["clean_acc:max"], "uri-students", tracking_uri=global_uri)
    assert mv.run_id == rid
    assert verify_registered("uri-students", tracking_uri=global_uri, data=(x_test, y_test)) == (clean, clean)
    assert mlflow.get_tracking_uri() == elsewhere and os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert not (tmp_path / "elsewhere.db").exists()  # nothing reached for the global URI


def test_register_needs_a_student(sweep_db, capsys):
    # afm_ray.tracking keeps a trial whose student failed to log, with the reason as a tag
    sweep_db["client"].set_tag(sweep_db["ids"]["t2"], "afm_ray.model_error", "MlflowException: boom")
    code = main(
        [
            "--experiment",
            "sweep-a",
            "--tracking-uri",
            sweep_db["uri"],
            "--sweep",
            "sweep-one",
            "--register",
            "nothing-logged",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"run {sweep_db['ids']['t2']} has no logged model named 'student'" in err
    assert "afm_ray.model_error: MlflowException: boom" in err
    with pytest.raises(Exception, match="nothing-logged"):  # nothing was half-registered
        sweep_db["client"].get_registered_model("nothing-logged")


# --------------------------------------------------------------------------- intervals and noise


@pytest.fixture(scope="module")
def noisy_db(tmp_path_factory):
    """Trials measured on 200 images (Wilson 95% half-width about 7 points at 50%), one on 2000."""
    store = mlflow_store(tmp_path_factory.mktemp("noisy"), "noisy")
    uri, client, exp = store["uri"], store["client"], store["exp"]
    parent = client.create_run(exp, run_name="sw", tags={"afm_ray.role": "sweep"}).info.run_id
    client.log_param(parent, "sweep.objectives", "clean_acc:max,aa_acc:max")
    spec = {  # name: (aa_acc, clean_acc, n_samples)
        "a": (0.50, 0.80, 200),  # front
        "b": (0.48, 0.79, 200),  # dominated by a, but its intervals overlap a's: within noise
        "c": (0.30, 0.60, 2000),  # dominated by a far beyond both intervals
        "d": (0.45, 0.86, 200),  # front; its aa/clean intervals overlap a's on both objectives
    }
    ids = {}
    for step, (name, (aa, clean, n)) in enumerate(spec.items()):
        metrics = {"aa_acc": aa, "clean_acc": clean, "eval/n_samples": n, "params": 1000.0}
        if name == "a":  # logged intervals win over the ones computed from eval/n_samples
            metrics |= {"aa_acc_ci_low": 0.43, "aa_acc_ci_high": 0.57}
        ids[name] = _add_trial(client, exp, parent, name, metrics, step=step)
    return {"uri": uri, "ids": ids, "client": client, "exp": exp}


def test_intervals_and_within_noise(noisy_db, tmp_path):
    from afm_ray.stats import wilson_interval

    objectives = ["aa_acc:max", "clean_acc:max"]
    ranked = rank_trials(load_trials("noisy", tracking_uri=noisy_db["uri"]), objectives)
    by = {name: ranked[ranked["run_id"] == rid].iloc[0] for name, rid in noisy_db["ids"].items()}
    assert by["a"]["pareto"] and by["d"]["pareto"] and by["b"]["front"] == 2
    # b: a dominates it (0.50 > 0.48, 0.80 > 0.79), but a's worst ends (0.43; 0.80 - 5.6 points) are below
    # b's best ends, so no front member dominates it beyond noise. c: a's worst ends (0.43, 0.74) beat c's
    # best (0.30 + 2.0 points, 0.60 + 2.1 points on 2000 images).
    assert by["b"]["within_noise"] and not by["c"]["within_noise"] and not by["a"]["within_noise"]
    # a and d: aa 0.43-0.57 vs 0.38-0.52, clean 0.74-0.85 vs 0.80-0.90: indistinguishable on both
    assert by["a"]["ties"] == str(by["d"]["rank"]) and by["d"]["ties"] == str(by["a"]["rank"])
    low, high = objective_bounds(ranked, Objective.parse_all(objectives))
    row = ranked.index[ranked["run_id"] == noisy_db["ids"]["c"]][0]
    assert (low[row, 0], high[row, 0]) == wilson_interval(0.30, 2000)  # computed from eval/n_samples
    row = ranked.index[ranked["run_id"] == noisy_db["ids"]["a"]][0]
    assert (low[row, 0], high[row, 0]) == (0.43, 0.57)  # as logged
    table = format_table(ranked, objectives)
    assert "50.00 [43.0, 57.0]" in table and "within noise" in table
    assert "1 dominated trial(s) 'within noise'" in summary(ranked, objectives)
    # the plot: error bars, and the within-noise trial in its own legend entry
    plot_front(ranked, objectives, tmp_path / "noisy.png")
    assert (tmp_path / "noisy.png").stat().st_size > 20_000


def test_pareto_follows_the_sweeps_objectives(noisy_db, tmp_path, capsys):
    out = tmp_path / "t.parquet"
    assert main(["--experiment", "noisy", "--tracking-uri", noisy_db["uri"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # recorded "clean_acc:max,aa_acc:max"; robustness first orders the ranks, the front is the same
    assert printed.splitlines()[0] == "objectives: aa_acc:max clean_acc:max"
    table = pq.read_table(out)
    assert table.schema.metadata[b"afm_ray.objectives"] == b"aa_acc:max,clean_acc:max"
    rows = {r["run_id"]: r for r in table.to_pylist()}
    assert rows[noisy_db["ids"]["b"]]["within_noise"] and rows[noisy_db["ids"]["a"]]["aa_acc_ci_low"] == 0.43
    # a sweep that optimised something else: the trials of both disagree, and that is an error
    client = noisy_db["client"]
    other = client.create_run(noisy_db["exp"], run_name="sw2", tags={"afm_ray.role": "sweep"}).info.run_id
    client.log_param(other, "sweep.objectives", "clean_acc:max,params:min")
    _add_trial(client, noisy_db["exp"], other, "e", {"aa_acc": 0.1, "clean_acc": 0.5, "params": 10.0}, step=9)
    assert main(["--experiment", "noisy", "--tracking-uri", noisy_db["uri"]]) == 2
    assert "different objectives" in capsys.readouterr().err
    assert main(["--experiment", "noisy", "--tracking-uri", noisy_db["uri"], "--sweep", "sw2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "objectives: clean_acc:max params:min"
