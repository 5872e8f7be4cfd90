"""The benchmark's core runs end to end on a tiny shape and writes its record (CPU, seconds).
No timing assertions: only that every measurement is there and well formed."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from afm_ray.config import RunConfig
from afm_ray.devices import amp_dtype_for
from afm_ray.methods import METHODS as ALL_METHODS
from afm_ray.methods import build_method


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py: scripts beside the package, not in it, so imported from their folder."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


bench = load_benchmark("bench")
BenchConfig, BenchReport, bench_methods = bench.BenchConfig, bench.BenchReport, bench.bench_methods
count_flops, machine_info, to_markdown = bench.count_flops, bench.machine_info, bench.to_markdown

TINY = BenchConfig(
    student="small_cnn",
    student_width=4,
    teacher="small_cnn",
    teacher_width=8,
    batch_size=8,
    steps=1,
    image_size=8,
    channels=1,
    eps=0.1,
    iters=1,
    warmup=0,
)
METHODS = ("advfunmatch", "pgd_at")  # one with a teacher in the attack, one without a teacher


@pytest.fixture(scope="module")
def rows() -> list[bench.StepRow]:
    return bench_methods(TINY, METHODS, peak_flops=1e9, control="funmatch")


def test_rows_have_positive_throughput_ratio_and_flops(rows):
    assert [r.method for r in rows] == [*METHODS, "A/A control: funmatch ours vs ours"]
    assert [r.control for r in rows] == [False, False, True]
    for r in rows:
        assert r.batch == 8
        assert r.ours_ips > 0 and r.ref_ips > 0
        assert math.isfinite(r.ratio) and r.ratio > 0
        assert r.ratio_q1 <= r.ratio_q3
        assert r.ours_flops > 0 and r.ref_flops > 0
        assert r.ours_flops_per_s > 0 and r.peak_fraction > 0
        assert r.ours_peak_mib >= 0 and r.ref_peak_mib >= 0
    assert rows[0].teacher == "small_cnn-w8" and rows[1].teacher == "-"


def test_reference_does_at_least_our_work(rows):
    # The reference computes the same math plus parameter gradients in its attack step; the
    # A/A control runs our step twice.
    for r in rows[:2]:
        assert r.ref_flops >= r.ours_flops
    assert rows[2].ref_flops == rows[2].ours_flops


def test_markdown_names_the_machine_and_has_the_table(rows):
    machine = machine_info(torch.device("cpu"))
    machine.peak_flops, machine.peak_source, machine.memory_method = 1e9, "test", "test"
    text = to_markdown(BenchReport(config=TINY, machine=machine, rows=rows))
    assert text.startswith("# afm-ray performance record")
    machine_line = next(line for line in text.splitlines() if line.startswith("Machine: "))
    assert machine.name in machine_line and f"torch {torch.__version__}" in machine_line
    assert "| method | student / teacher | batch | ours img/s | reference img/s | ours / ref |" in text
    table = [line for line in text.splitlines() if line.startswith("| advfunmatch") or line.startswith("| pgd_at")]
    assert len(table) == 2 and all(line.count("|") == 15 for line in table)  # 14 columns on CPU
    assert "| A/A control: funmatch ours vs ours |" in text and "Within the noise of the A/A control" in text


def test_count_flops_survives_input_gradients():
    # FlopCounterMode's module tracker breaks autograd.grad on a leaf input (pytorch#131753);
    # count_flops must not.
    model = torch.nn.Linear(5, 3)
    x = torch.randn(4, 5, requires_grad=True)
    assert count_flops(lambda: torch.autograd.grad(model(x).sum(), x)) == 2 * (2 * 4 * 5 * 3)


def test_cli_options_resolve_to_the_cpu_defaults_and_overrides():
    args = bench.build_parser().parse_args(["--student", "resnet18", "--batch-sizes", "16,32", "--methods", "rslad"])
    cfg, batches = bench.config_from_args(args, torch.device("cpu"))
    assert batches == [16, 32] and cfg.batch_size == 16
    assert cfg.student == "resnet18" and cfg.student_width is None  # the CPU width-16 is small_cnn's
    assert cfg.teacher == "small_cnn" and cfg.teacher_width == 64
    assert args.methods == ["rslad"]
    # Unset switches follow training's defaults, so the bench times the step training runs.
    assert cfg.amp == ("bf16" if amp_dtype_for("auto", torch.device("cpu")) else "off")
    assert cfg.channels_last is RunConfig.channels_last and cfg.compile is RunConfig.compile
    off = bench.build_parser().parse_args(["--amp", "off", "--no-channels-last"])
    cfg_off, _ = bench.config_from_args(off, torch.device("cpu"))
    assert cfg_off.amp == "off" and not cfg_off.channels_last


def test_cli_with_two_students_writes_one_record(tmp_path):
    out = tmp_path / "bench.md"
    argv = [
        "--student",
        "small_cnn,mobilenet_v2",
        "--teacher-width",
        "8",
        "--methods",
        "pgd_at",
        "--batch-sizes",
        "8",
        "--steps",
        "1",
        "--image-size",
        "8",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--no-augment",
        "--control",
        "none",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert bench.main(argv) == 0
    text = out.read_text()
    assert "Shapes: student small_cnn-w16, mobilenet_v2, teacher" in text  # each at its own default width
    assert (
        text.count("| pgd_at | small_cnn-w16 / - | 8 |") == 1 and text.count("| pgd_at | mobilenet_v2 / - | 8 |") == 1
    )


@pytest.mark.parametrize("name", list(ALL_METHODS))
def test_reference_computes_the_methods_math(name):
    # The reference keeps its attack objectives and forwards apart from afm_ray.methods on purpose
    # (bench.py's docstring); this pins them to the same math, so the two cannot drift apart.
    steps = load_benchmark("bench_steps")
    assert set(steps.OFFICIAL_OUTER) == set(steps.REFERENCE_NOTES) == set(ALL_METHODS)
    student, teacher = steps.build_models(TINY, torch.device("cpu"))
    method = build_method(name)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, *TINY.image_shape, generator=g)
    y = torch.randint(0, TINY.num_classes, (8,), generator=g)
    x_adv = (x + TINY.eps * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
    # A fresh student's BatchNorm statistics (mean 0, variance 1) make its eval-mode outputs almost
    # constant and TRADES's KL a roundoff-level number: one cumulative-average pass sets this batch's.
    for module in student.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        teacher_logits = teacher(x)
        student(x)
    if method.uses_attack:
        student.eval()
        ref = steps.reference_attack_objective(name, method, student, teacher, x, y, teacher_logits)
        ours = method.inner_objective(student, teacher, x, y, teacher_logits)
        z = x_adv.clone().requires_grad_()
        ref_value, ours_value = ref(z), ours(z)
        # The two write the same KL differently: they differ by fp32 roundoff, about 1e-6 of the value.
        torch.testing.assert_close(ref_value, ours_value, rtol=1e-4, atol=0)
        (ref_grad,), (ours_grad,) = torch.autograd.grad(ref_value, z), torch.autograd.grad(ours_value, z)
        torch.testing.assert_close(ref_grad, ours_grad, rtol=1e-4, atol=1e-4 * ours_grad.abs().max().item())
    student.train()
    ref_loss = steps.reference_outer_loss(name, method, student, teacher, x, x_adv, y, teacher_logits)["loss"]
    ours_loss = method.outer_loss(student, x, x_adv, y, teacher, teacher_logits)["loss"]
    torch.testing.assert_close(ref_loss, ours_loss, rtol=1e-4, atol=0)
