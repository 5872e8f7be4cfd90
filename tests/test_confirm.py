"""`python -m afm_ray.pareto --confirm` end to end: a real tiny sweep (local Ray, MLflow in SQLite),
then the confirmation stage on its own local Ray, interrupted once and resumed.

Digits, a width-8 CNN trained with PGD-AT (no teacher to train), 1 epoch, clean + PGD-20 only, so
the whole module takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from sweeps import run_sweep, sweep_env, write_space

from afm_ray import names
from afm_ray.config import from_flat
from afm_ray.data import load_run_data
from afm_ray.devices import WorkerContext
from afm_ray.errors import ConfigError
from afm_ray.evaluate.protocol import evaluate_sharded
from afm_ray.names import Objective
from afm_ray.pareto.confirm import Job, _confirmed_frame, confirm_images, format_comparison, retrain_seeds
from afm_ray.pareto.estimate import (
    ASSUMED_RAY_S,
    describe,
    eval_seconds,
    job_cost,
    ray_seconds,
    slots_for,
    wall_seconds,
)
from afm_ray.pareto.ranking import rank_trials
from afm_ray.stats import mean_interval, wilson_interval
from afm_ray.tracking.student_model import fetch_student

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

SEEDS = 2
# The digits test split (20% of 1797 images), what --confirm scores on by default.
DIGITS_TEST_IMAGES = len(load_run_data(from_flat({"data.name": "digits"})).y_test)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("confirm")
    space = write_space(
        tmp_path,
        name="confirm",
        experiment="confirm-tests",
        num_samples=2,
        fixed={
            "method.name": "pgd_at",
            "optim.epochs": 1,
            "eval.attacks": "clean,pgd20",
            "eval.batch_size": 64,  # fixed, so a direct evaluation attacks exactly the same batches
        },
        search={"attack.eps": {"uniform": [0.05, 0.15]}, "optim.lr": {"loguniform": [0.05, 0.2]}},
        objectives=[{"metric": "clean_acc", "mode": "max"}, {"metric": "pgd20_acc", "mode": "max"}],
    )
    run_sweep(tmp_path, space, "--name", "c1")
    return {"tmp": tmp_path, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def _pareto(swept, *extra):
    return [
        sys.executable,
        "-m",
        "afm_ray.pareto",
        "--experiment",
        "confirm-tests",
        "--tracking-uri",
        swept["uri"],
        "--confirm",
        "--seeds",
        str(SEEDS),
        "--samples",
        "0",  # the sweep scored 24 images, too few to confirm a front: the whole test split
        *extra,
    ]


def _confirmations(client, exp_id):
    return client.search_runs([exp_id], filter_string=f"tags.`{names.ROLE_TAG}` = 'confirmation'")


def _sigint_as_at_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_confirm_resumes_links_retrains_and_registers_only_confirmed(swept):
    client = MlflowClient(swept["uri"], swept["uri"])
    exp_id = client.get_experiment_by_name("confirm-tests").experiment_id
    trials = {r.info.run_id: r for r in client.search_runs([exp_id], f"tags.`{names.ROLE_TAG}` = 'trial'")}
    env = sweep_env(swept["tmp"])

    # Interrupted (SIGTERM) once the first confirmation is logged: what finished stays, the rest resumes.
    proc = subprocess.Popen(
        _pareto(swept),
        cwd=swept["tmp"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C as at a terminal, even where pytest runs as a background job of a script, whose
        # SIGINT is ignored and would be inherited (nothing then stops the confirmation).
        preexec_fn=_sigint_as_at_a_terminal,
    )
    seen = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("confirmed ") or time.monotonic() > deadline:
            break
    # the plan and its estimate come before any job finishes, from the sweep's own recorded times
    plan = "".join(seen)
    assert f"each scored on {DIGITS_TEST_IMAGES} test images (the sweep scored 24" in plan, plan
    assert re.search(r"confirm: estimate ~[\d.]+ (s|min|h) on this cluster, \d job\(s\) at a time", plan), plan
    # its own lines only: Ray's and MLflow's (e.g. the token-auth WARNING) go to confirm.log
    assert not [ln for ln in seen if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d.*(WARNING|INFO)", ln)], plan
    assert "a retrain ~" in plan and "a re-evaluation ~" in plan
    assert re.match(r"confirmed 1/\d+ \[\d\d:\d\d:\d\d\] ", seen[-1]) and "estimated)" in seen[-1], seen[-1]
    # SIGTERM (`kill`, `ray job stop`) takes Ctrl-C's path: ray.init's own handler would abort in Ray's core.
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(seen) + rest  # interrupted, not finished
    assert "run the same command again" in rest
    before = _confirmations(client, exp_id)
    assert sum(r.info.status == "FINISHED" for r in before) >= 1
    # the jobs still running were stopped and say so; none is left RUNNING
    assert {r.info.status for r in before} <= {"FINISHED", "KILLED"}, [r.info.status for r in before]

    done = subprocess.run(
        _pareto(swept, "--register", "confirmed-students"),
        cwd=swept["tmp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done before" in done.stdout and "confirmed front:" in done.stdout
    finished = re.search(r"confirm: (\d+) job\(s\) in (.+) \(estimated (.+)\)", done.stdout)
    assert finished, done.stdout  # the wall time against the estimate, said at the end
    progress = [ln for ln in done.stdout.splitlines() if ln.startswith("confirmed ") and "/" in ln.split()[1]]
    assert len(progress) == int(finished.group(1))  # a line per finished job
    log_line = re.search(r"^log: (\S+confirm\.log) ", done.stdout, re.M)
    assert log_line and Path(log_line.group(1)).is_file(), done.stdout[-2000:]

    after = _confirmations(client, exp_id)
    keys = [
        (r.data.tags[names.CONFIRMS_TAG], r.data.tags[names.CONFIRM_KIND_TAG], r.data.tags[names.CONFIRM_SEED_TAG])
        for r in after
    ]
    assert len(keys) == len(set(keys)), "a confirmation was duplicated"  # resumed, not redone
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in after}
    assert all(r.info.status == "FINISHED" for r in after)
    candidates = {k[0] for k in keys}
    assert candidates <= set(trials) and len(after) == len(candidates) * (1 + SEEDS)
    for trial in candidates:  # K retrains with new seeds, each linked to its trial, each with its student
        base = int(trials[trial].data.params["run.seed"])
        retrains = [r for r in after if r.data.tags[names.CONFIRMS_TAG] == trial and "retrain" in r.data.tags.values()]
        assert sorted(int(r.data.tags[names.CONFIRM_SEED_TAG]) for r in retrains) == [base + 1000, base + 2000]
        for r in [*retrains]:
            assert r.data.tags[names.PARENT_TAG] == trial and names.STUDENT_SHA_TAG in r.data.tags
            assert r.data.metrics["eval/n_samples"] == DIGITS_TEST_IMAGES  # the whole test split
            assert (
                r.data.metrics["clean_acc_ci_low"] < r.data.metrics["clean_acc"] < r.data.metrics["clean_acc_ci_high"]
            )

    # Only confirmed candidates are registered, with the confirmation recorded on the version.
    versions = client.search_model_versions("name = 'confirmed-students'")
    assert versions and {v.run_id for v in versions} <= candidates
    assert all(v.tags["afm_ray.confirmed"] == f"samples=0 seeds={SEEDS}" for v in versions)
    aliases = client.get_registered_model("confirmed-students").aliases
    assert sorted(aliases) == [f"pareto-{i}" for i in range(1, len(versions) + 1)]

    # A re-evaluation equals an evaluation of the same weights done directly, on the whole test split.
    reeval = next(r for r in after if r.data.tags[names.CONFIRM_KIND_TAG] == "reevaluate")
    trial = trials[reeval.data.tags[names.CONFIRMS_TAG]]
    model, _ = fetch_student(client, f"runs:/{trial.info.run_id}")
    cfg = from_flat({k: v for k, v in trial.data.params.items()}, ignore_unknown=True)
    data = load_run_data(cfg)
    torch.set_num_threads(1)  # as a 1-CPU Ray task runs it
    direct = evaluate_sharded(
        model,
        data.x_test,
        data.y_test,
        eps=cfg.eval_eps,
        norm=cfg.attack.norm,
        attack_names=("clean", "pgd20"),
        batch_size=64,
        ctx=WorkerContext(0, 1, torch.device("cpu")),
        seed=cfg.data.seed,
    )
    assert direct["eval/n_samples"] == reeval.data.metrics["eval/n_samples"] == DIGITS_TEST_IMAGES
    assert reeval.data.metrics["clean_acc"] == direct["clean_acc"]
    assert reeval.data.metrics["pgd20_acc"] == direct["pgd20_acc"]


def test_confirmed_means_replace_the_sweeps_values():
    """The aggregation alone, on hand-made numbers: a candidate's confirmed accuracy is the mean over its
    re-evaluated student and its retrains, with mean_interval; the comparison shows the sweep's value."""
    trials = pd.DataFrame(
        {
            "run_id": ["r1", "r2"],
            "status": ["FINISHED"] * 2,
            "start_time": [1, 2],
            f"tags.{names.TRIAL_STATUS_TAG}": ["completed"] * 2,
            "metrics.aa_acc": [0.52, 0.49],  # on 200 images in the sweep
            "metrics.clean_acc": [0.80, 0.81],
            "metrics.eval/n_samples": [200.0, 200.0],
            "params.run.seed": ["0", "3"],
            "params.method.name": ["advfunmatch", "rslad"],
        }
    )
    objectives = [Objective("aa_acc", "max"), Objective("clean_acc", "max")]
    ranked = rank_trials(trials, objectives)
    assert ranked["pareto"].all()  # r1 wins aa, r2 wins clean
    assert retrain_seeds(3, 2) == [1003, 2003]
    jobs = [Job("r1", "reevaluate"), Job("r1", "retrain", 1000), Job("r2", "reevaluate")]
    done = {
        jobs[0]: {"aa_acc": 0.45, "clean_acc": 0.78, "eval/n_samples": 1000.0},
        jobs[1]: {"aa_acc": 0.47, "clean_acc": 0.80, "eval/n_samples": 1000.0},
        jobs[2]: {"aa_acc": 0.46, "clean_acc": 0.82, "eval/n_samples": 1000.0},
    }
    confirmed = _confirmed_frame(ranked, jobs, done).set_index("run_id")
    assert confirmed.loc["r1", "metrics.aa_acc"] == pytest.approx(0.46)
    # one new seed: no t interval over two values (it would widen it), the images' Wilson interval at the mean
    assert confirmed.loc["r1", "metrics.aa_acc_ci_low"] == pytest.approx(wilson_interval(0.46, 1000)[0])
    assert confirmed.loc["r1", "metrics.aa_acc_ci_low"] > mean_interval([0.45, 0.47], 1000)[1]
    assert (confirmed.loc["r2", "metrics.aa_acc_ci_low"], confirmed.loc["r2", "metrics.aa_acc_ci_high"]) == (
        wilson_interval(0.46, 1000)
    )
    assert confirmed.loc["r1", "params.confirm.seeds"] == "0,1000"
    assert (
        confirmed.loc["r2", "metrics.confirm/students"] == 1 and confirmed.loc["r2", "metrics.eval/n_samples"] == 1000
    )
    again = rank_trials(confirmed.reset_index(), objectives)  # same aa (0.46), r2 more accurate: r2 alone
    assert list(again.loc[again["pareto"], "run_id"]) == ["r2"]
    text = format_comparison(ranked, confirmed.reset_index(), objectives)
    assert "trial r1 advfunmatch: aa_acc 52.00 (200 img) -> 46.00" in text and "interval: images only" in text


def _frame(n_samples: float, **extra) -> pd.DataFrame:
    """Two completed trials of a digits sweep in load_trials' layout, scored on ``n_samples`` images."""
    return pd.DataFrame(
        {
            "run_id": ["r1", "r2"],
            "status": ["FINISHED"] * 2,
            "start_time": [1, 2],
            f"tags.{names.TRIAL_STATUS_TAG}": ["completed"] * 2,
            f"tags.{names.TRIAL_ID_TAG}": ["917f2149", "03cb4c0e"],
            "metrics.aa_acc": [0.52, 0.49],
            "metrics.clean_acc": [0.80, 0.81],
            "metrics.eval/n_samples": [n_samples] * 2,
            "params.data.name": ["digits"] * 2,
            "params.eval.attacks": ["clean,pgd20,aa"] * 2,
            **extra,
        }
    )


def test_confirmation_images_default_to_the_sweeps_and_too_few_is_an_error():
    ranked = rank_trials(_frame(200.0), [Objective("aa_acc", "max"), Objective("clean_acc", "max")])
    assert confirm_images(ranked, None) == (200, 200)  # the sweep's own count, not the whole split
    assert confirm_images(ranked, 0) == (0, DIGITS_TEST_IMAGES)  # 0: the whole test split
    assert confirm_images(ranked, 5000) == (5000, DIGITS_TEST_IMAGES)  # no more than the split holds
    with pytest.raises(ConfigError, match=r"^--samples 10: 10 test images are too few .* use --samples 100 or more"):
        confirm_images(ranked, 10)
    few = rank_trials(_frame(24.0), [Objective("aa_acc", "max"), Objective("clean_acc", "max")])
    with pytest.raises(
        ConfigError, match=rf"^--samples 24: .*or --samples 0 \(the whole test split: {DIGITS_TEST_IMAGES}\)"
    ):
        confirm_images(few, None)


def test_the_estimate_is_the_sweeps_own_recorded_times():
    """Training from time/worker_s - time/eval_s, evaluation from each attack's images/s at the new image
    count, Ray's share from time/trial_s - time/worker_s; jobs handed to the first free slot."""
    frame = _frame(
        200.0,
        **{
            "metrics.time/worker_s": [100.0, 80.0],
            "metrics.time/eval_s": [20.0, 20.0],
            "metrics.time/trial_s": [130.0, 104.0],  # Ray: 30 s and 24 s, median 27 s
            "metrics.eval/clean_images_per_s": [1000.0, 1000.0],
            "metrics.eval/pgd20_images_per_s": [100.0, 100.0],
            "metrics.eval/aa_images_per_s": [20.0, 20.0],
        },
    )
    assert eval_seconds(frame.iloc[0], 400) == pytest.approx(0.4 + 4 + 20)
    assert ray_seconds(frame) == pytest.approx(27.0)
    retrain = job_cost(frame.iloc[0], "retrain", 400, 27.0)
    assert (retrain.train_s, retrain.ray_s) == (80.0, 27.0) and retrain.seconds == pytest.approx(80 + 24.4 + 27)
    reevaluate = job_cost(frame.iloc[1], "reevaluate", 400, 27.0)
    assert reevaluate.train_s == 0 and reevaluate.eval_s == pytest.approx(24.4)
    no_rates = frame.drop(columns=[c for c in frame.columns if c.endswith("_images_per_s")])
    assert eval_seconds(no_rates.iloc[0], 400) == pytest.approx(40.0)  # time/eval_s scaled 200 -> 400 images
    assert ray_seconds(frame.drop(columns=["metrics.time/trial_s"])) == ASSUMED_RAY_S
    assert wall_seconds([10, 10, 10], 2) == 20 and wall_seconds([30, 10, 10, 10], 2) == 30
    assert slots_for({"CPU": 2.0}, 1.0, 0.0) == 2 and slots_for({"CPU": 64.0, "GPU": 2.0}, 4.0, 1.0) == 2
    text = describe([retrain, reevaluate], 2, 400)
    assert text.startswith("~2.2 min on this cluster, 2 job(s) at a time") and "training 80 s" in text
