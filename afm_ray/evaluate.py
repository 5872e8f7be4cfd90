"""Evaluate a checkpoint with the fixed protocol (afm_ray.names.EVAL_PROTOCOLS).

`python -m afm_ray.evaluate --checkpoint PATH [--attacks clean,pgd20,cw,aa] [--samples N]`
(afm_ray.cli): the dataset, architecture and budget come from the config stored in the
checkpoint (overridable with --set), so a model is always attacked on the test split it was
never trained on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from afm_ray import attacks
from afm_ray.checkpoints import load_model, load_training_state, stored_config
from afm_ray.config import ExperimentConfig
from afm_ray.data import ImageDataset, load_run_data
from afm_ray.devices import resolve_device
from afm_ray.eval_batch import resolve_eval_batch_size
from afm_ray.models import count_parameters
from afm_ray.names import CI_HIGH, CI_LOW, EVAL_PROTOCOLS
from afm_ray.stats import accuracy_intervals


def evaluate_checkpoint(
    path: str | Path,
    cfg: ExperimentConfig | None = None,
    *,
    attack_names: tuple[str, ...] | None = None,
    samples: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Accuracy of the checkpoint's model under each attack, on a fixed test subset.

    `cfg` supplies the evaluation settings (eval.*, data.*); by default the checkpoint's own.
    Keys follow attacks.evaluate (`test_n500/aa_acc`), plus `clean_acc`-style short names
    and `params`.
    """
    state = load_training_state(path)
    stored = stored_config(state, path)
    cfg = cfg or stored
    data = load_run_data(stored)  # the data the model was trained for: its test split
    device = resolve_device(cfg.run.device)
    model, _ = load_model(path, data, device=device)
    return evaluate_model(model, cfg, data, attack_names=attack_names, samples=samples, log=log)


def evaluate_model(
    model: nn.Module,
    cfg: ExperimentConfig,
    data: ImageDataset,
    *,
    attack_names: tuple[str, ...] | None = None,
    samples: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """`evaluate_checkpoint` for a model in hand (on its device), on ``data``'s test split: the attacks
    (default ``cfg.eval_attacks``) on ``samples`` images (default ``cfg.eval.samples``; 0 = all), with
    each accuracy's Wilson 95% interval and ``eval/n_samples``."""
    model.eval()
    device = next(model.parameters()).device
    names = attack_names or cfg.eval_attacks
    n = samples if samples is not None else cfg.eval.samples
    x = data.x_test.to(device).float().div_(255)
    y = data.y_test.to(device)
    started = time.monotonic()
    batch_size = resolve_eval_batch_size(
        cfg.eval.batch_size,
        model,
        data.image_shape,
        device,
        n_images=min(n or len(y), len(y)),
        log=lambda line: log(f"  {line}"),
    )
    results = attacks.evaluate(
        model,
        x,
        y,
        eps=cfg.eval_eps,
        norm=cfg.attack.norm,
        attacks=names,
        samples=n or None,
        batch_size=batch_size,
        seed=cfg.data.seed,
        progress=lambda line: log(f"  {line}"),
    )
    for key, value in list(results.items()):
        if key.endswith("_acc"):
            results[key.rsplit("/", 1)[1]] = value
        elif key.endswith("_images_per_s"):
            results[f"eval/{key.rsplit('/', 1)[1]}"] = value
        elif key.endswith("/n_samples"):
            results["eval/n_samples"] = value
    results.update(accuracy_intervals(results, results["eval/n_samples"]))
    results["eval/batch_size"] = float(batch_size)
    results["params"] = float(count_parameters(model))
    results["eval/eps"] = cfg.eval_eps
    results["eval/seconds"] = time.monotonic() - started
    return results


def format_results(results: Mapping[str, Any]) -> str:
    lines = []
    n = next((int(v) for k, v in results.items() if k.endswith("/n_samples")), None)
    eps = results.get("eval/eps")
    header = f"robust accuracy on {n} test images" + (f" at eps={eps:.4g}" if eps is not None else "")
    if "eval/batch_size" in results:
        header += f", batch {int(results['eval/batch_size'])}"
    lines.append(header)
    for name, protocol in EVAL_PROTOCOLS.items():
        key = f"{name}_acc"
        if key in results:
            speed = results.get(f"eval/{name}_images_per_s")
            speed_text = f"{speed:9.1f} img/s" if speed is not None else " " * 15
            low, high = results.get(key + CI_LOW), results.get(key + CI_HIGH)
            ci = f" [{100 * low:5.1f}, {100 * high:5.1f}]" if low is not None and high is not None else " " * 15
            lines.append(f"  {key:<10} {100 * results[key]:6.2f}%{ci} {speed_text}   {protocol}")
    if any(k.endswith(CI_LOW) for k in results):
        lines.append("  [low, high]: the accuracy's Wilson 95% interval on these images")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m afm_ray.evaluate; as __main__ this is not the library module, so no cycle
    import sys

    from afm_ray.cli import evaluate_main

    sys.exit(evaluate_main())
