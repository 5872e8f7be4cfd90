"""Search spaces are validated before anything is reserved; suggestions reach the config."""

from pathlib import Path

import optuna
import pytest
import yaml

from afm_ray import names
from afm_ray.config import ConfigError, from_flat
from afm_ray.search.space import load_search_space, parse_search_space, read_space_text, shipped_spaces

SPACES = sorted((Path(__file__).parent.parent / "afm_ray" / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_shipped_spaces_are_valid_and_documented(path):
    space = load_search_space(path)
    assert space.description and space.num_samples >= 1
    text = path.read_text()
    assert text.lstrip().startswith("#"), "each space says what it is for and what it expects"


def test_shipped_spaces_load_by_name():
    """`--space NAME` loads a space shipped in the package (importlib.resources), and says so."""
    assert shipped_spaces() == [p.stem for p in SPACES] and "default" in shipped_spaces()
    for path in SPACES:
        by_name = load_search_space(path.stem)
        assert by_name.path == path.stem and by_name.source == path.read_text()
        assert by_name.fixed == load_search_space(path).fixed
    assert load_search_space("cifar10_resnet18.yaml").path == "cifar10_resnet18"
    assert read_space_text("default")[0] == load_search_space().source  # no argument: the embedded default


@pytest.mark.parametrize(
    "given, message",
    [
        ("cifar10_resnet", r"'cifar10_resnet' is neither a file nor a shipped space \(cifar100_mobilenetv2, "),
        ("spaces/cifar10_resnet18.yaml", r"did you mean --space cifar10_resnet18\?"),
    ],
)
def test_unknown_space_names_the_shipped_ones(given, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such file here
    with pytest.raises(ConfigError, match=message):
        load_search_space(given)


def test_default_space_meets_the_main_job_contract():
    space = load_search_space("default")
    keys = {d.key for d in space.search}
    assert {"attack.eps", "attack.steps", "method.tau", "augment.policy", "method.name", "optim.lr"} <= keys
    assert space.num_samples >= 6
    assert [o.metric for o in space.objectives] == ["clean_acc", "aa_acc"]


BASE = {
    "fixed": {"data.name": "digits"},
    "search": {
        "method.name": {"choice": ["advfunmatch", "pgd_at"]},
        "attack.eps": {"uniform": [0.05, 0.2]},
        "attack.steps": {"int": [1, 5]},
        "method.tau": {"loguniform": [1, 10], "when": {"method.name": ["advfunmatch"]}},
    },
}


def test_define_by_run_suggests_conditional_keys_only_when_they_apply():
    space = parse_search_space(BASE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        constants = space.define_by_run()(trial)
        config = {**space.fixed, **trial.params}  # what a trial's worker config is
        assert constants == {"data.name": "digits"}
        assert ("method.tau" in config) == (config["method.name"] == "advfunmatch")
        from_flat(config)  # every suggestion is a valid worker config
        seen.add(config["method.name"])
        study.tell(trial, 0.0)
    assert seen == {"advfunmatch", "pgd_at"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"searh": {}}, "unknown top-level key 'searh'; did you mean 'search'?"),
        ({"search": {"attack.epsilon": {"uniform": [0, 1]}}}, "unknown config key 'attack.epsilon'"),
        ({"search": {"attack.eps": {"uniform": [0.2, 0.1]}}}, "uniform needs low < high"),
        ({"search": {"attack.eps": {"normal": [0.2, 0.1]}}}, "unknown field 'normal'"),
        ({"search": {"attack.eps": {"uniform": [-0.1, 0.1]}}}, "attack.eps: got -0.1, expected eps >= 0"),
        ({"search": {"attack.steps": {"int": [-2, 3]}}}, "attack.steps: got -2, expected steps >= 0"),
        ({"search": {"augment.policy": {"choice": []}}}, "choice needs a non-empty list"),
        (
            {"search": {"augment.policy": {"choice": ["crop_flip", "autoaugmnt"]}}},
            "search.augment.policy = 'autoaugmnt'",
        ),
        ({"search": {"method.tau": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
        (
            {"search": {"method.tau": {"uniform": [1, 2], "when": {"method.nam": ["rslad"]}}}},
            "when refers to 'method.nam'",
        ),
        ({"objectives": [{"metric": "robust_acc", "mode": "max"}]}, "unknown objective metric 'robust_acc'"),
        ({"objectives": [{"metric": "aa_acc", "mode": "up"}]}, "mode 'up'; expected max or min"),
        ({"scheduler": {"name": "asha"}}, "asha needs a single objective"),
        ({"scheduler": {"name": "mo_asha", "margin": -0.1}}, "scheduler.margin must be an accuracy difference"),
        (
            {"scheduler": {"name": "asha", "metric": "val/pgd10_acc", "margin": 0.03}},
            "unknown scheduler field 'margin'",
        ),
        ({"resources": {"num_workers": 0}}, "resources.num_workers: expected an integer >= 1"),
        ({"fixed": {"attack.eps": 0.1}, "search": {"attack.eps": {"uniform": [0, 1]}}}, "both fixed and searched"),
        ({"num_samples": 0}, "num_samples: expected an integer >= 1"),
    ],
)
def test_bad_spaces_fail_with_one_clear_line(change, message):
    raw = {**yaml.safe_load(yaml.safe_dump(BASE)), **change}
    with pytest.raises(ConfigError) as err:
        parse_search_space(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_overrides_pin_searched_keys():
    space = parse_search_space(BASE, overrides={"attack.eps": 0.1})
    assert "attack.eps" not in {d.key for d in space.search}
    assert space.fixed["attack.eps"] == 0.1


GRID = {
    "fixed": {"data.name": "digits"},
    "search": {
        "method.name": {"choice": ["advfunmatch", "rslad", "pgd_at"]},
        "augment.policy": {"choice": ["crop_flip", "autoaugment+cutmix"], "when": {"method.name": ["advfunmatch"]}},
        "run.seed": {"int": [0, 2]},
    },
    "sampler": {"name": "grid"},
}


def test_grid_points_follow_the_conditions():
    from afm_ray.search.space import grid_points

    space = parse_search_space(GRID)
    points = grid_points(space.search, space.fixed)
    # advfunmatch x 2 policies x 3 seeds + (rslad, pgd_at) x 3 seeds: the policy varies only where it applies
    assert len(points) == 6 + 6 == space.num_samples
    assert {"method.name": "rslad", "run.seed": 1} in points
    assert {"method.name": "advfunmatch", "augment.policy": "autoaugment+cutmix", "run.seed": 2} in points


def test_grid_sampler_runs_every_point_once_through_tune_searcher():
    """Ray Tune's OptunaSearch with the grid sampler, trials asked 3 at a time as a sweep runs them in
    parallel: each point exactly once, none missing."""
    from ray.tune.search.optuna import OptunaSearch

    from afm_ray.search.samplers import build_sampler
    from afm_ray.search.space import grid_points

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = parse_search_space(GRID)
    searcher = OptunaSearch(
        space=space.define_by_run(),
        metric=["clean_acc", "aa_acc"],
        mode=["max", "max"],
        sampler=build_sampler(space.sampler, space.seed),
    )
    asked = []
    for i in range(space.num_samples):
        asked.append(searcher.suggest(f"t{i}"))
        if i % 3 == 2:  # three in flight, then they finish
            for j in range(i - 2, i + 1):
                searcher.on_trial_complete(f"t{j}", {"clean_acc": 0.9, "aa_acc": 0.5, names.FINAL_RESULT_FLAG: 1.0})
    keys = [{k: v for k, v in a.items() if k in ("method.name", "augment.policy", "run.seed")} for a in asked]
    expected = grid_points(space.search, space.fixed)
    assert len(keys) == len(expected) and all(k in keys for k in expected)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"search": {"optim.lr": {"loguniform": [0.01, 0.1]}}}, "grid sampler needs finitely many values"),
        ({"search": {"attack.eps": {"uniform": [0.05, 0.1]}}}, "got uniform without step"),
        ({"num_samples": 13}, "num_samples 13 exceeds the 12 points of the grid"),
    ],
)
def test_grid_errors(change, message):
    raw = {**GRID, **change, "search": {**GRID["search"], **change.get("search", {})}}
    with pytest.raises(ConfigError, match=message):
        parse_search_space(raw)
