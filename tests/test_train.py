"""The training function end to end in a plain process: teacher, student, checkpoints, resume."""

import json
from pathlib import Path

import pytest
import torch

from afm_ray import checkpoints, names
from afm_ray.checkpoints import load_teacher
from afm_ray.config import ConfigError, from_flat
from afm_ray.data import load_run_data
from afm_ray.evaluate.protocol import evaluate_checkpoint
from afm_ray.teacher.members import load_teachers, resolve_member
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


def test_trained_teacher_keeps_every_epoch_for_teacher_select(teacher_path):
    """The cache entry is a folder of epoch checkpoints: teacher.select picks one when the teacher is
    loaded (so selecting never changes the cache key, and one training serves every selection)."""
    entry = str(Path(teacher_path).parent)
    index = json.loads((Path(entry) / "epochs" / "index.json").read_text())
    assert [row["epoch"] for row in index] == [1, 2] and all("val/pgd10_acc" in row for row in index)
    best = max(index, key=lambda row: (row["val/pgd10_acc"], -row["epoch"]))["epoch"]
    assert resolve_member(entry, "best_pgd").endswith(f"epoch_{best:04d}.pt")
    assert resolve_member(entry, "last") == str(teacher_path)
    cfg = from_flat({**TINY, "teacher.checkpoint": entry, "teacher.select": "epoch:1"})
    first = load_teachers(cfg, load_run_data(cfg))
    stored = torch.load(Path(entry) / "epochs" / "epoch_0001.pt", weights_only=True)["model"]
    assert all(torch.equal(v, stored[k]) for k, v in first.state_dict().items())
    assert teacher_cache_key(cfg) == teacher_cache_key(from_flat({**TINY, "teacher.select": "best_pgd"}))


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


@pytest.mark.slow
@pytest.mark.parametrize("average", ["ema", "swa"])
def test_interrupted_and_resumed_run_ends_where_an_uninterrupted_one_does(teacher_path, tmp_path, average):
    """The checkpoint keeps the training weights, the average and the best epoch so far: a run resumed
    after epoch 2 of 4 selects, averages and scores what the uninterrupted run does. The same process
    runs the same kernels on the same inputs (each epoch reseeds), so the tolerance is float32 rounding."""
    config = {
        **TINY,
        "teacher.checkpoint": str(teacher_path),
        "method.name": "akd",
        "optim.epochs": 4,
        "student.select": "best_pgd",
        "student.average": average,
        "student.swa_start": 0.25,
        "eval.attacks": "clean,pgd20",
    }
    whole = LocalReporter(tmp_path / "whole", log=lambda line: None, keep_all=True)
    uninterrupted = train_fn_per_worker(config, whole)
    resumed = LocalReporter(tmp_path / "resumed", resume_from=str(whole.checkpoints[2]), log=lambda line: None)
    again = train_fn_per_worker(config, resumed)
    for key in ("clean_acc", "pgd20_acc", names.SELECTED_EPOCH_METRIC, names.AVERAGED_METRIC):
        assert again[key] == pytest.approx(uninterrupted[key], abs=1e-6), key
    a, b = (checkpoints.load_training_state(r.latest_checkpoint) for r in (whole, resumed))
    for part in ("model", "train_model"):
        for key, tensor in a[part].items():
            assert torch.allclose(tensor.float(), b[part][key].float(), atol=1e-5), (part, key)
    for key, tensor in a["student_weights"]["averaged"].items():
        assert torch.allclose(tensor.float(), b["student_weights"]["averaged"][key].float(), atol=1e-5), key


def _ddp_rank(rank: int, port: int, config: dict, out: str) -> None:
    """One DDP rank (a spawned process): train, then save the student this rank evaluated last."""
    import os

    import torch.distributed as dist

    from afm_ray import student_weights

    evaluated = []
    student = student_weights.StudentWeights.student

    def observed_student(self):  # what each rank scores: observed, not replaced
        evaluated[:] = [student(self)]
        return evaluated[0]

    student_weights.StudentWeights.student = observed_student
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        final = train_fn_per_worker(config, LocalReporter(f"{out}-{rank}", log=lambda line: None))
        torch.save({"final": final, "student": evaluated[0].state_dict()}, f"{out}-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_averaging_and_selection_are_identical_on_every_ddp_rank(tmp_path):
    """Two DDP ranks (gloo, two processes): batch-norm buffers and validation noise differ per rank, yet
    the EMA, the selected epoch and so the student each rank evaluates are the same."""
    import socket

    import torch.multiprocessing as mp

    config = {**TINY, "method.name": "pgd_at", "optim.epochs": 3, "optim.batch_size": 32, "run.device": "cpu"}
    config |= {"student.select": "best_pgd", "student.average": "ema", "eval.attacks": "clean"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(port, config, str(tmp_path / "rank")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["final"][names.SELECTED_EPOCH_METRIC] == ranks[1]["final"][names.SELECTED_EPOCH_METRIC]
    for key, tensor in ranks[0]["student"].items():
        assert torch.equal(tensor, ranks[1]["student"][key]), key


@pytest.mark.slow
def test_train_command_prints_the_selected_epoch_and_the_averaging(tmp_path, monkeypatch, capsys):
    """The issue's command, with a few epochs: it trains (a teacher, then the student) and its summary
    says which epoch's weights are the student and how they were averaged."""
    monkeypatch.chdir(tmp_path)
    overrides = ["data.name=digits", "student.select=best_pgd", "student.average=ema", "optim.epochs=3"]
    small = ["student.width=8", "teacher.width=8", "teacher.epochs=1", "attack.steps=1", "eval.samples=32"]
    small += ["eval.attacks=clean,pgd20", "eval.val_samples=64", f"teacher.cache_dir={tmp_path / 'teachers'}"]
    assert train_main([a for kv in overrides + small for a in ("--set", kv)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("student: epoch "))
    assert " of 3 (the best val/pgd10_acc on the held-out split" in line and "the EMA of the weights" in line


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
