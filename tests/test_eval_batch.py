"""Evaluation batch sizes chosen per model and device (eval.batch_size = 0)."""

import pytest
import torch
from torch import nn

from afm_ray.attacks import robust_predictions
from afm_ray.config import ConfigError, from_flat
from afm_ray.eval_batch import choose_eval_batch_size, resolve_eval_batch_size
from afm_ray.models import build_model


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_channels=1, width=8, mean=(0.5,), std=(0.25,))


def test_cpu_choice_fits_the_images_and_leaves_model_and_rng_alone():
    model = small_model().train()
    rng_before = torch.get_rng_state()
    choice = choose_eval_batch_size(model, (1, 12, 12), "cpu", n_images=100)
    assert 16 <= choice.batch_size <= 100
    assert choice.reason.startswith(f"batch {choice.batch_size}: fastest per image on cpu")
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)  # probing draws from its own generator


def test_fewer_images_than_the_smallest_probe():
    choice = choose_eval_batch_size(small_model(), (1, 12, 12), "cpu", n_images=5)
    assert choice.batch_size == 5


def test_a_configured_batch_is_used_as_is():
    lines = []
    assert resolve_eval_batch_size(48, small_model(), (1, 12, 12), "cpu", n_images=1000, log=lines.append) == 48
    assert lines == []  # no probing, nothing to report
    assert resolve_eval_batch_size(0, small_model(), (1, 12, 12), "cpu", n_images=3, log=lines.append) == 3
    assert lines[0].startswith("evaluation batch 3:")


def test_config_accepts_zero_and_rejects_negative():
    assert from_flat({}).eval.batch_size == 0
    with pytest.raises(ConfigError, match=r"eval.batch_size: got -1, expected >= 1, or 0"):
        from_flat({"eval.batch_size": -1})


class RunsOutOfMemoryAbove(nn.Module):
    """A real model that fails like a full device does when a batch is larger than `limit`."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.batches = model, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"batch {x.shape[0]} does not fit")
        return self.model(x)


def test_attack_that_runs_out_of_memory_halves_its_batch_and_finishes():
    model = small_model()
    x = torch.rand(40, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    y = torch.arange(40) % 10
    lines = []
    limited = RunsOutOfMemoryAbove(model, limit=10)
    got = robust_predictions(limited, x, y, attack="pgd20", eps=0.1, batch_size=40, seed=0, progress=lines.append)
    assert max(limited.batches[-5:]) <= 10
    assert lines == ["pgd20: out of memory, retrying with batch 20", "pgd20: out of memory, retrying with batch 10"]
    want = robust_predictions(model, x, y, attack="pgd20", eps=0.1, batch_size=10, seed=0)
    assert torch.equal(got, want)  # the retry starts the attack afresh with the same seed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_choice_is_memory_bound_power_of_two():
    model = build_model("resnet18", num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3).cuda()
    choice = choose_eval_batch_size(model, (3, 32, 32), "cuda", n_images=100_000)
    assert choice.batch_size & (choice.batch_size - 1) == 0 and "free memory" in choice.reason
    x = torch.rand(choice.batch_size, 3, 32, 32, device="cuda")
    robust_predictions(
        model,
        x,
        torch.zeros(len(x), dtype=torch.long, device="cuda"),
        attack="pgd10",
        eps=8 / 255,
        batch_size=choice.batch_size,
    )  # it fits
