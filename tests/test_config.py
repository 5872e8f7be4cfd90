"""Config: YAML / overrides in, flat dotted dict out; every bad value is one clear error."""

import pytest

from afm_ray.cli import load_config
from afm_ray.config import ConfigError, ExperimentConfig, from_flat, parse_overrides, to_flat, valid_keys


def test_defaults_round_trip_through_flat_strings():
    cfg = ExperimentConfig()
    flat = to_flat(from_flat({}))
    assert flat == to_flat(cfg)
    # MLflow gives params back as strings: a run is re-runnable from them alone.
    assert from_flat({k: str(v) for k, v in flat.items()}) == cfg


def test_every_key_is_dotted_section_field():
    assert "attack.eps" in valid_keys() and "method.tau" in valid_keys()
    assert all(k.count(".") == 1 for k in valid_keys())


def test_yaml_nested_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("attack:\n  eps: 8/255\n  steps: 5\nmethod:\n  name: rslad\n")
    cfg = load_config(path, ["optim.lr=0.05", "augment.policy=autoaugment+cutmix"])
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.attack.steps == 5 and cfg.method.name == "rslad"
    assert cfg.optim.lr == 0.05 and cfg.augment.policy == "autoaugment+cutmix"


def test_derived_values():
    cfg = from_flat({"data.name": "cifar10"})
    assert cfg.train_eps == pytest.approx(8 / 255) and cfg.train_step_size == pytest.approx(2 / 255)
    assert from_flat({"attack.eps": 0.2}).eval_eps == 0.1  # evaluation budget is fixed per dataset
    assert from_flat({"eval.attacks": "clean, aa"}).eval_attacks == ("clean", "aa")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"attack.epss": 0.1}, "unknown config key 'attack.epss'; did you mean 'attack.eps'?"),
        ({"attack.eps": -0.1}, "attack.eps: got -0.1, expected eps >= 0"),
        ({"attack.steps": -1}, "attack.steps: got -1, expected steps >= 0"),
        ({"attack.steps": 2.5}, "attack.steps: got 2.5, expected an integer"),
        ({"method.tau": 0}, "method.tau: got 0.0, expected tau > 0"),
        ({"augment.policy": "autoaugmnt"}, "augment.policy:"),
        ({"method.name": "advfunmatchh"}, "method.name: unknown value 'advfunmatchh'"),
        ({"method.name": "pgd_at", "method.tau": 2.0}, "method.tau: pgd_at has no hyperparameter 'tau'"),
        ({"student.arch": "vit"}, "student.arch: unknown value 'vit'"),
        ({"optim.lr": "fast"}, "optim.lr: got 'fast', expected a number"),
        ({"run.amp": "fp8"}, "run.amp: unknown value 'fp8'"),
        ({"eval.attacks": "clean,pgd50"}, "eval.attacks: unknown value 'pgd50'"),
        ({"optim.warmup_epochs": 20, "optim.epochs": 10}, "optim.warmup_epochs: got 20"),
    ],
)
def test_bad_values_are_one_line_errors(values, message):
    with pytest.raises(ConfigError) as err:
        from_flat(values)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["attack.eps"])


def test_missing_yaml_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_off_stays_a_word_for_string_keys():
    # YAML 1.1 turns a bare `off` into False; a string key gets the word back.
    assert load_config(None, ["run.amp=off"]).run.amp == "off"
    assert from_flat({"run.amp": False}).run.amp == "off"


def test_strict_yaml_allows_merge_overrides_but_not_repeated_keys(tmp_path):
    from afm_ray.yaml_loading import parse_yaml

    # A merge (<<) brings keys a mapping may override: YAML's intent, not a repeated key.
    merged = parse_yaml("base: &b {eps: 0.1, steps: 3}\nattack:\n  <<: *b\n  eps: 0.2\n", "x.yaml")
    assert merged["attack"] == {"eps": 0.2, "steps": 3}
    with pytest.raises(ConfigError, match=r"x.yaml: not valid YAML at line 3, column 3: key 'eps' is given twice"):
        parse_yaml("attack:\n  eps: 0.1\n  eps: 0.2\n", "x.yaml")
    path = tmp_path / "c.yaml"
    path.write_text("\ufeffattack:\n  eps: 0.05\n", encoding="utf-8")  # a byte-order mark is still UTF-8
    assert load_config(path).attack.eps == 0.05
    # 10^5 nodes is the bound: a config of a few hundred keys is far below, a bomb far above
    wide = "a: &a [" + ", ".join(["1"] * 400) + "]\nb: [" + ", ".join(["*a"] * 400) + "]\n"
    with pytest.raises(ConfigError, match="expand to more than 100,000 values"):
        parse_yaml(wide, "wide.yaml")
