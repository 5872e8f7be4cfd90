"""How the final stage scores one student: clean accuracy and AutoAttack standard on the fixed test
subset (the whole test split by default), AutoAttack resumable (afm_ray.final.autoattack_resume), with
each accuracy's Wilson interval, the parameter count and the batch-1 latency on the device it ran on.

The metric keys are the protocol's (afm_ray.evaluate.protocol): `clean_acc`, `aa_acc`, their
`_ci_low`/`_ci_high`, `params`, `latency_ms`, `eval/n_samples`, `eval/eps`, `eval/seconds`; plus
`eval/aa_attacks_resumed` and `eval/aa_attacks_run`: how many of AutoAttack's attacks a rerun found
done and how many it ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from safetensors.torch import load as load_safetensors
from torch import nn

from afm_ray.config import ExperimentConfig, from_flat
from afm_ray.data import ImageDataset, fixed_test_subset, load_run_data, to_unit
from afm_ray.devices import WorkerContext, resolve_device
from afm_ray.eval_batch import resolve_eval_batch_size
from afm_ray.evaluate.protocol import evaluate_sharded
from afm_ray.final.autoattack_resume import autoattack_resumable
from afm_ray.models import build_model, count_parameters, measure_latency_ms
from afm_ray.stats import accuracy_intervals

AA_STATE_FILE = "autoattack_state.json"


def evaluate_student(
    model: nn.Module,
    cfg: ExperimentConfig,
    data: ImageDataset,
    *,
    samples: int,
    state_location: str,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Clean and AutoAttack accuracy of ``model`` (on its device) on ``samples`` fixed test images
    (0 = all), AutoAttack resuming from the state at ``state_location`` (a file path or URI)."""
    model.eval()
    device = next(model.parameters()).device
    x, y = fixed_test_subset(data, samples, cfg.data.seed)
    started = time.monotonic()
    batch_size = resolve_eval_batch_size(cfg.eval.batch_size, model, data.image_shape, device, n_images=len(y))
    results = evaluate_sharded(
        model,
        x,
        y,
        eps=cfg.eval_eps,
        norm=cfg.attack.norm,
        attack_names=("clean",),
        batch_size=batch_size,
        ctx=WorkerContext(0, 1, device),
        seed=cfg.data.seed,
    )
    log(f"clean: {results['clean_acc']:.4f} on {len(y)} test images; AutoAttack standard at eps {cfg.eval_eps:.4g}")
    started_aa = time.monotonic()
    robust, state = autoattack_resumable(
        model,
        to_unit(x, device),
        y.to(device),
        eps=cfg.eval_eps,
        norm=cfg.attack.norm,
        batch_size=batch_size,
        seed=cfg.data.seed,
        state_location=state_location,
        progress=log,
    )
    results["aa_acc"] = robust.float().mean().item()
    results["eval/aa_images_per_s"] = len(y) / max(time.monotonic() - started_aa, 1e-9)
    results["eval/aa_attacks_resumed"] = float(len(state["resumed"]))
    results["eval/aa_attacks_run"] = float(len(state["ran"]))
    results.update(accuracy_intervals(results, results["eval/n_samples"]))
    results["params"] = float(count_parameters(model))
    results["latency_ms"] = measure_latency_ms(model, data.image_shape, device=device)
    results["eval/eps"] = cfg.eval_eps
    results["eval/seconds"] = time.monotonic() - started
    return results


def evaluate_weights(
    model_spec: dict[str, Any], weights: bytes, flat: dict[str, Any], samples: int, state_location: str
) -> dict[str, float]:
    """`evaluate_student` of a student given as its spec (afm_ray.tracking.student_model) and safetensors
    bytes, on ``flat``'s data and device: what the final stage runs as a Ray task."""
    cfg = from_flat(flat)
    model = build_model(**model_spec)
    model.load_state_dict(load_safetensors(weights))
    model = model.to(resolve_device(cfg.run.device))
    return evaluate_student(
        model,
        cfg,
        load_run_data(cfg),
        samples=samples,
        state_location=state_location,
        log=lambda line: print(line, flush=True),
    )
