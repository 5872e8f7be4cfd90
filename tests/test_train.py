"""The training function end to end in a plain process: teacher, student, checkpoints, resume."""

from pathlib import Path

import pytest
import torch

from afm_ray import checkpoints, names
from afm_ray.checkpoints import load_teacher
from afm_ray.config import ConfigError, from_flat
from afm_ray.data import load_run_data
from afm_ray.evaluate.protocol import evaluate_checkpoint
from afm_ray.teacher.training import ensure_teacher, teacher_cache_key
from afm_ray.train.__main__ import main as train_main
from afm_ray.train.loop import LocalReporter, train_fn_per_worker

TINY = {
    "data.name": "digits",
    "student.width": 8,
    "teacher.width": 16,
    "teacher.epochs": 2,
    "optim.epochs": 2,
    "optim.batch_size": 64,
    "attack.steps": 2,
    "eval.samples": 64,
    "eval.attacks": "clean,pgd20",
    "eval.val_samples": 64,
}


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    cfg = from_flat({**TINY, "teacher.cache_dir": str(tmp_path_factory.mktemp("teachers"))})
    return ensure_teacher(cfg, log=lambda line: None)


def test_teacher_is_cached_by_config_hash(teacher_path, tmp_path_factory):
    cache = str(Path(teacher_path).parent.parent)
    cfg = from_flat({**TINY, "teacher.cache_dir": cache})
    assert ensure_teacher(cfg, log=lambda line: None) == teacher_path  # reused, not retrained
    # What a sweep varies for the student never changes which teacher it is.
    assert teacher_cache_key(cfg) == teacher_cache_key(from_flat({**TINY, "attack.eps": 0.2, "optim.lr": 0.01}))
    assert teacher_cache_key(cfg) != teacher_cache_key(from_flat({**TINY, "teacher.epochs": 3}))


def test_teacher_is_robust_and_frozen(teacher_path):
    cfg = from_flat(TINY)
    data = load_run_data(cfg)
    teacher = load_teacher(teacher_path, data, cfg=cfg)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    scores = evaluate_checkpoint(teacher_path, cfg, attack_names=("clean", "pgd20"), samples=128, log=lambda line: None)
    assert scores["clean_acc"] > 0.5 and scores["pgd20_acc"] > 0.2  # well above chance (0.1)
    assert scores["pgd20_acc"] <= scores["clean_acc"]


def test_teacher_checkpoint_checks_architecture_and_classes(teacher_path, tmp_path):
    cfg = from_flat(TINY)
    data = load_run_data(cfg)
    with pytest.raises(ConfigError, match="holds a 'small_cnn' but teacher.arch is 'resnet18'"):
        load_teacher(teacher_path, data, cfg=from_flat({**TINY, "teacher.arch": "resnet18"}))
    # A bare state dict of the wrong class count names both counts.
    state = torch.load(teacher_path, weights_only=True)["model"]
    state = {k: (v[:5] if v.shape[:1] == (10,) else v) for k, v in state.items()}
    torch.save(state, tmp_path / "five.pt")
    with pytest.raises(ValueError, match="checkpoint has 5 classes, dataset digits has 10"):
        load_teacher(tmp_path / "five.pt", data, cfg=cfg)


def test_student_trains_reports_checkpoints_and_resumes(teacher_path, tmp_path, capsys):
    lines = []
    config = {**TINY, "teacher.checkpoint": str(teacher_path), "method.name": "advfunmatch"}
    reporter = LocalReporter(tmp_path / "run", log=lines.append)
    final = train_fn_per_worker(config, reporter)
    epochs = [line for line in lines if line.startswith("epoch=")]
    assert len(epochs) == 2 and all("val/pgd10_acc" in line and "train/kl_adv" in line for line in epochs)
    assert 0 <= final["pgd20_acc"] <= final["clean_acc"] <= 1 and final["params"] > 0
    # eval.batch_size 0 (default): chosen once, logged, and every attack reports its speed.
    assert 1 <= final["eval/batch_size"] <= 64
    assert "evaluation batch " in capsys.readouterr().out
    assert final["eval/pgd20_images_per_s"] > 0 and final["eval/clean_images_per_s"] > final["eval/pgd20_images_per_s"]
    state = checkpoints.load_training_state(reporter.latest_checkpoint)
    assert state["epoch"] == 2 and from_flat(state["config"]) == from_flat(config)

    # Resume a 3-epoch run from the epoch-2 checkpoint: only epoch 3 runs.
    more = []
    resumed = LocalReporter(tmp_path / "run2", resume_from=str(reporter.latest_checkpoint), log=more.append)
    train_fn_per_worker({**config, "optim.epochs": 3}, resumed)
    assert [line.split()[0] for line in more if line.startswith("epoch=")] == ["epoch=3"]


def test_label_free_method_accepts_mixing_policy(teacher_path, tmp_path):
    config = {
        **TINY,
        "teacher.checkpoint": str(teacher_path),
        "method.name": "rslad",
        "augment.policy": "crop_flip+mixup",
        "optim.epochs": 1,
    }
    final = train_fn_per_worker(config, LocalReporter(tmp_path, log=lambda line: None))
    assert final[names.FINAL_RESULT_FLAG] == 1.0


def test_cli_rejects_bad_values_before_training(capsys):
    assert train_main(["--set", "attack.eps=-1"]) == 2  # `python -m afm_ray.train` exits with it
    assert "attack.eps: got -1.0, expected eps >= 0" in capsys.readouterr().err


def test_compiled_student_trains_and_saves_plain_weights(tmp_path):
    """run.compile: the step runs through torch.compile; the checkpoint holds the plain module's
    weights (no `_orig_mod.` prefix), so it loads into an uncompiled model."""
    config = {**TINY, "method.name": "pgd_at", "optim.epochs": 1, "run.compile": True}
    reporter = LocalReporter(tmp_path, log=lambda line: None)
    final = train_fn_per_worker(config, reporter)
    assert final["clean_acc"] > 0.3  # one epoch on digits: well above chance (0.1)
    state = checkpoints.load_training_state(reporter.latest_checkpoint)
    assert not any(k.startswith("_orig_mod.") for k in state["model"])
