"""The fixed evaluation protocol (afm_ray.names.EVAL_PROTOCOLS) and the one place its metric keys come from.

Every evaluation in afm-ray (a trial's final evaluation on its Ray Train workers, `python -m
afm_ray.evaluate`, a teacher's score, a confirmation) goes through `evaluate_sharded`, which
returns:

- `<attack>_acc` for each attack (clean, pgd20, pgd10, cw, aa), a fraction in [0, 1];
- `eval/<attack>_images_per_s`, `eval/n_samples`, `eval/batch_size`;

and the callers add `<attack>_acc_ci_low/_ci_high` (Wilson 95%, afm_ray.stats), `params`,
`eval/eps` and timing. The test images are the fixed subset of `eval.samples` images
(afm_ray.data.fixed_test_subset), so every model is scored on the same ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from afm_ray import attacks
from afm_ray.checkpoints import load_model, load_training_state, stored_config
from afm_ray.config import ExperimentConfig
from afm_ray.data import ImageDataset, fixed_test_subset, load_run_data, to_unit
from afm_ray.devices import WorkerContext, all_reduce_sum, resolve_device
from afm_ray.eval_batch import resolve_eval_batch_size
from afm_ray.models import count_parameters, measure_latency_ms
from afm_ray.names import AA_SKIP_REASON_KEY, AA_SKIPPED_METRIC, CI_HIGH, CI_LOW, EVAL_PROTOCOLS, FINAL_RESULT_FLAG
from afm_ray.stats import accuracy_intervals


def evaluate_sharded(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str,
    attack_names: tuple[str, ...],
    batch_size: int,
    ctx: WorkerContext,
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Accuracy under each attack (the module docstring's keys), each worker attacking its own shard
    of the same images. `eval/<attack>_images_per_s`: images attacked by all workers per second of
    this worker's wall time for that attack (the workers run their shards side by side).

    seed: if given, each attack's randomness is seeded with it (results then do not depend on which
    attacks ran before) and the caller's RNG stream is left untouched.
    """
    shard = slice(ctx.rank, None, ctx.world_size)
    xs, ys = to_unit(x[shard], ctx.device), y[shard].to(ctx.device)
    counts, seconds = [], []
    for name in attack_names:
        started = time.perf_counter()
        correct = attacks.robust_predictions(
            model, xs, ys, attack=name, eps=eps, norm=norm, batch_size=batch_size, seed=seed, progress=progress
        )
        counts.append(correct.sum())
        n_robust = int(counts[-1])  # a host sync, so the time below is the attack's own
        seconds.append(time.perf_counter() - started)
        if progress:
            progress(f"{name}: {n_robust}/{len(ys)} correct on this worker ({seconds[-1]:.1f} s)")
    total = all_reduce_sum(torch.stack([*counts, torch.tensor(len(ys), device=ctx.device)]).float(), ctx.world_size)
    n = total[-1].item()
    results = {f"{name}_acc": (total[i] / n).item() for i, name in enumerate(attack_names)}
    results |= {f"eval/{name}_images_per_s": n / max(s, 1e-9) for name, s in zip(attack_names, seconds, strict=True)}
    results["eval/n_samples"] = n
    results["eval/batch_size"] = float(batch_size)
    return results


def final_evaluation(
    cfg: ExperimentConfig,
    student: nn.Module,
    data: ImageDataset,
    ctx: WorkerContext,
    log: Callable[[str], None],
    *,
    batch_size: int,
    aa_gate: Callable[[dict[str, float], float], str | None] | None = None,
) -> dict[str, float]:
    """A trial's final evaluation: the protocol on `eval.samples` test images, sharded across workers,
    with each accuracy's interval, the student's parameter count and latency.

    With `eval.aa_policy: candidates` and an `aa_gate` (a sweep's: afm_ray.sweep.aa_gate), AutoAttack
    runs last, only if the gate, shown every other result and `eval.aa_margin`, answers None;
    otherwise the result carries `eval/aa_skipped` and the gate's reason instead of `aa_acc`.
    """
    x_test, y_test = fixed_test_subset(data, cfg.eval.samples, cfg.data.seed)
    log(f"final evaluation on {len(y_test)} test images at eps={cfg.eval_eps:.4g}: {', '.join(cfg.eval_attacks)}")
    staged = aa_gate is not None and cfg.eval.aa_policy == "candidates" and "aa" in cfg.eval_attacks

    def run(attack_names: tuple[str, ...]) -> dict[str, float]:
        return evaluate_sharded(
            student,
            x_test,
            y_test,
            eps=cfg.eval_eps,
            norm=cfg.attack.norm,
            attack_names=attack_names,
            batch_size=batch_size,
            ctx=ctx,
        )

    final: dict[str, Any] = run(tuple(a for a in cfg.eval_attacks if a != "aa") if staged else cfg.eval_attacks)
    final["params"] = float(count_parameters(student))
    final["latency_ms"] = measure_latency_ms(student, data.image_shape, device=ctx.device)
    final["eval/eps"] = cfg.eval_eps
    if staged:
        reason = _decided_on_rank0(lambda: aa_gate(dict(final), cfg.eval.aa_margin), ctx)
        if reason is None:
            final.update(run(("aa",)))
        else:
            log(f"AutoAttack skipped: {reason}")
            final[AA_SKIPPED_METRIC] = 1.0
            final[AA_SKIP_REASON_KEY] = reason
    final.update(accuracy_intervals(final, len(y_test)))  # each accuracy's Wilson 95% interval
    final[FINAL_RESULT_FLAG] = 1.0
    return final


def _decided_on_rank0(decide: Callable[[], Any], ctx: WorkerContext) -> Any:
    """Rank 0's answer on every rank: all workers must attack (or skip) together."""
    answer = [decide() if ctx.rank == 0 else None]
    if ctx.world_size > 1:
        dist.broadcast_object_list(answer, src=0)
    return answer[0]


def evaluate_checkpoint(
    path: str | Path,
    cfg: ExperimentConfig | None = None,
    *,
    attack_names: tuple[str, ...] | None = None,
    samples: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """`evaluate_model` of the checkpoint's model on the test split of the data it was trained for.
    `cfg` supplies the evaluation settings (eval.*, run.device); by default the checkpoint's own."""
    stored = stored_config(load_training_state(path), path)
    cfg = cfg or stored
    data = load_run_data(stored)
    model, _ = load_model(path, data, device=resolve_device(cfg.run.device))
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
    """A model in hand (on its device), on ``data``'s test split: the attacks (default
    ``cfg.eval_attacks``) on the fixed subset of ``samples`` images (default ``cfg.eval.samples``;
    0 = all), each attack seeded by ``data.seed``; the module docstring's keys, with each accuracy's
    Wilson 95% interval, ``params``, ``eval/eps`` and ``eval/seconds``."""
    model.eval()
    device = next(model.parameters()).device
    x, y = fixed_test_subset(data, cfg.eval.samples if samples is None else samples, cfg.data.seed)
    started = time.monotonic()
    batch_size = resolve_eval_batch_size(
        cfg.eval.batch_size, model, data.image_shape, device, n_images=len(y), log=lambda line: log(f"  {line}")
    )
    log(f"  evaluating on {len(y)} test images (eps={cfg.eval_eps:g}, {cfg.attack.norm})")
    results = evaluate_sharded(
        model,
        x,
        y,
        eps=cfg.eval_eps,
        norm=cfg.attack.norm,
        attack_names=attack_names or cfg.eval_attacks,
        batch_size=batch_size,
        ctx=WorkerContext(0, 1, device),
        seed=cfg.data.seed,
        progress=lambda line: log(f"  {line}"),
    )
    results.update(accuracy_intervals(results, results["eval/n_samples"]))
    results["params"] = float(count_parameters(model))
    results["eval/eps"] = cfg.eval_eps
    results["eval/seconds"] = time.monotonic() - started
    return results


def format_results(results: Mapping[str, Any]) -> str:
    n, eps = results.get("eval/n_samples"), results.get("eval/eps")
    header = f"robust accuracy on {int(n) if n is not None else '?'} test images" + (
        f" at eps={eps:.4g}" if eps is not None else ""
    )
    if "eval/batch_size" in results:
        header += f", batch {int(results['eval/batch_size'])}"
    lines = [header]
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
