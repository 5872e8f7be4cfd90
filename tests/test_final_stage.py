"""The final stage (`python -m afm_ray.final`): resumable AutoAttack, the shipped recipes, the plan and
its cost, the table, and (slow) the whole stage on a tiny digits sweep (a student distilled from a
two-teacher ensemble) with two seeds, run again to show it continues instead of starting over."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import digits, trained_student
from mlflow.tracking import MlflowClient
from sweeps import run_sweep, sweep_env, trial_runs, write_space

from afm_ray import names
from afm_ray.attacks import robust_predictions
from afm_ray.config import from_flat
from afm_ray.final.autoattack_resume import autoattack_resumable, read_state, standard_attacks
from afm_ray.final.plan import Configuration, format_plan, from_recipes, job_cost
from afm_ray.final.recipes import PENDING_KEYS, load_recipe, parse_recipe, published_for, shipped_recipes
from afm_ray.final.table import format_table, summarise, write_table
from afm_ray.stats import mean_interval
from afm_ray.teacher.training import ensure_teacher

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")
REPO = Path(__file__).resolve().parents[1]
EPS = 0.08  # on this small digits CNN 5 of 16 images survive APGD-CE and APGD-T breaks one more
BATCH = 4


class Interrupt(BaseException):
    """Stands for a preemption (SIGTERM/Ctrl-C arrive as KeyboardInterrupt): not an Exception."""


@pytest.fixture(scope="module")
def student_and_images():
    torch.set_num_threads(1)
    x, y = digits()
    return trained_student(steps=40), x[:16], y[:16]


@pytest.mark.slow  # AutoAttack three times: about 30 s on one core
def test_resumable_autoattack_equals_one_uninterrupted_run(student_and_images, tmp_path):
    model, x, y = student_and_images
    reference = robust_predictions(model, x, y, attack="aa", eps=EPS, batch_size=BATCH, seed=0)
    robust, state = autoattack_resumable(
        model, x, y, eps=EPS, norm="linf", batch_size=BATCH, seed=0, state_location=str(tmp_path / "aa.json")
    )
    assert torch.equal(robust, reference)
    assert state["done"] == state["ran"] == standard_attacks("linf") == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert 0 < int(robust.sum()) < int(state["clean"].count(True))  # APGD-CE broke some, not all


@pytest.mark.slow
def test_autoattack_interrupted_midway_resumes_without_rerunning_finished_attacks(student_and_images, tmp_path):
    model, x, y = student_and_images
    state_file = str(tmp_path / "aa.json")
    seen: list[str] = []

    def preempt_in_fab(line: str) -> None:  # after FAB-T's first batch: two attacks done, the third midway
        seen.append(line)
        if line.startswith("aa: fab-t - 1/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        autoattack_resumable(
            model,
            x,
            y,
            eps=EPS,
            norm="linf",
            batch_size=BATCH,
            seed=0,
            state_location=state_file,
            progress=preempt_in_fab,
        )
    assert read_state(state_file)["done"] == ["apgd-ce", "apgd-t"]  # what the interrupted run finished

    resumed_lines: list[str] = []
    robust, state = autoattack_resumable(
        model, x, y, eps=EPS, norm="linf", batch_size=BATCH, seed=0, state_location=state_file,
        progress=resumed_lines.append,
    )  # fmt: skip
    ran = [line.removeprefix("aa: running ") for line in resumed_lines if line.startswith("aa: running ")]
    assert ran == ["fab-t", "square"], resumed_lines  # APGD-CE and APGD-T were not run again
    assert state["resumed"] == ["apgd-ce", "apgd-t"] and state["ran"] == ["fab-t", "square"]
    assert torch.equal(robust, robust_predictions(model, x, y, attack="aa", eps=EPS, batch_size=BATCH, seed=0))

    # A state of another student is not reused: everything runs again.
    other = trained_student(seed=1, steps=40)
    _, fresh = autoattack_resumable(
        other, x, y, eps=EPS, norm="linf", batch_size=BATCH, seed=0, state_location=state_file
    )
    assert fresh["resumed"] == [] and fresh["ran"] == standard_attacks("linf")


def test_pyautoattack_cannot_restore_its_own_state(student_and_images, tmp_path):
    """Why afm_ray.final.autoattack_resume keeps its own record: pyautoattack 0.2.0 writes a state with
    state_path but refuses to read it back. If this fails, a release fixed it: use state_path."""
    from pyautoattack import AutoAttack

    model, x, y = student_and_images
    path = tmp_path / "pyautoattack_state.json"
    AutoAttack(model, eps=EPS, seed=0).run_standard_evaluation(x[:4], y[:4], batch_size=4, state_path=path)
    assert json.loads(path.read_text())["_run_attacks"]  # it wrote which attacks ran
    with pytest.raises(ValueError, match="different set of attacks"):
        AutoAttack(model, eps=EPS, seed=0).run_standard_evaluation(x[:4], y[:4], batch_size=4, state_path=path)


def test_shipped_recipes_name_source_budget_and_published_number():
    assert set(shipped_recipes()) == {
        "rslad_cifar10_resnet18", "adaad_cifar10_resnet18", "akd_cifar10_resnet18", "advfunmatch_cifar10_resnet18",
    }  # fmt: skip
    for name in shipped_recipes():
        recipe = load_recipe(name)
        cfg = recipe.config()
        assert (cfg.data.name, cfg.student.arch, cfg.teacher.arch) == ("cifar10", "resnet18", "wrn34_10")
        assert math.isclose(cfg.eval_eps, 8 / 255, rel_tol=1e-6) and cfg.eval.samples == 0
        assert recipe.paper and recipe.code and recipe.published.setting
        assert {"epochs", "batch_size", "optimizer", "lr_schedule"} <= set(recipe.budget)
        assert str(cfg.optim.epochs) in recipe.budget["epochs"]
    rslad, adaad = load_recipe("rslad_cifar10_resnet18"), load_recipe("adaad_cifar10_resnet18")
    assert rslad.published.aa_acc == 0.5149 and adaad.published.aa_acc == 0.5006
    assert load_recipe("akd_cifar10_resnet18").published.aa_acc is None  # none found: said, not invented
    assert (rslad.config().optim.weight_decay, adaad.config().optim.weight_decay) == (2e-4, 5e-4)
    # The published number is found for the same method and architecture, not for another method.
    assert published_for(rslad.config())[0].name == "rslad_cifar10_resnet18"
    assert published_for(rslad.config(overrides={"method.name": "ard", "method.tau": None})) is None


def test_a_recipe_key_this_config_does_not_know_yet_is_set_aside_and_shown():
    raw = {"name": "r", "fixed": {"data.name": "digits", "student.select": "best_pgd"}, "resources": {}}
    recipe = parse_recipe(raw, path="r")
    if "student.select" in recipe.fixed:  # the key landed: it is applied like any other
        assert recipe.config().student.select == "best_pgd"
        return
    assert recipe.not_applied == {"student.select": "best_pgd"} and "student.select" in PENDING_KEYS
    plan = format_plan(from_recipes([recipe], {}, "/storage"), 1, 0)
    assert "not applied (this build's config has no such key yet): student.select=best_pgd" in plan


def test_recipe_dry_run_prints_the_cost_on_the_cluster_and_starts_nothing(tmp_path):
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"  # the preflight lists the files, it does not read them
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(b"x")
    (tmp_path / "teacher.pt").write_bytes(b"a teacher")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = subprocess.run(
        [sys.executable, "-m", "afm_ray.final", "--recipe", "rslad_cifar10_resnet18", "--dry-run",
         "--set", f"data.root={tmp_path / 'cifar'}", "--set", f"teacher.checkpoint={tmp_path / 'teacher.pt'}",
         "--storage", str(tmp_path / "ray_results"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**_env(), "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "1 configuration(s) x 3 seed(s) = 3 job(s)" in out and "300 epochs" in out
    assert "10000 test images" in out and "published AutoAttack 51.49%" in out
    for device in ("A10G", "L4", "A100-40GB"):  # every GPU of the shipped clusters, in GPU-hours and dollars
        assert f"total on {device}:" in out
    assert "GPU-hours, $" in out and "spot" in out and "preflight: teacher:" in out
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # wrote nothing


def test_cost_of_a_job_scales_with_epochs_seeds_and_images():
    recipe = load_recipe("adaad_cifar10_resnet18")
    (short,) = from_recipes([recipe], {"optim.epochs": 100}, "/s")
    (full,) = from_recipes([recipe], {}, "/s")
    a, b = job_cost(short, 1000), job_cost(full, 0)
    assert math.isclose(b["flops"]["train"], 2 * a["flops"]["train"], rel_tol=1e-9)
    assert math.isclose(b["flops"]["evaluation"], 10 * a["flops"]["evaluation"], rel_tol=1e-9)
    assert b["devices"]["A10G"]["usd"][0] < b["devices"]["A10G"]["usd"][1]  # spot below on-demand
    assert short.identity != full.identity and short.job_name(0) != full.job_name(0)  # a --set makes new runs


def test_table_means_over_seeds_with_intervals_and_the_published_number(tmp_path):
    rows = [
        {"key": "recipe:x", "label": "recipe x", "method": "rslad", "student": "resnet18", "teacher": "wrn34_10",
         "epochs": 300, "seeds": [0, 1000, 2000], "published_aa": 0.5149, "published_clean": 0.8338,
         "published_source": "rslad_cifar10_resnet18"},
        {"key": "run1", "label": "run run1", "method": "adaad", "student": "small_cnn", "teacher": "small_cnn",
         "epochs": 2, "seeds": [0, 1000], "published_aa": None, "published_clean": None, "published_source": ""},
    ]  # fmt: skip
    done = {
        ("recipe:x", 0): {
            "clean_acc": 0.83,
            "aa_acc": 0.50,
            "eval/n_samples": 10000.0,
            "params": 1.1e7,
            "latency_ms": 2,
        },
        ("recipe:x", 1000): {"clean_acc": 0.84, "aa_acc": 0.52, "eval/n_samples": 10000.0, "params": 1.1e7},
        ("run1", 0): {"clean_acc": 0.9, "aa_acc": 0.7, "eval/n_samples": 359.0, "params": 36000.0, "latency_ms": 0.5},
    }  # fmt: skip: ("recipe:x", 2000) not finished: the row says 2 students
    frame = summarise(rows, done)
    first = frame.iloc[0]
    assert first["students"] == 2 and first["seeds"] == "0,1000" and first["images"] == 10000
    assert (first["aa_acc"], first["aa_acc_ci_low"], first["aa_acc_ci_high"]) == pytest.approx(
        mean_interval([0.50, 0.52], 10000)
    )
    assert first["aa_minus_published"] == pytest.approx(0.51 - 0.5149)
    assert math.isnan(frame.iloc[1]["aa_minus_published"])
    text = format_table(frame)
    assert "51.49 (rslad_cifar10_resnet18)" in text and "-0.49" in text and "2 (0,1000)" in text
    md = write_table(frame, tmp_path / "t.md").read_text()
    assert md.startswith("| configuration |") and "| recipe x |" in md
    back = pd.read_csv(write_table(frame, tmp_path / "t.csv"))
    assert list(back["label"]) == ["recipe x", "run run1"]


def test_configuration_seeds_keep_the_trials_own_first():
    (config,) = from_recipes([load_recipe("rslad_cifar10_resnet18")], {"run.seed": 7}, "/s")
    assert isinstance(config, Configuration) and config.seeds(3) == [7, 1007, 2007]
    assert config.job_name(7).startswith("final-rslad_cifar10_resnet18-") and config.job_name(7).endswith("-seed7")


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}


# ----------------------------------------------------------------------------------- end to end (Ray)

SEEDS = 2
SAMPLES = 24


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A one-trial digits sweep (RSLAD from an ensemble of two 1-epoch teachers, AKD's technique; 1 epoch):
    the trial the final stage retrains, its ensemble with it."""
    tmp_path = tmp_path_factory.mktemp("final")
    teachers = [
        str(ensure_teacher(from_flat({
            "data.name": "digits", "teacher.width": 8, "teacher.epochs": 1, "teacher.method": method,
            "teacher.cache_dir": str(tmp_path / "teachers")}), log=lambda line: None))
        for method in ("pgd_at", "trades")
    ]  # fmt: skip
    space = write_space(
        tmp_path,
        name="final",
        experiment="final-tests",
        num_samples=1,
        fixed={
            "method.name": "rslad",
            "teacher.checkpoint": ",".join(teachers),
            "teacher.width": 8,
            "optim.epochs": 1,
            "eval.attacks": "clean,pgd20",
            "eval.batch_size": 32,
        },
        search={"attack.eps": {"uniform": [0.05, 0.15]}},
        objectives=[{"metric": "clean_acc", "mode": "max"}, {"metric": "pgd20_acc", "mode": "max"}],
    )
    run_sweep(tmp_path, space, "--name", "f1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (trial,) = trial_runs(uri, "final-tests")
    return {"tmp": tmp_path, "uri": uri, "trial": trial, "ensemble": ",".join(teachers)}


def _final(swept, *extra: str) -> subprocess.CompletedProcess:
    tune_id = swept["trial"].data.tags[names.TRIAL_ID_TAG]  # the id the sweep printed resolves too
    proc = subprocess.run(
        [sys.executable, "-m", "afm_ray.final", "--experiment", "final-tests", "--tracking-uri", swept["uri"],
         "--trial", tune_id, "--seeds", str(SEEDS), "--samples", str(SAMPLES), "--set", "optim.epochs=2",
         "--out", "final.md", *extra],
        cwd=swept["tmp"], env=sweep_env(swept["tmp"]), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _final_runs(client: MlflowClient, exp_id: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.`{names.ROLE_TAG}` = 'final'")


@pytest.mark.slow
def test_final_stage_end_to_end_two_seeds_continues_and_tables(swept):
    client = MlflowClient(swept["uri"], swept["uri"])
    exp_id = client.get_experiment_by_name("final-tests").experiment_id
    trial = swept["trial"]

    out = _final(swept).stdout
    plan_at, first_job_at = out.index("final stage: 1 configuration(s) x 2 seed(s)"), out.index("final: done ")
    assert plan_at < out.index("preflight: ") < first_job_at  # the plan and its cost come before any work
    assert "2 epochs" in out and f"clean + AutoAttack on {SAMPLES} test images" in out
    assert "no published number for this setting" in out
    assert out.count("final: trained ") == SEEDS and out.count("final: done ") == SEEDS  # a line per finished job
    # its own lines only: Ray's and MLflow's go to final.log beside the Train runs, named at the end
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d.*(WARNING|INFO)", out, re.M), out
    assert f"log: {swept['tmp'] / 'ray_results' / 'f1' / 'final' / 'final.log'}" in out, out[-2000:]

    runs = _final_runs(client, exp_id)
    assert len(runs) == SEEDS and all(r.info.status == "FINISHED" for r in runs)
    base = int(trial.data.params["run.seed"])
    assert sorted(int(r.data.tags[names.FINAL_SEED_TAG]) for r in runs) == [base, base + 1000]
    for r in runs:  # linked to the trial, its student logged, scored on the asked images, a full schedule
        assert r.data.tags[names.FINAL_OF_TAG] == r.data.tags[names.PARENT_TAG] == trial.info.run_id
        assert names.STUDENT_SHA_TAG in r.data.tags and r.data.params["optim.epochs"] == "2"
        assert r.data.params["teacher.checkpoint"] == swept["ensemble"]  # retrained from the same two teachers
        m = r.data.metrics
        assert m["eval/n_samples"] == SAMPLES and m["train_final/epoch"] == 2
        assert m["aa_acc_ci_low"] <= m["aa_acc"] <= m["aa_acc_ci_high"] and m["aa_acc"] <= m["clean_acc"]
        assert m["eval/aa_attacks_run"] == 4 and m["eval/aa_attacks_resumed"] == 0
        # the AutoAttack state sits beside the Train run in the sweep's storage, where a rerun looks
        state = read_state(
            str(swept["tmp"] / "ray_results" / "f1" / "final" / r.info.run_name / "autoattack_state.json")
        )
        assert state["done"] == standard_attacks("linf")

    table = (swept["tmp"] / "final.md").read_text()
    assert f"| run {trial.info.run_id[:8]} (trial " in table and "| 2 (" in table

    # Run again: nothing is trained or attacked twice.
    again = _final(swept).stdout
    assert f"final stage: {SEEDS} of {SEEDS} job(s) already done, 0 to run" in again and "final: done" not in again
    assert len(_final_runs(client, exp_id)) == SEEDS

    # A job preempted after its AutoAttack state was written but before its result was recorded: the rerun
    # goes straight to the evaluation (the student is logged) and AutoAttack finds every attack done.
    victim = runs[0]
    client.set_terminated(victim.info.run_id, status="KILLED")
    resumed = _final(swept).stdout
    assert "final: trained" not in resumed and resumed.count("final: done ") == 1
    assert "AutoAttack resumed after 4 attack(s)" in resumed
    after = client.get_run(victim.info.run_id)
    assert after.info.status == "FINISHED" and after.data.metrics["eval/aa_attacks_resumed"] == 4
    assert after.data.metrics["aa_acc"] == victim.data.metrics["aa_acc"]
    assert len(_final_runs(client, exp_id)) == SEEDS
