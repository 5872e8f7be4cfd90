"""The robust teacher: train one (PGD-AT or TRADES), cached by config hash, or load a checkpoint.

`python -m afm_ray.teacher [--config FILE] [--set key=value ...]` trains the teacher that a
config needs (once: later calls reuse the cache) and prints its path and robustness.

The teacher's training config depends only on the data, the `teacher.*` section and the
evaluation budget, never on what a sweep varies for the student, so every trial of a sweep
distils the same teacher.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from afm_ray.checkpoints import checkpoint_file, load_model
from afm_ray.config import ConfigError, ExperimentConfig, from_flat, load_config, to_flat
from afm_ray.data import ImageDataset


def teacher_training_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The run that trains `cfg`'s teacher: adversarial training at the evaluation budget."""
    t = cfg.teacher
    return from_flat({
        **{k: v for k, v in to_flat(cfg).items() if k.startswith("data.")},
        "student.arch": t.arch,
        "student.width": t.width,
        "student.depth": t.depth,
        "method.name": t.method,
        "optim.epochs": t.epochs,
        # The usual recipe of adversarial training: standard augmentation, PGD-10 at the
        # evaluation budget with step eps/4, SGD 0.1 with cosine decay.
        "augment.policy": "crop_flip",
        "attack.eps": cfg.eval_eps,
        "attack.norm": cfg.attack.norm,
        "attack.steps": 10,
        "eval.eps": cfg.eval_eps,
        "eval.attacks": "clean",
        "run.seed": 0,
        "run.device": cfg.run.device,
    })


def teacher_cache_key(cfg: ExperimentConfig) -> str:
    flat = to_flat(teacher_training_config(cfg))
    # Where it runs and how it is accelerated do not change which teacher it is.
    for key in ("run.device", "run.output_dir", "run.resume_from", "run.compile", "run.channels_last"):
        flat.pop(key, None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def teacher_cache_dir(cfg: ExperimentConfig) -> Path:
    root = Path(cfg.teacher.cache_dir or os.environ.get("AFM_RAY_CACHE", "~/.cache/afm_ray")).expanduser()
    if not cfg.teacher.cache_dir:
        root = root / "teachers"
    name = f"{cfg.data.name}-{cfg.teacher.arch}-{cfg.teacher.method}-{teacher_cache_key(cfg)}"
    return root.resolve() / name


def ensure_teacher(cfg: ExperimentConfig, *, log: Callable[[str], None] = print, force: bool = False) -> Path:
    """The checkpoint file of `cfg`'s teacher: the given one, a cached one, or a newly trained one."""
    if cfg.teacher.checkpoint:
        return checkpoint_file(cfg.teacher.checkpoint)
    target = teacher_cache_dir(cfg)
    if (target / "checkpoint.pt").is_file() and not force:
        log(f"teacher: reusing {target}")
        return target / "checkpoint.pt"
    from afm_ray.train import LocalReporter, train_fn_per_worker

    tcfg = teacher_training_config(cfg)
    log(f"teacher: training {tcfg.student.arch} with {tcfg.method.name} for {tcfg.optim.epochs} epochs "
        f"(eps={tcfg.train_eps:.4g}); cached at {target}")
    with tempfile.TemporaryDirectory(prefix="afm_ray_teacher_") as tmp:
        reporter = LocalReporter(tmp, log=lambda line: log(f"teacher: {line}"))
        train_fn_per_worker(to_flat(tcfg), reporter)
        assert reporter.latest_checkpoint is not None
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        shutil.copy2(reporter.latest_checkpoint / "checkpoint.pt", staging / "checkpoint.pt")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-written teacher is never picked up from the cache
    return target / "checkpoint.pt"


def load_teacher(path: str | Path, data: ImageDataset, *, device: torch.device | str = "cpu",
                 cfg: ExperimentConfig | None = None) -> nn.Module:
    """Load a frozen teacher (eval mode, no parameter gradients) and check it fits `data`.

    `path` is an afm-ray checkpoint (its stored config names the architecture, which must
    agree with `cfg.teacher.arch`) or a bare state dict built as `cfg.teacher` describes.
    """
    model, stored = load_model(path, data, device=device, fallback=cfg.teacher if cfg is not None else None)
    if stored is not None and cfg is not None and cfg.teacher.arch != stored.student.arch:
        raise ConfigError(f"teacher.checkpoint {path} holds a {stored.student.arch!r} but teacher.arch is "
                          f"{cfg.teacher.arch!r}; set teacher.arch={stored.student.arch}")
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afm_ray.teacher",
                                     description="Train (or reuse from cache) the robust teacher a config needs.")
    parser.add_argument("--config", help="YAML config (default: the embedded default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached teacher exists")
    parser.add_argument("--no-eval", action="store_true", help="skip the robustness evaluation")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    path = ensure_teacher(cfg, force=args.force)
    print(f"teacher checkpoint: {path}")
    if not args.no_eval:
        from afm_ray.evaluate import evaluate_checkpoint, format_results

        print(format_results(evaluate_checkpoint(path, cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
