"""afm_ray.display: the numbers a sweep, its dry run and the pareto table show people."""

from __future__ import annotations

import pandas as pd

from afm_ray.display import config_text, duration_text, eps_text, gpu_hours_text, value_text
from afm_ray.names import Objective
from afm_ray.pareto.ranking import rank_trials
from afm_ray.pareto.report import format_table


def test_a_sweep_line_reads_like_a_person_wrote_it():
    # the line: attack.eps=0.11229104045470858 and method.tau=None for PGD-AT, no lr, no weight decay
    config = {
        "method.name": "pgd_at",
        "data.name": "mnist5k",
        "attack.eps": 0.11229104045470858,
        "attack.steps": 3,
        "method.tau": None,
        "optim.lr": 0.051234567,
        "optim.weight_decay": 0.000234567,
    }
    keys = ("method.name", "attack.eps", "attack.steps", "method.tau", "optim.lr", "optim.weight_decay")
    assert config_text(config, keys) == (
        "method.name=pgd_at  attack.eps=0.1123  attack.steps=3  optim.lr=0.05123  optim.weight_decay=0.0002346"
    )
    # a method that has no tau does not show one even when a value rides along
    assert "tau" not in config_text({**config, "method.tau": 2.0}, keys)
    assert "method.tau=2" in config_text({**config, "method.name": "rslad", "method.tau": 2.0}, keys)


def test_budgets_read_in_their_unit():
    assert eps_text(8 / 255, "cifar10") == "8/255" and eps_text(0.0235, "cifar100") == "5.99/255"
    assert eps_text(0.1, "mnist5k") == "0.1" and eps_text(0.5, "cifar10", norm="l2") == "0.5"
    assert value_text("attack.eps", "0.03137254901960784", "cifar10") == "8/255"
    assert value_text("attack.steps", 4.0) == "4" and value_text("attack.steps", "10") == "10"
    assert value_text("augment.policy", "crop_flip") == "crop_flip"


def test_durations_and_gpu_hours():
    assert [duration_text(s) for s in (40, 145, 600, 3 * 3600, 20 * 3600, 3 * 86400)] == [
        "40 s",
        "2.4 min",
        "10 min",
        "3 h",
        "20 h",
        "3 days",
    ]
    assert [gpu_hours_text(h) for h in (0.52, 9.48, 42.4, 1822)] == [
        "0.52 GPU-h",
        "9.5 GPU-h",
        "42 GPU-h",
        "1,822 GPU-h",
    ]


def test_pareto_table_shows_no_tau_for_a_method_without_one():
    trials = pd.DataFrame(
        {
            "run_id": ["a" * 32, "b" * 32],
            "status": ["FINISHED"] * 2,
            "start_time": [1, 2],
            "tags.afm_ray.trial_status": ["completed"] * 2,
            "tags.afm_ray.trial_id": ["917f2149", "03cb4c0e"],
            "metrics.aa_acc": [0.5, 0.4],
            "metrics.clean_acc": [0.8, 0.9],
            "params.method.name": ["pgd_at", "rslad"],
            "params.method.tau": ["None", "2.5"],
            "params.attack.eps": ["0.03137254901960784", "0.0235"],
            "params.data.name": ["cifar10"] * 2,
        }
    )
    table = format_table(
        rank_trials(trials, [Objective("aa_acc", "max"), Objective("clean_acc", "max")]), ["aa_acc:max"]
    )
    rows = {line.split()[2]: line.split() for line in table.splitlines()[2:]}
    assert rows["917f2149"][3:6] == ["pgd_at", "8/255", "-"] and rows["03cb4c0e"][3:6] == ["rslad", "5.99/255", "2.5"]
    assert "None" not in table
