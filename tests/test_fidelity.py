"""The run-level fast-path fidelity benchmark (benchmarks/fidelity.py): its statistics and its CLI."""

import importlib
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from afm_ray.config import ConfigError


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py: scripts beside the package, not in it, so imported from their folder."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


fidelity = load_benchmark("fidelity")
RunResult, main, paths, summarize, within_noise = (
    fidelity.RunResult,
    fidelity.main,
    fidelity.paths,
    fidelity.summarize,
    fidelity.within_noise,
)


def result(path: str, seed: int, acc: float) -> RunResult:
    return RunResult(path, seed, {"clean_acc": acc}, 100.0, 1.0)


def test_summary_is_the_difference_of_means_and_its_standard_error():
    runs = [result("fp32", 0, 0.90), result("fp32", 1, 0.92), result("fast", 0, 0.91), result("fast", 1, 0.95)]
    s = summarize(runs, "clean_acc")
    assert s["fp32_mean"] == pytest.approx(0.91) and s["fast_mean"] == pytest.approx(0.93)
    assert s["fp32_std"] == pytest.approx(math.sqrt(2) * 0.01) and s["fast_std"] == pytest.approx(math.sqrt(2) * 0.02)
    assert s["diff"] == pytest.approx(0.02)
    assert s["diff_se"] == pytest.approx(math.sqrt((0.0002 + 0.0008) / 2))  # sqrt(s1^2/n1 + s2^2/n2)
    assert within_noise(s)  # 0.02 <= 2 * 0.0224
    far = [result("fp32", 0, 0.90), result("fp32", 1, 0.91), result("fast", 0, 0.80), result("fast", 1, 0.81)]
    assert not within_noise(summarize(far, "clean_acc"))


def test_fast_path_must_change_something():
    assert paths(["run.amp=bf16"])["fast"] == {"run.amp": "bf16", "run.channels_last": False, "run.compile": False}
    with pytest.raises(ConfigError, match="turns nothing on"):
        paths(["run.amp=off"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "1"], "--seeds: got 1, expected >= 2"),
        (["--fast", "run.amp=fp8"], "run.amp"),
        (["--set", "attack.eps=-1"], "attack.eps: got -1.0"),
    ],
)
def test_cli_rejects_bad_input_before_training(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_record_from_two_tiny_seeds(tmp_path):
    out = tmp_path / "fidelity.md"
    tiny = [
        "method.name=pgd_at",
        "data.name=digits",
        "student.width=8",
        "optim.epochs=1",
        "optim.batch_size=64",
        "attack.steps=1",
        "eval.samples=64",
        "eval.val_samples=64",
    ]
    assert main(["--seeds", "2", "--out", str(out), *(a for kv in tiny for a in ("--set", kv))]) == 0
    text = out.read_text()
    assert text.count("| fp32 | ") == 2 and text.count("| fast | ") == 2
    assert "Fast path: run.amp=bf16, run.channels_last=True." in text
    assert "| clean_acc | " in text and "| pgd20_acc | " in text
    assert "within noise" in text or "DIFFERENT" in text
