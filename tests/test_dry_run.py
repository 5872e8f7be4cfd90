"""`python -m afm_ray.sweep --dry-run`: the resolved plan and its cost, with no Ray and no writes;
the FLOP accounting behind the estimate, checked against counted FLOPs of real steps."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afm_ray.config import from_flat
from afm_ray.cost import dataset_shapes, eval_flops_per_image, forward_flops, train_flops_per_image, trial_flops
from afm_ray.ensemble import TeacherEnsemble
from afm_ray.methods import METHODS, AttackSpec, build_method
from afm_ray.models import build_model
from afm_ray.search.space import load_search_space
from afm_ray.sweep.__main__ import main as sweep_main
from afm_ray.sweep.dry_run import describe_plan, format_plan

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))
NO_RAY = "import sys; from afm_ray.sweep.__main__ import main as sweep_main; rc = sweep_main(sys.argv[1:]); " + (
    "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)"
)


def dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_RAY, "--dry-run", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_starts_no_ray_and_writes_nothing(tmp_path):
    proc = dry_run(
        tmp_path,
        "--format",
        "json",
        "--storage",
        str(tmp_path / "results"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--optuna-storage",
        f"sqlite:///{tmp_path / 'optuna.db'}",
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert {"num_samples", "sampler", "scheduler", "resources", "estimate"} <= set(plan)
    assert {"name", "n_startup_trials"} <= set(plan["sampler"])
    assert list(tmp_path.iterdir()) == []  # no storage, no tracking store, no Optuna database


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_shipped_space_plans_a_model_based_search(path):
    plan = json.loads(format_plan(describe_plan(load_search_space(path)), "json"))
    sampler = plan["sampler"]
    if sampler["name"] == "grid":  # a seed-replicated study (study_methods*), not a search: every cell once
        assert path.stem.startswith("study_") and sampler["n_startup_trials"] == 0  # nothing drawn at random
    else:
        assert sampler["name"] in ("tpe", "nsga2", "gp") and 1 <= sampler["n_startup_trials"] < plan["num_samples"]
    estimate = plan["estimate"]
    assert estimate["available"] and estimate["assumptions"]
    f = estimate["flops_per_trial"]
    assert 0 < f["min"] <= f["mean"] <= f["max"]
    assert 0 < estimate["sweep_flops"]["expected"] <= estimate["sweep_flops"]["upper_bound"]
    assert estimate["device_hours"]
    # The number of trials at once the sweep will use (issue 19): an integer, never "unbounded"; the CIFAR
    # spaces state the 10 the shipped clusters hold (tests/test_concurrency.py), the others get this machine's.
    assert isinstance(plan["max_concurrent_trials"], int) and plan["max_concurrent_trials"] > 0
    if path.stem.startswith(("cifar", "study_methods_cifar")):
        assert plan["max_concurrent_trials"] == 10 and "stated cap 10" in plan["max_concurrent_trials_source"]
    else:
        assert "this machine" in plan["max_concurrent_trials_source"]
    text = format_plan(describe_plan(load_search_space(path)))
    startup = "every combination" if sampler["name"] == "grid" else "random start-up trials"
    assert f"trials       {plan['num_samples']}, at most {plan['max_concurrent_trials']} at once: " in text
    assert startup in text
    assert f"scheduler    {plan['scheduler']['name']}" in text and "per full trial" in text
    # numbers for people: costs in GPU-hours (or minutes of a CPU), integer ranges as integers, no FLOP counts
    assert ("GPU-h per full trial" in text) == (plan["resources"]["gpus_per_worker"] > 0)
    assert "FLOP" not in text.split("assumptions")[0] and not re.search(r"int \[\d+\.0", text)


def test_dry_run_answers_will_this_start(tmp_path):
    """`--space cifar10_resnet18 --dry-run` on a machine without CIFAR-10 or a teacher: every preflight check
    runs and is reported, the missing data names its key and fix, the exit status says it would not start;
    no Ray, nothing written."""
    proc = dry_run(tmp_path, "--space", "cifar10_resnet18")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    checks = {}
    block = proc.stdout[proc.stdout.index("\npreflight") + 1 :]
    for line in block.splitlines():
        status, text = re.fullmatch(r"(?:preflight)? +(ok|FAILED|not run) +(.*)", line).groups()
        checks[text.split(":", 1)[0]] = (status, text)
    assert checks["data.root"][0] == "FAILED" and "fix: --set data.root=" in checks["data.root"][1]
    assert checks["teacher.checkpoint is empty but adaad, advfunmatch, ard, rslad distil a teacher"][0] == "FAILED"
    assert "--set teacher.checkpoint=" in proc.stdout
    for name in ("ray", "name", "optuna", "storage", "tracking", "resources"):
        assert name in checks, proc.stdout
    assert checks["storage"][0] == checks["tracking"][0] == "ok"
    assert checks["resources"][0] == ("ok" if torch.cuda.is_available() else "FAILED")
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --dry-run: ") and "(data, teacher" in err
    assert "would not start" in err and list(tmp_path.iterdir()) == []
    # the plan for people: an l_inf budget on CIFAR in 255ths, integer ranges as integers, GPU-hours
    assert "attack.eps uniform [5.99/255, 10/255]" in proc.stdout and "at eps 8/255" in proc.stdout
    assert "attack.steps int [5, 10]" in proc.stdout and "GPU-h per full trial" in proc.stdout


def test_dry_run_reports_a_bad_space_like_a_real_run(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: {attack.eps: {uniform: [0.2, 0.1]}}\n")
    assert sweep_main(["--dry-run", "--space", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "uniform needs low < high" in err


def test_flop_accounting_matches_clusters_readme():
    """clusters/README.md's assumed trial: CIFAR-10, ResNet-18 student (1.1 GFLOPs), WRN-34-10
    teacher (13.3 GFLOPs), PGD-10: 305 and 42 GFLOPs per image and epoch; ~2.8 PFLOPs to evaluate
    500 images (the formulas' 1-3% difference is the README's rounding)."""
    cfg = from_flat(
        {
            "data.name": "cifar10",
            "student.arch": "resnet18",
            "teacher.arch": "wrn34_10",
            "student.width": 0,
            "teacher.width": 0,
            "eval.samples": 500,
        }
    )
    shapes = dataset_shapes(cfg)
    f_s = forward_flops("resnet18", 0, 0, shapes)
    f_t = forward_flops("wrn34_10", 0, 0, shapes)
    assert f_s == pytest.approx(1.1e9, rel=0.02) and f_t == pytest.approx(13.3e9, rel=0.02)
    assert train_flops_per_image("advfunmatch", 10, f_s, f_t) == pytest.approx(305e9, rel=0.02)
    assert train_flops_per_image("rslad", 10, f_s, f_t) == pytest.approx(42e9, rel=0.02)
    assert 500 * eval_flops_per_image(("clean", "pgd20", "cw", "aa"), f_s) == pytest.approx(2.8e15, rel=0.05)
    flops = trial_flops(cfg, {"advfunmatch": 1.0}, 10, epochs=30)
    assert flops["train_flops_per_epoch"] == pytest.approx(305e9 * shapes.train_images, rel=0.02)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_formula_matches_counted_flops_of_a_real_step(method):
    bench_measure = _benchmark("bench_measure")
    torch.manual_seed(0)
    kw = dict(num_classes=10, in_channels=1, mean=(0.5,), std=(0.5,))
    student = build_model("small_cnn", width=4, **kw)
    teacher = build_model("small_cnn", width=8, **kw).eval().requires_grad_(False)
    x = torch.rand(4, 1, 8, 8)
    y = torch.nn.functional.one_hot(torch.arange(4) % 10, 10).float()
    f_s = bench_measure.count_flops(lambda: student(x[:1]))
    f_t = bench_measure.count_flops(lambda: teacher(x[:1]))
    m = build_method(method)
    attack = AttackSpec(eps=0.1, step_size=0.025, steps=5, norm="linf", random_start="default")
    counted = bench_measure.count_flops(lambda: m(student, teacher, x, y, attack)["loss"].backward()) / len(x)
    # Losses and softmaxes are not counted by either; convolutions and matmuls are all of it.
    assert counted == pytest.approx(train_flops_per_image(method, 5, f_s, f_t), rel=0.02)


@pytest.mark.parametrize("method", ["advfunmatch", "akd"])
def test_each_ensemble_member_adds_its_flops(method):
    """An ensemble of two teachers costs 2 F_T wherever one teacher costs F_T (counted on a real step),
    and the dry run's estimate counts it."""
    bench_measure = _benchmark("bench_measure")
    torch.manual_seed(0)
    kw = dict(num_classes=10, in_channels=1, mean=(0.5,), std=(0.5,))
    student = build_model("small_cnn", width=4, **kw)
    members = [build_model("small_cnn", width=8, **kw).eval().requires_grad_(False) for _ in range(2)]
    x = torch.rand(4, 1, 8, 8)
    y = torch.nn.functional.one_hot(torch.arange(4) % 10, 10).float()
    f_s = bench_measure.count_flops(lambda: student(x[:1]))
    f_t = bench_measure.count_flops(lambda: members[0](x[:1]))
    m = build_method(method)
    ensemble = TeacherEnsemble(members, m.tau).eval()
    attack = AttackSpec(eps=0.1, step_size=0.025, steps=5, norm="linf", random_start="default")
    counted = bench_measure.count_flops(lambda: m(student, ensemble, x, y, attack)["loss"].backward()) / len(x)
    assert counted == pytest.approx(train_flops_per_image(method, 5, f_s, 2 * f_t), rel=0.02)

    one = from_flat({"data.name": "digits", "method.name": method, "teacher.checkpoint": "a.pt"})
    two = from_flat({"data.name": "digits", "method.name": method, "teacher.checkpoint": "a.pt,b.pt"})
    single, pair = trial_flops(one, {method: 1.0}, 5), trial_flops(two, {method: 1.0}, 5)
    assert pair["teachers"] == 2 and pair["teacher_forward_flops"] == 2 * single["teacher_forward_flops"]
    per_image = train_flops_per_image(method, 5, single["student_forward_flops"], pair["teacher_forward_flops"])
    assert pair["train_flops_per_epoch"] == pytest.approx(per_image * pair["train_images"])


def test_dry_run_shows_the_ensemble_and_the_student_choice(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(
        "fixed: {data.name: digits, method.name: akd, teacher.checkpoint: 'a.pt,b.pt', student.select: best_pgd, "
        "student.average: swa}\nsearch: {attack.eps: {uniform: [0.05, 0.1]}}\nnum_samples: 2\n"
    )
    # The plan is printed whole; the preflight then says the two checkpoints do not exist (exit 2).
    code = sweep_main(["--dry-run", "--space", str(space)])
    out = capsys.readouterr().out
    assert code == 2 and "FAILED   teacher.checkpoint: nothing at 'a.pt'" in out
    assert "teacher      a.pt,b.pt, teacher.select last; an ensemble of 2 (the mean of their probabilities): 2 x" in out
    assert "student      select best_pgd, average swa" in out


def _benchmark(name: str):
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)
