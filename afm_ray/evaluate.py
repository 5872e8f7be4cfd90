"""`python -m afm_ray.evaluate --checkpoint PATH [--attacks clean,pgd20,cw,aa] [--samples N]`.

Evaluates a checkpoint with the fixed protocol of DESIGN.md: the dataset, architecture and
budget come from the config stored in the checkpoint (overridable with --set), so a model
is always attacked on the test split it was never trained on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from afm_ray import attacks
from afm_ray.checkpoints import load_model, load_training_state
from afm_ray.config import ConfigError, ExperimentConfig, from_flat, parse_overrides
from afm_ray.eval_batch import resolve_eval_batch_size
from afm_ray.train import load_run_data, resolve_device

PROTOCOLS = {
    "clean": "clean",
    "pgd20": "PGD-20 on CE, step eps/4, uniform random start",
    "pgd10": "PGD-10 on CE, step eps/4, uniform random start",
    "cw": "CW-linf: PGD-20 on the margin loss, step eps/4",
    "aa": "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square; pyautoattack)",
}


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
    stored = from_flat(state["config"])
    cfg = cfg or stored
    data = load_run_data(stored)  # the data the model was trained for: its test split
    device = resolve_device(cfg.run.device)
    model, _ = load_model(path, data, device=device)
    model.eval()
    names = attack_names or cfg.eval_attacks
    n = samples if samples is not None else cfg.eval.samples
    x = data.x_test.to(device).float().div_(255)
    y = data.y_test.to(device)
    started = time.monotonic()
    batch_size = resolve_eval_batch_size(
        cfg.eval.batch_size, model, data.image_shape, device, n_images=min(n or len(y), len(y)),
        log=lambda line: log(f"  {line}"),
    )
    results = attacks.evaluate(
        model, x, y, eps=cfg.eval_eps, norm=cfg.attack.norm, attacks=names, samples=n or None,
        batch_size=batch_size, seed=cfg.data.seed, progress=lambda line: log(f"  {line}"),
    )
    for key, value in list(results.items()):
        if key.endswith("_acc"):
            results[key.rsplit("/", 1)[1]] = value
        elif key.endswith("_images_per_s"):
            results[f"eval/{key.rsplit('/', 1)[1]}"] = value
    results["eval/batch_size"] = float(batch_size)
    from afm_ray.models import count_parameters

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
    for name, protocol in PROTOCOLS.items():
        key = f"{name}_acc"
        if key in results:
            speed = results.get(f"eval/{name}_images_per_s")
            speed_text = f"{speed:9.1f} img/s" if speed is not None else " " * 15
            lines.append(f"  {key:<10} {100 * results[key]:6.2f}% {speed_text}   {protocol}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afm_ray.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or checkpoint.pt")
    parser.add_argument("--attacks", default=None, help="comma-separated: clean,pgd20,pgd10,cw,aa (default: eval.attacks)")
    parser.add_argument("--samples", type=int, default=None, help="test images (fixed subset); 0 = whole test split")
    parser.add_argument("--eps", default=None, help="budget, e.g. 8/255 (default: the checkpoint's eval.eps)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        stored = load_training_state(args.checkpoint)["config"]
        overrides = parse_overrides(args.overrides)
        if args.eps is not None:
            overrides["eval.eps"] = args.eps
        if args.attacks is not None:
            overrides["eval.attacks"] = args.attacks
        if args.samples is not None:
            if args.samples < 0:
                raise ConfigError(f"--samples: got {args.samples}, expected >= 0 (0 = whole test split)")
            overrides["eval.samples"] = args.samples
        cfg = from_flat({**stored, **overrides})
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    results = evaluate_checkpoint(args.checkpoint, cfg)
    print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
