"""AKD's teacher techniques and teachers from outside: the ensemble's combination on fixed logits and in
every method, teacher.select over a folder of epoch checkpoints, and plain state dicts with RobustBench's,
TRADES' and robust_overfitting's key layouts loaded (weights only) or refused in one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from afm_ray.checkpoints import DataSpec, load_model, save_training_state
from afm_ray.config import from_flat, to_flat
from afm_ray.ensemble import TeacherEnsemble, ensemble_logits
from afm_ray.errors import CheckpointError, ConfigError
from afm_ray.losses import akd_target, kl_div
from afm_ray.methods import METHODS, AttackSpec, build_method
from afm_ray.models import build_model
from afm_ray.teacher.members import epoch_checkpoints, resolve_member, resolve_members

# ------------------------------------------------------------------------------------- ensemble

Z1 = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
Z2 = torch.tensor([[-1.0, 2.5, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("tau", [1.0, 4.0, 30.0])
def test_ensemble_is_the_mean_of_probabilities_at_the_methods_temperature(tau):
    out = ensemble_logits([Z1, Z2], tau)
    mean = (torch.softmax(Z1 / tau, 1) + torch.softmax(Z2 / tau, 1)) / 2
    assert torch.allclose(torch.softmax(out / tau, 1), mean, atol=1e-6)
    # Pinned at tau 1: the first row's mixture, 0.5 [0.7856, 0.1753, 0.0391] + 0.5 [0.0271, 0.8991, 0.0738].
    if tau == 1.0:
        assert torch.allclose(torch.softmax(out, 1)[0], torch.tensor([0.40637, 0.53717, 0.05646]), atol=1e-4)


def test_one_member_gives_that_members_probabilities():
    for tau in (1.0, 2.0):
        assert torch.allclose(torch.softmax(ensemble_logits([Z1], tau) / tau, 1), torch.softmax(Z1 / tau, 1))


def test_ensemble_is_not_the_mean_of_logits():
    # Members sure of different classes, both giving class 2 some weight: the mixture keeps "0 or 1";
    # averaged logits (a product of the two) would make all three classes equally likely.
    a, b = torch.tensor([[4.0, 0.0, 2.0]]), torch.tensor([[0.0, 4.0, 2.0]])
    mixture = torch.softmax(ensemble_logits([a, b], 1.0), 1)
    assert torch.allclose(mixture, torch.tensor([[0.44134, 0.44134, 0.11731]]), atol=1e-4)
    assert torch.allclose(torch.softmax((a + b) / 2, 1), torch.full((1, 3), 1 / 3))


class _Affine(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(16, 3, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.w


@pytest.mark.parametrize("name", [n for n, cls in METHODS.items() if cls.needs_teacher])
def test_every_teacher_reading_method_reads_the_ensemble(name):
    """Each method run with an ensemble equals the same method run with a teacher whose logits are the
    ensemble's (the formula holds with p_T the mean of probabilities), attack included."""
    method = build_method(name)
    members = [_Affine(1).eval().requires_grad_(False), _Affine(2).eval().requires_grad_(False)]
    ensemble = TeacherEnsemble(members, getattr(method, "tau", 1.0)).eval()
    student = _Affine(3)
    x = torch.rand(5, 1, 4, 4)
    y = F.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).float()
    attack = AttackSpec(eps=0.1, step_size=0.05, steps=2)
    torch.manual_seed(0)
    with_ensemble = method(student, ensemble, x, y, attack)
    assert with_ensemble["loss"].requires_grad and not any(p.grad is not None for p in ensemble.parameters())
    # The same step by hand for AKD: its target is lam y + (1 - lam) (mean of the members' p_T).
    if name == "akd":
        p = (torch.softmax(members[0](x) / method.tau, 1) + torch.softmax(members[1](x) / method.tau, 1)) / 2
        target = akd_target(ensemble(x), y, method.tau, method.lam)
        assert torch.allclose(target, method.lam * y + (1 - method.lam) * p, atol=1e-6)
    if name == "advfunmatch":  # the inner maximisation's gradient runs through every member
        z = x.clone().requires_grad_(True)
        kl_div(ensemble(z), student(z), method.tau, reduction="sum").backward()
        assert z.grad is not None and z.grad.abs().sum() > 0


# ------------------------------------------------------------------------- folders of epochs


def _checkpoint(folder, epoch: int, score: float, **extra) -> None:
    cfg = from_flat({"data.name": "digits", "student.width": 2})
    model = build_model("small_cnn", num_classes=10, in_channels=1, mean=[0.0], std=[1.0], width=2)
    spec = DataSpec(10, (1, 8, 8), (0.0,), (1.0,), "digits")
    save_training_state(
        folder, model=model, config=to_flat(cfg), epoch=epoch, metrics={"val/pgd10_acc": score}, data=spec, **extra
    )


def test_select_over_a_folder_of_epoch_checkpoints(tmp_path):
    for epoch, score in ((1, 0.2), (2, 0.5), (3, 0.5), (10, 0.3)):
        _checkpoint(tmp_path / "run" / f"checkpoint_epoch{epoch:04d}", epoch, score)
    folder = str(tmp_path / "run")
    assert [c.epoch for c in epoch_checkpoints(folder)] == [1, 2, 3, 10]
    assert resolve_member(folder, "last").endswith("checkpoint_epoch0010")
    assert resolve_member(folder, "best_pgd").endswith("checkpoint_epoch0002")  # the earliest of the tie
    assert resolve_member(folder, "epoch:3").endswith("checkpoint_epoch0003")
    with pytest.raises(ConfigError, match=r"teacher.select: epoch:4 but teacher.checkpoint .* holds epochs 1..10"):
        resolve_member(folder, "epoch:4")
    single = str(tmp_path / "run" / "checkpoint_epoch0001")
    assert resolve_member(single, "last") == single
    with pytest.raises(ConfigError, match="is one checkpoint, not a folder of epoch checkpoints"):
        resolve_member(single, "best_pgd")


def test_afm_ray_teacher_layout_is_read_from_its_index(tmp_path):
    entry = tmp_path / "entry"
    _checkpoint(entry, 3, 0.4)  # checkpoint.pt: the last epoch
    (entry / "epochs").mkdir()
    index = [{"epoch": e, "file": f"epoch_{e:04d}.pt", "val/pgd10_acc": s} for e, s in ((1, 0.1), (2, 0.6), (3, 0.4))]
    (entry / "epochs" / "index.json").write_text(json.dumps(index))
    assert resolve_member(str(entry), "last") == str(entry / "checkpoint.pt")
    assert resolve_member(str(entry), "best_pgd") == f"{entry}/epochs/epoch_0002.pt"


def test_folder_from_elsewhere_selects_by_epoch_but_not_by_a_score_it_lacks(tmp_path):
    model = build_model("small_cnn", num_classes=10, in_channels=1, mean=[0.0], std=[1.0], width=2)
    for epoch in (5, 10):
        torch.save({"state_dict": model.state_dict(), "epoch": epoch}, tmp_path / f"model-epoch{epoch}.pt")
    assert resolve_member(str(tmp_path), "epoch:5").endswith("model-epoch5.pt")
    with pytest.raises(ConfigError, match="records no val/pgd10_acc"):
        resolve_member(str(tmp_path), "best_pgd")


def test_a_missing_ensemble_member_is_named(tmp_path):
    _checkpoint(tmp_path / "a", 1, 0.1)
    cfg = from_flat({"teacher.checkpoint": f"{tmp_path / 'a'},{tmp_path / 'gone.pt'}"})
    with pytest.raises(CheckpointError, match=r"teacher.checkpoint: no checkpoint at '.*gone.pt'"):
        resolve_members(cfg)


# ----------------------------------------------------------------- state dicts from elsewhere


def robustbench_wrn_keys(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our WideResNet's weights named as RobustBench's / TRADES' WideResNet names them
    (robustbench/model_zoo/architectures/wide_resnet.py: NetworkBlock.layer, BasicBlock.convShortcut)."""
    out = {}
    for key, value in ours.items():
        if key.startswith("normalize."):
            continue
        key = re.sub(r"^net\.(block\d)\.(\d+)\.", r"\1.layer.\2.", key).removeprefix("net.")
        out[key.replace(".conv_shortcut.", ".convShortcut.")] = value
    return out


def _wrn(depth: int = 10, width: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("wrn", num_classes=10, in_channels=3, mean=[0.0] * 3, std=[1.0] * 3, depth=depth, width=width)
    with torch.no_grad():  # batch-norm statistics that are not the defaults, so a lost buffer shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


SPEC = DataSpec(10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3, "cifar10")


def _teacher_cfg(**keys):
    return from_flat({"data.name": "cifar10", "teacher.arch": "wrn", "teacher.depth": 10, "teacher.width": 2, **keys})


def test_robustbench_wideresnet_state_dict_loads_as_our_wrn(tmp_path):
    source = _wrn()
    keys = robustbench_wrn_keys(source.state_dict())
    # The names RobustBench's WideResNet really has (its architecture file, read for this test).
    for name in ("conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.0.bn2.running_var", "fc.bias"):
        assert name in keys
    # As an official TRADES script saves it: DataParallel's prefix, a wrapper, the unused sub_block1.
    extra = {f"sub_block1.layer.0.{k.split('layer.0.', 1)[1]}": v for k, v in keys.items() if "block1.layer.0." in k}
    wrapped = {"state_dict": {f"module.{k}": v for k, v in {**keys, **extra}.items()}, "epoch": 100, "best": 0.5}
    torch.save(wrapped, tmp_path / "trades.pt")
    loaded, _ = load_model(tmp_path / "trades.pt", SPEC, fallback=_teacher_cfg().teacher)
    x = torch.rand(2, 3, 32, 32)
    # No normalisation buffers in the file: raw [0, 1] inputs (mean 0, std 1), not the dataset's statistics.
    assert torch.equal(loaded.normalize.mean.flatten(), torch.zeros(3))
    assert torch.allclose(loaded.eval()(x), source(x), atol=1e-5)


def test_normalisation_buffers_inside_a_robustbench_model_are_kept(tmp_path):
    source = _wrn()
    mu, sigma = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2471, 0.2435, 0.2616])
    keys = {**robustbench_wrn_keys(source.state_dict()), "mu": mu.view(1, 3, 1, 1), "sigma": sigma.view(1, 3, 1, 1)}
    torch.save({f"model.{k}": v for k, v in keys.items()}, tmp_path / "rice.pt")
    loaded, _ = load_model(tmp_path / "rice.pt", SPEC, fallback=_teacher_cfg().teacher)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded.eval()(x), source((x - mu.view(1, 3, 1, 1)) / sigma.view(1, 3, 1, 1)), atol=1e-5)


@pytest.mark.parametrize("arch", ["preact_resnet18", "resnet18"])
def test_resnet_layouts_of_official_scripts_load(arch, tmp_path):
    torch.manual_seed(0)
    source = build_model(arch, num_classes=10, in_channels=3, mean=[0.0] * 3, std=[1.0] * 3, width=8).eval()
    keys = {k.removeprefix("net."): v for k, v in source.state_dict().items() if not k.startswith("normalize.")}
    if arch == "preact_resnet18":  # robust_overfitting / RobustBench: the shortcut is a Sequential(conv)
        keys = {re.sub(r"\.shortcut\.weight$", ".shortcut.0.weight", k): v for k, v in keys.items()}
        assert "layer2.0.shortcut.0.weight" in keys
    torch.save({"model": keys, "optimizer": {"lr": 0.1}}, tmp_path / "official.pth")
    cfg = from_flat({"data.name": "cifar10", "teacher.arch": arch, "teacher.width": 8})
    loaded, _ = load_model(tmp_path / "official.pth", SPEC, fallback=cfg.teacher)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded.eval()(x), source(x), atol=1e-5)


def test_a_mismatched_state_dict_fails_in_one_line_naming_what_did_not_match(tmp_path):
    torch.save(robustbench_wrn_keys(_wrn(depth=10).state_dict()), tmp_path / "wrn10.pt")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "wrn10.pt", SPEC, fallback=_teacher_cfg(**{"teacher.depth": 16}).teacher)
    message = str(info.value)
    assert "\n" not in message
    assert "does not match architecture 'wrn' (depth 16, width 2)" in message and "keys missing" in message
    assert "[read as:" in message and "renamed to afm-ray's wrn" in message
    # The right depth but 100 classes: the shape that differs, and both class counts.
    wide = robustbench_wrn_keys(_wrn().state_dict())
    wide["fc.weight"], wide["fc.bias"] = torch.zeros(100, wide["fc.weight"].shape[1]), torch.zeros(100)
    torch.save(wide, tmp_path / "c100.pt")
    with pytest.raises(
        CheckpointError, match=r"net.fc.weight has shape \(100, 128\).*has 100 classes, dataset cifar10"
    ):
        load_model(tmp_path / "c100.pt", SPEC, fallback=_teacher_cfg().teacher)
