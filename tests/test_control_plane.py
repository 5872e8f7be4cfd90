"""benchmarks/control_plane.py end to end at tiny sizes: its Optuna part (afm_ray's default sampler on
an Optuna SQLite study) writes the figures docs/control_plane_cpu.md is built from. The other parts
need one real training run (minutes on a shared CPU) or a Ray cluster, so they are not exercised here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import control_plane  # noqa: E402

FIELDS = {"ask_ms", "tell_ms", "ask_cpu_ms", "tell_cpu_ms", "ask_tell_cpu_ms", "server_cpu_ms", "cumulative_s"}


def test_optuna_part_records_each_size(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    out.write_text(json.dumps({"kept": 1}))  # figures are merged into what the file holds
    argv = ["--backends", "sqlite", "--parts", "optuna", "--optuna-trials", "4,8", "--json", str(out)]
    assert control_plane.main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["kept"] == 1
    assert set(figures["versions"]) == {"optuna", "mlflow", "ray", "sqlalchemy"}
    assert "CPUs" in figures["machine"]
    optuna_part = figures["sqlite"]["optuna"]
    assert set(optuna_part) == {"4", "8"}  # trials 3..8 use TPE's model (2 start-up trials at 8)
    for size in ("4", "8"):
        assert set(optuna_part[size]) == FIELDS
        assert optuna_part[size]["ask_ms"] > 0 and optuna_part[size]["ask_tell_cpu_ms"] > 0
        assert optuna_part[size]["server_cpu_ms"] == 0  # SQLite: no server
    assert optuna_part["8"]["cumulative_s"] > optuna_part["4"]["cumulative_s"]
    assert "mlflow" not in figures["sqlite"] and "postgresql" not in figures
    assert not list(tmp_path.glob("*.db"))  # the stores live in the script's own temporary folder
