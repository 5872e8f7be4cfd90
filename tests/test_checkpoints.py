"""A checkpoint rebuilds its model from the file alone: the data description it stores (classes,
image shape, normalisation) replaces the dataset, so the sweep's driver never loads one."""

from __future__ import annotations

import pytest
import torch

from afm_ray.checkpoints import DataSpec, load_model, load_training_state, save_training_state
from afm_ray.config import from_flat, to_flat
from afm_ray.data import load_run_data
from afm_ray.errors import CheckpointError
from afm_ray.models import build_model, model_kwargs
from afm_ray.train.loop import LocalReporter, train_fn_per_worker

CFG = from_flat({"data.name": "digits", "student.width": 4})


@pytest.fixture(scope="module")
def digits():
    return load_run_data(CFG)


def _student(data):
    torch.manual_seed(0)
    return build_model(CFG.student.arch, **model_kwargs(CFG.student, data))


def test_data_spec_round_trips_through_a_weights_only_checkpoint(tmp_path, digits):
    spec = DataSpec.of(digits)
    assert spec == DataSpec(10, (1, 8, 8), tuple(digits.mean), tuple(digits.std), "digits")
    save_training_state(tmp_path, model=_student(digits), config=to_flat(CFG), epoch=1, data=digits)
    stored = load_training_state(tmp_path)["data"]  # weights_only=True accepted it
    assert DataSpec.from_dict(stored) == spec
    with pytest.raises(ValueError, match="not a data description"):
        DataSpec.from_dict({"num_classes": 10})


def test_model_rebuilds_without_the_dataset(tmp_path, digits, monkeypatch):
    student = _student(digits).eval()
    save_training_state(tmp_path, model=student, config=to_flat(CFG), epoch=1, data=digits)
    monkeypatch.setattr("afm_ray.data.load_run_data", _no_dataset)  # proves none is read
    model, stored = load_model(tmp_path)
    x = torch.rand(5, 1, 8, 8)
    assert stored.student.arch == CFG.student.arch
    torch.testing.assert_close(model.eval()(x), student(x), rtol=0, atol=0)  # normalisation included


def test_checkpoint_without_a_description_is_refused_in_one_line(tmp_path, digits):
    save_training_state(tmp_path, model=_student(digits), config=to_flat(CFG), epoch=1)  # no data description
    with pytest.raises(CheckpointError, match="holds no data description"):
        load_model(tmp_path)


def test_training_writes_the_description(tmp_path):
    flat = {**to_flat(CFG), "method.name": "pgd_at", "optim.epochs": 1, "attack.steps": 1, "eval.attacks": "clean"}
    flat.update({"eval.samples": 32, "eval.val_samples": 32, "optim.batch_size": 128})
    reporter = LocalReporter(tmp_path, log=lambda line: None)
    train_fn_per_worker(flat, reporter)
    stored = DataSpec.from_dict(load_training_state(reporter.latest_checkpoint)["data"])
    assert stored.num_classes == 10 and stored.image_shape == (1, 8, 8) and stored.name == "digits"


def _no_dataset(cfg):
    raise AssertionError(f"load_model read the dataset {cfg.data.name}")
