"""The plain tables of afm_ray.names (what config.py validates against without importing torch) agree
with the registries that build the real things, and the public API resolves."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import afm_ray
from afm_ray import names
from afm_ray.augment import BatchAugment
from afm_ray.methods import METHODS
from afm_ray.models import MODELS


def test_method_table_matches_the_methods():
    assert names.METHODS == tuple(METHODS)
    for name, cls in METHODS.items():
        assert names.METHOD_HPARAMS[name] == tuple(f.name for f in dataclasses.fields(cls)), name
        assert names.needs_teacher(name) == cls.needs_teacher, name
    assert set(names.HPARAM_NAMES) == {h for hparams in names.METHOD_HPARAMS.values() for h in hparams}


def test_model_table_matches_the_registry():
    assert names.MODELS == tuple(MODELS)


@pytest.mark.parametrize("policy", names.AUGMENT_POLICIES)
def test_every_policy_name_builds(policy):
    BatchAugment(policy, image_shape=(3, 8, 8), num_classes=10)


def test_objectives_round_trip_and_refuse_bad_specs():
    objectives = names.Objective.parse_all("clean_acc:max,aa_acc:max")
    assert objectives == names.DEFAULT_OBJECTIVES
    assert names.Objective.parse_all(names.Objective.join(objectives)) == objectives
    for bad in ("aa_acc", "aa_acc:up", ":max", "", "a:max,a:min"):
        with pytest.raises(ValueError):
            names.Objective.parse_all(bad)


def test_the_typed_config_imports_no_ml_library():
    code = (
        "import afm_ray.config, sys; print(sorted(m for m in ('torch', 'kornia', 'ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_resolves_to_the_owning_modules():
    for name in afm_ray.__all__:
        assert getattr(afm_ray, name) is not None
    assert afm_ray.fetch_student.__module__ == "afm_ray.tracking.student_model"
    with pytest.raises(AttributeError):
        afm_ray.no_such_thing  # noqa: B018
