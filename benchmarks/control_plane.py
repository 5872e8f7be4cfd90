"""Control-plane scale: how a sweep's bookkeeping grows with the number of trials, on SQLite and PostgreSQL.

    python benchmarks/control_plane.py [--backends sqlite,postgresql[,memory]] [--parts optuna,mlflow,pareto,resume]
        [--optuna-trials 100,1000,3000] [--optuna-budget-s S] [--mlflow-sizes 0,1000,3000]
        [--pareto-sizes 1000,10000] [--api-runs 1000] [--resume-trials 1000] [--postgres URL]
        [--recorded DIR] [--json OUT]

The figures and how they were taken on a 2-core machine: docs/control_plane_cpu.md.

Each part runs on a new SQLite file and a new PostgreSQL database. PostgreSQL is the server at
--postgres (a URL whose user may create databases), else one this script starts for itself, as the
tests do (tests/postgres.py: Debian's server binaries, a temporary folder, a free port), with
fsync off (a local test server; a managed database syncs every commit).

Parts (what the sweep itself does, with afm_ray's own code, unless said):

- optuna: Optuna's ask (with the default space's define-by-run suggestions) and tell, for the
  default sampler as afm_ray builds it (multivariate, grouped TPE with the constant liar, 10
  start-up trials, two objectives), one trial after another up to the largest size; the latency
  of the ten asks and tells before each size (backend `memory`: Optuna's in-memory storage, the
  sampler's own cost with no database; for this part only). The told values are synthetic (a smooth function of
  the suggested parameters plus noise): the sampler's cost does not depend on them.
- mlflow: what afm_ray's MLflow callback (`TrialTracker`) writes per trial: the run with its tags
  and the full resolved config as params, the per-epoch curves (5 epochs, the default space's),
  the final metrics, and the student as an MLflow model (safetensors + spec), on an experiment
  already holding each of --mlflow-sizes trial runs. The callback is driven directly with recorded
  results (a stand-in for Ray Tune's trial object); the results and the student come from one real
  training run of the default space's student (1 epoch on sklearn's digits; kept in --recorded).
  The runs that fill the experiment are written in one batch each (params, final metrics and a
  5-point curve; no model), the first --api-runs through MLflow's API and the rest copied in SQL
  from those (new ids and objective values): pareto reads exactly these.
- pareto: `python -m afm_ray.pareto --experiment E` (a subprocess, wall time) over --pareto-sizes
  trial runs, and the import-only baseline of the same command (`--help`).
- resume: a sweep of --resume-trials trials whose trial function reports its final result at once
  (no training), through Ray Tune with afm_ray's searcher (`CompletedOnlyOptunaSearch` on the
  default sampler) and MLflow callback (`TrialTracker`, no model), 4 trials at a time; then, in a
  fresh process, what `--resume` does: start Ray, find the parent run, `Tuner.restore` and `fit`
  (nothing is left to run). Approximated: the trial function (afm_ray's starts a Ray Train run),
  the model logging, and Ray's cluster (a local one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "control-plane"
EPOCHS = 5  # the default space's optim.epochs
FILLER_TAG = "bench.filler"  # the runs `fill` wrote: what `clone_runs` copies


def log(line: str) -> None:
    print(line, flush=True)


def window(latencies: list[float], size: int, width: int = 10) -> float:
    """Median latency (ms) of the `width` operations before the `size`-th."""
    return 1000 * statistics.median(latencies[max(0, size - width) : size])


class Cpu:
    """CPU seconds used so far: `client()` by this process (and the children it has waited for),
    `server()` by the PostgreSQL server this script started (its postmaster, the backends it has
    reaped, those alive; read from /proc), 0 without one. CPU time, unlike wall time, does not count
    the waits for a core on a shared machine; the sum of both is what the bookkeeping costs."""

    def __init__(self, postmaster: int | None = None):
        self.postmaster, self.tick = postmaster, os.sysconf("SC_CLK_TCK")

    def client(self) -> float:
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    def server(self) -> float:
        if self.postmaster is None:
            return 0.0
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(entry.name) == self.postmaster or int(fields[1]) == self.postmaster:
                total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        return total / self.tick

    def both(self) -> tuple[float, float]:
        return self.client(), self.server()


# ------------------------------------------------------------------------------ stores


class Stores:
    """New, empty databases: an SQLite file in a temporary folder, or a PostgreSQL database."""

    def __init__(self, postgres: str | None, workdir: Path):
        self.workdir, self.server, self.postgres = workdir, None, postgres

    def start(self) -> None:
        if self.postgres is None:
            sys.path.insert(0, str(REPO / "tests"))
            from postgres import start_postgres  # the tests' own server

            self.server = start_postgres()

    def cpu(self, backend: str) -> Cpu:
        if backend != "postgresql" or self.server is None:
            return Cpu()
        return Cpu(int((self.server.datadir / "postmaster.pid").read_text().split()[0]))

    def stop(self) -> None:
        if self.server is not None:
            from postgres import stop_postgres

            stop_postgres(self.server)

    def new(self, backend: str, label: str) -> str:
        name = f"{label}_{uuid.uuid4().hex[:6]}"
        if backend == "memory":  # Optuna's in-memory storage: the sampler's own cost, no database
            return ""
        if backend == "sqlite":
            return f"sqlite:///{self.workdir / (name + '.db')}"
        if self.server is not None:
            return self.server.url(self.server.create_database(name))
        from sqlalchemy import create_engine, text

        engine = create_engine(self.postgres, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        from sqlalchemy.engine import make_url

        return make_url(self.postgres).set(database=name).render_as_string(hide_password=False)


# ------------------------------------------------------------------------------ optuna


def default_space(num_samples: int) -> Any:
    from afm_ray.search.space import load_search_space
    from afm_ray.search.specs import default_startup_trials

    space = load_search_space()
    sampler = dataclasses.replace(space.sampler, n_startup_trials=default_startup_trials(num_samples))
    return dataclasses.replace(space, num_samples=num_samples, sampler=sampler)


def synthetic_values(params: dict[str, Any], rng: Any) -> list[float]:
    eps, lr = float(params.get("attack.eps", 0.1)), float(params.get("optim.lr", 0.1))
    clean = 0.95 - 1.5 * eps - 0.1 * abs(math.log(lr / 0.08)) + rng.normal(0, 0.01)
    robust = 0.2 + 4.0 * eps - 20 * eps**2 - 0.1 * abs(math.log(lr / 0.08)) + rng.normal(0, 0.01)
    return [clean, robust]


def bench_optuna(url: str, sizes: list[int], cpu: Cpu, budget_s: float = math.inf) -> dict[str, Any]:
    """Sizes up to the largest, or up to the first size reached after `budget_s` seconds."""
    import numpy as np
    import optuna

    from afm_ray.search.samplers import build_sampler
    from afm_ray.sweep.driver import optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = default_space(max(sizes))
    study = optuna.create_study(
        study_name="bench",
        storage=optuna_storage(url) if url else None,
        sampler=build_sampler(space.sampler, space.seed),
        directions=[o.mode + "imize" for o in space.objectives],
    )
    define = space.define_by_run()
    rng = np.random.default_rng(0)
    wall: dict[str, list[float]] = {"ask": [], "tell": []}
    used: dict[str, list[float]] = {"ask": [], "tell": []}
    started, out, marks = time.perf_counter(), {}, {}
    for n in range(1, max(sizes) + 1):
        if any(n == size - min(50, size // 2) for size in sizes):
            marks[n] = cpu.both()
        c0, t0 = time.process_time(), time.perf_counter()
        trial = study.ask()
        define(trial)
        c1, t1 = time.process_time(), time.perf_counter()
        study.tell(trial, synthetic_values(trial.params, rng))
        c2, t2 = time.process_time(), time.perf_counter()
        wall["ask"].append(t1 - t0)
        wall["tell"].append(t2 - t1)
        used["ask"].append(c1 - c0)
        used["tell"].append(c2 - c1)
        if n in sizes:
            width = min(50, n // 2)
            client0, server0 = marks[n - width]
            client1, server1 = cpu.both()
            out[str(n)] = {
                **{f"{op}_ms": window(wall[op], n) for op in wall},
                **{f"{op}_cpu_ms": window(used[op], n) for op in used},
                # over the last `width` asks and tells: this process and the database server
                "ask_tell_cpu_ms": 1000 * (client1 - client0) / width,
                "server_cpu_ms": 1000 * (server1 - server0) / width,
                "cumulative_s": time.perf_counter() - started,
            }
            r = out[str(n)]
            log(f"  optuna {n:>5} trials: ask {r['ask_ms']:7.1f} ms wall, {r['ask_cpu_ms']:6.1f} ms CPU; tell "
                f"{r['tell_ms']:6.1f} ms wall, {r['tell_cpu_ms']:5.1f} ms CPU; server {r['server_cpu_ms']:5.1f} ms "
                f"CPU per trial; {r['cumulative_s']:7.1f} s so far")  # fmt: skip
            if r["cumulative_s"] > budget_s:
                log(f"  optuna: stopped after {n} trials, past --optuna-budget-s {budget_s:.0f}")
                break
    return out


# ------------------------------------------------------------------------------ mlflow


class RecordingReporter:
    """Keeps what one real training run reports (afm_ray.train's reporter protocol)."""

    def __init__(self, folder: Path):
        from afm_ray.train.loop import LocalReporter

        self.local = LocalReporter(folder, log=lambda line: None)
        self.results: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.results.append(dict(metrics))
        self.local.report(metrics, checkpoint_dir)

    def resume_checkpoint_dir(self) -> str | None:
        return None


def recorded_trial(workdir: Path, cache: Path | None = None) -> tuple[dict[str, Any], list[dict], dict, str]:
    """(config, per-epoch results, final result, checkpoint folder) of one real run of the default
    space's student (on sklearn's digits): 1 epoch, validation on 32 images, the final evaluation on 4 images with
    clean, PGD-20 and CW (the keys matter, not the values). AutoAttack's keys are PGD-20's values
    under AutoAttack's names: on a shared 2-core machine AutoAttack alone took over 10 minutes at
    low priority, and what is measured is the writing of the keys. With `cache`, the run is kept
    there and reused by the next invocation (one part at a time)."""
    from afm_ray.config import from_flat, to_flat
    from afm_ray.train.loop import train_fn_per_worker

    saved = cache / "recorded.json" if cache else None
    if saved is not None and saved.exists():
        config, curves, final, checkpoint = json.loads(saved.read_text())
        if Path(checkpoint).exists():
            return config, curves, final, checkpoint
    space = default_space(6)
    # sklearn's digits (8x8), 2 PGD steps: seconds, not minutes, on a busy CPU; the same student.
    overrides = {
        "data.name": "digits", "data.image_size": 8, "method.name": "pgd_at", "attack.steps": 2, "optim.epochs": 1,
        "eval.samples": 4, "eval.val_samples": 32,
    }  # fmt: skip
    config = to_flat(from_flat({**space.fixed, **overrides, "eval.attacks": "clean,pgd20,cw"}))
    reporter = RecordingReporter((cache or workdir) / "recorded")
    train_fn_per_worker(config, reporter)
    epoch, final = reporter.results[0], dict(reporter.results[-1])
    final.update({key.replace("pgd20", "aa"): value for key, value in final.items() if "pgd20" in key})
    curves = [{**epoch, "epoch": e} for e in range(1, EPOCHS + 1)]
    # The params a sweep's trial logs: the default space's fixed keys and one value of each searched key.
    config = {**config, **{d.key: (d.choices[0] if d.kind == "choice" else d.low) for d in space.search}}
    config["eval.attacks"] = space.fixed["eval.attacks"]
    recorded = (config, curves, final, str(reporter.local.latest_checkpoint))
    if saved is not None:
        saved.write_text(json.dumps(recorded, default=str))
    return recorded


class BenchTrial:
    """What TrialTracker reads of Ray Tune's Trial: its id, config, last result and name."""

    def __init__(self, trial_id: str, config: dict[str, Any]):
        self.trial_id, self.config, self.last_result = trial_id, config, {}

    def __str__(self) -> str:
        return f"train_driver_fn_{self.trial_id}"


def tracker_for(uri: str, parent: str) -> Any:
    from afm_ray.tracking.trial_tracker import TrialTracker

    tracker = TrialTracker(uri, experiment_name=EXPERIMENT, parent_run_id=parent, sweep_name="bench")
    tracker.setup()
    return tracker


def parent_run(uri: str) -> str:
    from afm_ray.tracking.trial_tracker import RedactingClient, start_or_resume_sweep_run

    params = {"sweep.objectives": "clean_acc:max,aa_acc:max", "sweep.name": "bench"}
    return start_or_resume_sweep_run(RedactingClient(uri), EXPERIMENT, "bench", params, "# bench\n", False)


def fill(uri: str, parent: str, count: int, config: dict, final: dict, rng: Any) -> float:
    """`count` trial runs as pareto reads them, one batch each; returns wall seconds per run."""
    from mlflow.entities import Metric, Param, RunTag

    from afm_ray import names
    from afm_ray.tracking.trial_tracker import RedactingClient

    client = RedactingClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    finals = [k for k in names.FINAL_METRICS if k in final]
    started = time.perf_counter()
    for _ in range(count):
        trial_id = uuid.uuid4().hex[:8]
        tags = {
            names.PARENT_TAG: parent, names.ROLE_TAG: "trial", names.SWEEP_TAG: "bench",
            names.TRIAL_ID_TAG: trial_id, names.TRIAL_STATUS_TAG: "completed",
        }  # fmt: skip
        run = client.create_run(exp, run_name=f"train_driver_fn_{trial_id}", tags=tags).info.run_id
        now = int(time.time() * 1000)
        clean, robust = rng.uniform(0.8, 0.95), rng.uniform(0.3, 0.8)
        values = {**{k: float(final[k]) for k in finals}, "clean_acc": clean, "aa_acc": min(robust, clean)}
        metrics = [Metric(k, v, now, 0) for k, v in values.items()]
        metrics += [Metric("val/clean_acc", rng.uniform(0.5, 0.9), now, e) for e in range(1, EPOCHS + 1)]
        params = [Param(k, str(v)) for k, v in config.items()]
        tags = [RunTag("trial_name", trial_id), RunTag(FILLER_TAG, "1")]
        client.log_batch(run, metrics=metrics, params=params[:100], tags=tags)
        if len(params) > 100:
            client.log_batch(run, params=params[100:])
        client.set_terminated(run, "FINISHED")
    return (time.perf_counter() - started) / max(count, 1)


def tracked_trials(
    tracker: Any, n: int, config: dict, curves: list[dict], final: dict, checkpoint: str, cpu: Cpu
) -> dict:
    """`n` trials through TrialTracker: median wall ms of each part, CPU ms per trial (client, server)."""
    from afm_ray.names import FINAL_RESULT_FLAG

    parts: dict[str, list[float]] = {"start": [], "epochs": [], "final": [], "end_with_model": []}
    client0, server0 = cpu.both()
    for _ in range(n):
        trial = BenchTrial(uuid.uuid4().hex[:8], config)
        t0 = time.perf_counter()
        tracker.log_trial_start(trial)
        t1 = time.perf_counter()
        for i, result in enumerate(curves, start=1):
            full = {**result, "timestamp": time.time(), "training_iteration": i}
            full["checkpoint_path"] = checkpoint
            tracker.log_trial_result(i, trial, full)
        t2 = time.perf_counter()
        last = {**final, FINAL_RESULT_FLAG: 1.0, "timestamp": time.time(), "training_iteration": len(curves) + 1}
        tracker.log_trial_result(len(curves) + 1, trial, last)
        trial.last_result = last
        t3 = time.perf_counter()
        tracker.log_trial_end(trial)
        t4 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[key].append(value)
    client1, server1 = cpu.both()
    out = {f"{key}_ms": 1000 * statistics.median(values) for key, values in parts.items()}
    out["wall_ms"] = sum(out.values())
    out["client_cpu_ms"] = 1000 * (client1 - client0) / n
    out["server_cpu_ms"] = 1000 * (server1 - server0) / n
    return out


def bench_mlflow(uri: str, sizes: list[int], recorded: tuple, per_size: int, cpu: Cpu, api_runs: int) -> dict[str, Any]:
    """TrialTracker's cost per trial on an experiment holding each of `sizes` runs (filled as `grow` does)."""
    import numpy as np

    config, curves, final, checkpoint = recorded
    rng = np.random.default_rng(0)
    parent = parent_run(uri)
    tracker = tracker_for(uri, parent)
    out, held = {}, 0
    for size in sizes:
        fill_s = grow(uri, parent, size - held, api_runs - held, config, final, rng) if size > held else None
        held = max(held, size)
        parts = tracked_trials(tracker, per_size, config, curves, final, checkpoint, cpu)
        held += per_size
        out[str(size)] = {**parts, "fill_ms_per_run": None if fill_s is None else 1000 * fill_s}
        split = ", ".join(f"{key} {parts[key + '_ms']:.1f}" for key in ("start", "epochs", "final", "end_with_model"))
        filler = f"; filler {1000 * fill_s:.1f} ms/run" if fill_s else ""
        log(f"  mlflow at {size:>5} runs: per trial {parts['wall_ms']:7.1f} ms wall ({split}), CPU "
            f"{parts['client_cpu_ms']:.1f} ms here + {parts['server_cpu_ms']:.1f} ms server{filler}")  # fmt: skip
    return out


# ------------------------------------------------------------------------------ pareto


def run_pareto(uri: str, cpu: Cpu, *args: str) -> tuple[dict[str, float], subprocess.CompletedProcess]:
    """`python -m afm_ray.pareto ARGS`: wall seconds, its CPU seconds and the server's."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    client0, server0 = cpu.both()
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "afm_ray.pareto", *args], env=env, capture_output=True, text=True, timeout=3600
    )
    wall = time.perf_counter() - started
    client1, server1 = cpu.both()
    return {"wall_s": wall, "cpu_s": client1 - client0, "server_cpu_s": server1 - server0}, proc


def clone_runs(uri: str, count: int, rng: Any) -> float:
    """`count` more trial runs, copied row by row (MLflow's runs, tags, params, metrics and
    latest_metrics tables) from the runs `fill` wrote through MLflow's API, each with a new
    run id, trial id and objective values; returns wall seconds per run. One `log_batch` per run
    took 0.3-0.4 s on the busy 2-core machine (an hour for 10,000); pareto reads the same rows."""
    from sqlalchemy import MetaData, create_engine, select

    from afm_ray import names

    engine = create_engine(uri)
    meta, run_tables = MetaData(), ("runs", "tags", "params", "metrics", "latest_metrics")  # runs first: referred to
    meta.reflect(engine, only=run_tables)
    tables = {name: meta.tables[name] for name in run_tables}  # not the experiments table reflect adds
    started = time.perf_counter()
    with engine.begin() as conn:
        tags = tables["tags"]
        sources = [row[0] for row in conn.execute(select(tags.c.run_uuid).where(tags.c.key == FILLER_TAG))]
        rows: dict[str, dict[str, list[dict]]] = {}  # table -> source run -> its rows
        for name, table in tables.items():
            for row in conn.execute(select(table).where(table.c.run_uuid.in_(sources))):
                rows.setdefault(name, {}).setdefault(row.run_uuid, []).append(dict(row._mapping))
        for first in range(0, count, 500):  # bounded memory: 500 runs per insert
            batch: dict[str, list[dict]] = {name: [] for name in tables}
            for i in range(first, min(count, first + 500)):
                source = sources[i % len(sources)]
                run, trial = uuid.uuid4().hex, uuid.uuid4().hex[:8]
                clean, robust = rng.uniform(0.8, 0.95), rng.uniform(0.3, 0.8)
                values = {"clean_acc": clean, "aa_acc": min(robust, clean)}
                text = {names.TRIAL_ID_TAG: trial, "trial_name": trial, "mlflow.runName": f"train_driver_fn_{trial}"}
                for name in tables:
                    for row in rows.get(name, {}).get(source, []):
                        new = {**row, "run_uuid": run}
                        if name == "runs":
                            new["name"] = text["mlflow.runName"]
                            new["artifact_uri"] = str(row["artifact_uri"]).replace(source, run)
                        elif name == "tags" and row["key"] in text:
                            new["value"] = text[row["key"]]
                        elif name in ("metrics", "latest_metrics") and row["key"] in values:
                            new["value"] = values[row["key"]]
                        batch[name].append(new)
            for name in run_tables:
                if batch[name]:
                    conn.execute(tables[name].insert(), batch[name])
    engine.dispose()
    return (time.perf_counter() - started) / max(count, 1)


def grow(uri: str, parent: str, count: int, api_left: int, config: dict, final: dict, rng: Any) -> float:
    """`count` more filler runs: up to `api_left` through MLflow's API (`fill`), the rest cloned
    (`clone_runs`, which needs some of the first kind); wall seconds per run."""
    through_api = max(0, min(count, api_left))
    seconds = fill(uri, parent, through_api, config, final, rng) * through_api
    if count > through_api:
        seconds += clone_runs(uri, count - through_api, rng) * (count - through_api)
    return seconds / max(count, 1)


def bench_pareto(uri: str, sizes: list[int], recorded: tuple, cpu: Cpu, api_runs: int) -> dict[str, Any]:
    """pareto at each size; up to `api_runs` runs are written through MLflow's API, the rest cloned."""
    import numpy as np

    config, _, final, _ = recorded
    rng = np.random.default_rng(1)
    parent = parent_run(uri)
    out, held = {}, 0
    baseline, _ = run_pareto(uri, cpu, "--help")
    for size in sizes:
        fill_s = grow(uri, parent, size - held, api_runs - held, config, final, rng)
        held = size
        took, proc = run_pareto(uri, cpu, "--experiment", EXPERIMENT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"of {size} eligible trials" in proc.stdout, proc.stdout[-2000:]
        out[str(size)] = {**took, "imports_only": baseline, "fill_ms_per_run": 1000 * fill_s}
        log(f"  pareto over {size:>5} runs: {took['wall_s']:6.1f} s wall, CPU {took['cpu_s']:.1f} s + server "
            f"{took['server_cpu_s']:.1f} s (imports alone: {baseline['wall_s']:.1f} s wall, {baseline['cpu_s']:.1f} s "
            f"CPU); filler {1000 * fill_s:.1f} ms/run")  # fmt: skip
    return out


# ------------------------------------------------------------------------------ resume


def noop_trial(config: dict[str, Any]) -> None:
    """A trial that reports its final result at once (clean_acc, aa_acc from its config)."""
    import numpy as np
    from ray import tune

    from afm_ray.names import FINAL_RESULT_FLAG

    rng = np.random.default_rng(abs(hash(tuple(sorted(map(str, config.items()))))) % 2**32)
    clean, robust = synthetic_values(config, rng)
    tune.report({"clean_acc": clean, "aa_acc": min(robust, clean), FINAL_RESULT_FLAG: 1.0, "epoch": EPOCHS})


def tune_sweep(tracking: str, optuna_url: str, storage: str, trials: int, resume: bool) -> dict[str, float]:
    """Run (or resume) the bookkeeping-only sweep; seconds of each step."""
    import optuna
    import ray
    from ray import tune

    from afm_ray.credentials import remember
    from afm_ray.search.samplers import build_sampler
    from afm_ray.sweep.driver import CompletedOnlyOptunaSearch, optuna_storage
    from afm_ray.sweep.local_ray import connect_or_start
    from afm_ray.tracking.trial_tracker import RedactingClient, TrialTracker, start_or_resume_sweep_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    remember(tracking)
    remember(optuna_url)
    times, t0, c0 = {}, time.perf_counter(), time.process_time()
    for attempt in range(3):  # Ray gives its raylet 30 s to register: too short on a loaded machine
        try:
            connect_or_start(None)
            break
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            log(f"  Ray did not start in time ({exc}); again")
            ray.shutdown()
    times["ray_start_attempts"] = attempt + 1
    times["ray_start_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    params = {"sweep.objectives": "clean_acc:max,aa_acc:max", "sweep.name": "resume"}
    parent = start_or_resume_sweep_run(RedactingClient(tracking), EXPERIMENT, "resume", params, "# bench\n", resume)
    times["parent_run_s"] = time.perf_counter() - t0
    trainable = tune.with_resources(noop_trial, {"CPU": 0, "memory": 64 * 1024**2})
    t0 = time.perf_counter()
    if resume:
        tuner = tune.Tuner.restore(f"{storage}/resume", trainable, resume_unfinished=True, resume_errored=True)
    else:
        space = default_space(trials)
        searcher = CompletedOnlyOptunaSearch(
            space=space.define_by_run(),
            metric=[o.metric for o in space.objectives],
            mode=[o.mode for o in space.objectives],
            sampler=build_sampler(space.sampler, space.seed),
            study_name="resume",
            storage=optuna_storage(optuna_url),
        )
        tracker = TrialTracker(
            tracking, experiment_name=EXPERIMENT, parent_run_id=parent, sweep_name="resume", log_model=False
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=trials, max_concurrent_trials=4),
            run_config=tune.RunConfig(name="resume", storage_path=storage, verbose=0, callbacks=[tracker]),
        )
    times["tuner_s"] = time.perf_counter() - t0
    t0, c1 = time.perf_counter(), time.process_time()
    results = tuner.fit()
    times["fit_s"] = time.perf_counter() - t0
    times["fit_driver_cpu_s"] = time.process_time() - c1
    times["driver_cpu_s"] = time.process_time() - c0
    times["trials"] = len(results)
    times["errors"] = sum(1 for r in results if r.error)
    ray.shutdown()
    return times


def bench_resume(tracking: str, optuna_url: str, workdir: Path, trials: int, cpu: Cpu) -> dict[str, Any]:
    import optuna
    from mlflow.tracking import MlflowClient

    storage = str(workdir / f"ray_results_{uuid.uuid4().hex[:6]}")
    server0 = cpu.server()
    first = tune_sweep(tracking, optuna_url, storage, trials, resume=False)
    first["server_cpu_s"] = cpu.server() - server0
    log(f"  sweep of {trials} no-op trials: fit {first['fit_s']:.1f} s ({1000 * first['fit_s'] / trials:.0f} ms/trial)")
    study = optuna.load_study(study_name="resume", storage=optuna_url)
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = len(client.search_runs([exp], "tags.`afm_ray.role` = 'trial'", max_results=50000))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started, server0 = time.perf_counter(), cpu.server()
    proc = subprocess.run(
        [sys.executable, __file__, "_resume", tracking, optuna_url, storage, str(trials)],
        env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = json.loads(proc.stdout.strip().splitlines()[-1])
    resumed["server_cpu_s"] = cpu.server() - server0
    steps = ", ".join(f"{key} {resumed[key]:.2f}" for key in ("ray_start_s", "parent_run_s", "tuner_s", "fit_s"))
    log(f"  --resume of {trials} finished trials: {wall:.1f} s in all ({steps})")
    return {
        "first": first,
        "optuna_complete": complete,
        "mlflow_trial_runs": runs,
        "resume": resumed,
        "resume_wall_s": wall,
    }


# ------------------------------------------------------------------------------ main


@contextmanager
def quiet_mlflow() -> Any:
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--parts", default="optuna,mlflow,pareto,resume")
    parser.add_argument("--optuna-trials", default="100,1000,3000")
    parser.add_argument("--optuna-budget-s", type=float, default=math.inf, help="no size begun after this")
    parser.add_argument("--mlflow-sizes", default="0,1000,3000")
    parser.add_argument("--mlflow-trials", type=int, default=10, help="trials measured at each size")
    parser.add_argument("--pareto-sizes", default="1000,10000")
    parser.add_argument(
        "--api-runs", type=int, default=1000, help="filler runs written through MLflow's API; more are cloned"
    )
    parser.add_argument("--resume-trials", type=int, default=1000)
    parser.add_argument("--postgres", help="a PostgreSQL URL whose user may CREATE DATABASE (default: start one)")
    parser.add_argument("--json", help="write the figures here (merged into what the file holds)")
    parser.add_argument("--recorded", help="a folder that keeps the recorded training run between invocations")
    args = parser.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parts = args.parts.split(",")

    from afm_ray.devices import cpu_model_name
    from afm_ray.signals import install_sigterm_as_sigint, restore_sigterm

    previous = install_sigterm_as_sigint()  # a kill stops the PostgreSQL server this script started, too
    workdir = Path(tempfile.mkdtemp(prefix="afm-cp-"))
    stores = Stores(args.postgres, workdir)
    figures: dict[str, Any] = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    figures["machine"] = f"{cpu_model_name()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    import mlflow
    import optuna
    import ray
    import sqlalchemy

    figures["versions"] = {
        "optuna": optuna.__version__, "mlflow": mlflow.__version__, "ray": ray.__version__,
        "sqlalchemy": sqlalchemy.__version__,
    }  # fmt: skip
    try:
        if "postgresql" in args.backends.split(","):
            stores.start()
        if stores.server is not None:
            figures["postgresql_server"] = "a local PostgreSQL 15 server (tests/postgres.py: fsync off)"
        cache = Path(args.recorded) if args.recorded else None
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
        recorded = recorded_trial(workdir, cache) if {"mlflow", "pareto"} & set(parts) else None
        with quiet_mlflow():
            for backend in args.backends.split(","):
                log(f"{backend}:")
                result = figures.setdefault(backend, {})
                todo = [p for p in parts if backend != "memory" or p == "optuna"]  # no database: Optuna only
                if "optuna" in todo:
                    result["optuna"] = bench_optuna(
                        stores.new(backend, "optuna"),
                        ints(args.optuna_trials),
                        stores.cpu(backend),
                        args.optuna_budget_s,
                    )
                if "mlflow" in todo:
                    result["mlflow"] = bench_mlflow(
                        stores.new(backend, "mlflow"),
                        ints(args.mlflow_sizes),
                        recorded,
                        args.mlflow_trials,
                        stores.cpu(backend),
                        args.api_runs,
                    )
                if "pareto" in todo:
                    result["pareto"] = bench_pareto(
                        stores.new(backend, "pareto"),
                        ints(args.pareto_sizes),
                        recorded,
                        stores.cpu(backend),
                        args.api_runs,
                    )
                if "resume" in todo:
                    tracking, optuna_url = stores.new(backend, "rmlflow"), stores.new(backend, "roptuna")
                    result["resume"] = bench_resume(
                        tracking, optuna_url, workdir, args.resume_trials, stores.cpu(backend)
                    )
                result.setdefault("load_average_1min", []).append(os.getloadavg()[0])  # the machine is shared
                if args.json:
                    Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    finally:
        stores.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        restore_sigterm(previous)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_resume":  # the resuming process of bench_resume
        tracking, optuna_url, storage, trials = sys.argv[2:6]
        with quiet_mlflow():
            print(json.dumps(tune_sweep(tracking, optuna_url, storage, int(trials), resume=True)))
        sys.exit(0)
    sys.exit(main())
