"""What a sweep checks before Ray starts (afm_ray.sweep.plan), the teacher cost it prints, and the
credentials it never prints (afm_ray.credentials.redact_uri). No Ray here: each test takes seconds."""

from __future__ import annotations

import pytest

from afm_ray.checkpoints import save_training_state
from afm_ray.config import from_flat
from afm_ray.cost import dataset_shapes, forward_flops, teacher_cost, train_flops_per_image
from afm_ray.credentials import redact_uri
from afm_ray.errors import ConfigError, UserError
from afm_ray.models import build_model
from afm_ray.preflight import check_teacher, sweep_checks
from afm_ray.search.space import load_search_space, parse_search_space
from afm_ray.teacher.training import teacher_training_config


def space(fixed: dict, **raw):
    raw.setdefault("search", {"attack.eps": {"uniform": [0.05, 0.15]}})  # a space searches something
    return parse_search_space({"fixed": {"data.name": "digits", **fixed}, **raw})


# ------------------------------------------------------------------------------ the teacher


def test_teacher_not_needed_by_the_methods():
    assert check_teacher(space({"method.name": "pgd_at"})) == "teacher: none needed"


def test_empty_teacher_is_refused_with_the_cost_of_training_one():
    """The CIFAR-10 space as shipped names no teacher: a sweep must not train a WRN-34-10 for days
    unasked. The refusal is one line with what training it would cost."""
    with pytest.raises(ConfigError) as error:
        check_teacher(load_search_space("cifar10_resnet18"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("teacher.checkpoint is empty but adaad, advfunmatch, ard, rslad distil a teacher")
    images = 50000 - 256  # CIFAR-10's training split less the validation images the training loop holds out
    assert (
        "--set teacher.checkpoint=train" in message and f"wrn34_10 by trades, 100 epochs on {images} images" in message
    )
    assert "EFLOP" in message and "GPU-h on one A10G" in message and "$" in message


def test_train_says_so_and_prints_the_estimate(tmp_path):
    fixed = {"teacher.checkpoint": "train", "teacher.cache_dir": str(tmp_path)}
    line = check_teacher(space(fixed, resources={"gpus_per_worker": 0}))
    images = 1438 - 256  # digits' training split (1797 less 359 test images) less the 256 validation images
    assert line.startswith(f"teacher: to be trained before the first trial: small_cnn by pgd_at, 5 epochs on {images}")
    assert "on a CPU core at 70 GFLOP/s" in line


def test_the_default_space_trains_its_teacher_explicitly(tmp_path, monkeypatch):
    monkeypatch.setenv("AFM_RAY_CACHE", str(tmp_path))  # nothing cached
    line = check_teacher(load_search_space())
    images = 4000 - 256  # mnist5k's training split (80% of 5000) less the validation images held out
    assert line.startswith(f"teacher: to be trained before the first trial: small_cnn by pgd_at, 5 epochs on {images}")


def test_given_teacher_must_exist(tmp_path):
    missing = tmp_path / "nowhere" / "teacher.pt"
    with pytest.raises(ConfigError, match=r"^teacher\.checkpoint: nothing at .*nowhere.*'train' to have the sweep"):
        check_teacher(space({"teacher.checkpoint": str(missing)}))
    model = build_model("small_cnn", num_classes=10, in_channels=1, mean=(0.5,), std=(0.25,), width=4)
    save_training_state(tmp_path / "t", model=model, config={}, epoch=1)
    for given in (tmp_path / "t", tmp_path / "t" / "checkpoint.pt", f"file://{tmp_path / 't'}"):
        assert check_teacher(space({"teacher.checkpoint": str(given)})).startswith(f"teacher: {given} (0.")
    with pytest.raises(ConfigError, match="teacher.checkpoint: nothing at 'file://"):
        check_teacher(space({"teacher.checkpoint": f"file://{missing}"}))


def preflight(space, storage_root: str, tracking_uri: str) -> list[str]:
    """Every sweep check in order, as the sweep command runs them; the first failure raises."""
    return [check() for _, check in sweep_checks(space, storage_root, tracking_uri)]


# ----------------------------------------------------------------------------- the estimate


def test_forward_flops_match_the_published_counts():
    """ResNet-18 (CIFAR variant) is 0.56 GMACs and WRN-34-10 6.7 GMACs per 32x32 image (the figures
    clusters/README.md's cost table uses); a multiply-add is 2 FLOPs."""
    for arch, gmacs in (("resnet18", 0.556), ("wrn34_10", 6.66)):
        flops = forward_flops(arch, 0, 0, dataset_shapes(from_flat({"data.name": "cifar10"})))
        assert flops == pytest.approx(2 * gmacs * 1e9, rel=0.01)


def test_teacher_cost_is_the_readmes_arithmetic():
    """clusters/README.md: PGD-AT of WRN-34-10 is ~15 PFLOPs an epoch on CIFAR-10 (23 forwards per
    image with PGD-10); TRADES adds the clean forward and a second loss: 27."""
    assert train_flops_per_image("pgd_at", 10, 1.0, 0.0) == 23 and train_flops_per_image("trades", 10, 1.0, 0.0) == 27
    teacher = {"teacher.arch": "wrn34_10", "teacher.width": 0, "teacher.epochs": 1, "teacher.method": "pgd_at"}
    cfg = from_flat({"data.name": "cifar10", **teacher})
    cost = teacher_cost(cfg, teacher_training_config(cfg), on_gpu=True)
    assert cost.total_flops == pytest.approx(15.3e15, rel=0.02)
    assert cost.hours == pytest.approx(cost.total_flops / 8e12 / 3600)  # one A10G at 8 TFLOP/s effective


# --------------------------------------------------------------------------- all the checks


def test_preflight_runs_every_check_in_order(tmp_path):
    fixed = {"method.name": "pgd_at"}
    names = [name for name, _ in sweep_checks(space(fixed), str(tmp_path), "sqlite:///x.db")]
    assert names == ["data", "storage", "teacher", "tracking"]
    lines = preflight(space(fixed), str(tmp_path / "results"), f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert lines == [
        "data: digits",
        f"storage: {tmp_path / 'results'} takes writes",
        "teacher: none needed",
        f"tracking: sqlite:///{tmp_path / 'mlflow.db'} answers",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the probe is gone; no store is created
    with pytest.raises(UserError, match="data.root"):
        preflight(space({"data.name": "cifar10", "data.root": str(tmp_path / "none")}), str(tmp_path), "sqlite:///x")


# ---------------------------------------------------------------------------- credentials


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("s3://bucket/afm-ray", "s3://bucket/afm-ray"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("/a/local/path", "/a/local/path"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("postgresql://optuna:hunter2@db:5432/studies", "postgresql://optuna:***@db:5432/studies"),
        ("https://ghp_abc123@mlflow.example.com", "https://***@mlflow.example.com"),
        ("s3://b/p?region=us-west-2&access_key=AKIA&secret_key=xyz", "s3://b/p?region=us-west-2&access_key=***&secret_key=***"),
        ("https://u:p@host/x?token=abc&run=1", "https://u:***@host/x?token=***&run=1"),
        ("gs://b/teacher.pt?X-Goog-Signature=00ff&X-Goog-Credential=me", "gs://b/teacher.pt?X-Goog-Signature=***&X-Goog-Credential=***"),
    ],
)  # fmt: skip
def test_credentials_in_uris_are_redacted(uri, shown):
    assert redact_uri(uri) == shown
    assert "hunter2" not in shown and "xyz" not in shown and "ghp_" not in shown


def test_check_messages_carry_no_credentials(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError) as error:  # a URI whose path cannot be written
        preflight(space({"method.name": "pgd_at"}), f"file://user:hunter2@{blocker}/x", "sqlite:///x")
    assert "hunter2" not in str(error.value)
