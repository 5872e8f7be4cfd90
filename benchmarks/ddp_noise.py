"""How far apart are one-worker and two-worker (DDP) runs of the same config, against the run-to-run
noise? `python benchmarks/ddp_noise.py [--seeds 5]`, from the repository root; no Ray needed.

The simulated-cluster test (tests/test_cluster_sim.py) runs one trial of DDP_CONFIG with two Ray
Train workers on two nodes and compares its accuracy with a one-worker run of the same config. Its
tolerance comes from here: the same config trained with seeds 0..N-1 on one worker (plain
process) and on two workers (two processes, gloo over loopback, as Ray Train sets them up),
scored on every test image. Two workers keep the global batch: each takes half of it, so both
runs make the same number of optimiser steps on the same data per epoch; what differs is the
per-rank augmentation and attack noise and the order of the summed gradients. The report gives
each seed's accuracies, the seed-to-seed standard deviation per worker count, and the mean
difference with its standard error.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from afm_ray.config import from_flat, to_flat
from afm_ray.teacher.training import ensure_teacher
from afm_ray.train.loop import LocalReporter, train_fn_per_worker

# The config the simulated cluster's DDP trial runs (tests/test_cluster_sim.py imports it).
# optim.batch_size is the global batch: a run with W workers gives each batch_size / W.
DDP_CONFIG = {
    "data.name": "digits",
    "student.width": 8,
    "teacher.width": 16,
    "teacher.epochs": 10,
    "method.name": "advfunmatch",
    "attack.steps": 1,
    "attack.eps": 0.1,
    "optim.epochs": 5,
    "optim.batch_size": 64,
    "optim.lr": 0.2,
    "eval.samples": 0,  # every test image (360)
    "eval.attacks": "clean,pgd20",
    "eval.val_samples": 64,
    "run.device": "cpu",
}
METRICS = ("clean_acc", "pgd20_acc")


def worker_config(teacher: str, seed: int, workers: int) -> dict:
    flat = {**DDP_CONFIG, "teacher.checkpoint": teacher, "run.seed": seed}
    flat["optim.batch_size"] = DDP_CONFIG["optim.batch_size"] // workers
    return to_flat(from_flat(flat))


def _rank(rank: int, world: int, port: int, config: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            final = train_fn_per_worker(config, LocalReporter(tmp, log=lambda line: None))
        if rank == 0:
            torch.save({m: final[m] for m in METRICS}, out)
    finally:
        dist.destroy_process_group()


def run(teacher: str, seed: int, workers: int) -> dict[str, float]:
    """One training run on `workers` processes; its final accuracies."""
    config = worker_config(teacher, seed, workers)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "final.pt")
        if workers == 1:
            torch.set_num_threads(1)
            final = train_fn_per_worker(config, LocalReporter(tmp, log=lambda line: None))
            return {m: final[m] for m in METRICS}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_rank, args=(workers, port, config, out), nprocs=workers, join=True)
        return torch.load(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    cache = Path(tempfile.gettempdir()) / "afm_ray_ddp_noise_teacher"
    teacher = str(ensure_teacher(from_flat({**DDP_CONFIG, "teacher.cache_dir": str(cache)}), log=lambda line: None))
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for seed in range(args.seeds):
        for workers in (1, 2):
            results[workers].append(run(teacher, seed, workers))
            row = "  ".join(f"{m}={results[workers][-1][m]:.4f}" for m in METRICS)
            print(f"seed {seed}, {workers} worker(s): {row}", flush=True)
    print()
    n = 360  # digits' test split: every image is scored
    for metric in METRICS:
        one, two = [r[metric] for r in results[1]], [r[metric] for r in results[2]]
        diffs = [b - a for a, b in zip(one, two, strict=True)]
        sd1, sd2 = statistics.stdev(one), statistics.stdev(two)
        print(
            f"{metric}: 1 worker {statistics.mean(one):.4f} (sd {sd1:.4f}), 2 workers {statistics.mean(two):.4f} "
            f"(sd {sd2:.4f}); paired difference {statistics.mean(diffs):+.4f} (sd {statistics.stdev(diffs):.4f}, "
            f"{args.seeds} seeds, {n} test images each)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
