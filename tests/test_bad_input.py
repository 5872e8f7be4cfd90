"""The catalogue of bad inputs and faults: one row per input, every command.

Each row runs one command on one bad input (a value, a file, a service that is not there, a
full or read-only disk, a crafted pickle) and checks what a user sees and what is left:

- exit status 2 and exactly one line on stderr, `error: ...`, holding the expected fragment;
- nothing written: the row's folder (the working directory, the cache, the temp dir) holds
  the same files, sizes and times afterwards;
- nothing left running or started: no child process remains, Ray was never imported (it
  cannot have started), and for the rows run as `python -m afm_ray.<command>` no process of
  the command's session outlives it.

Most rows call the command in-process (`afm_ray.<command>.__main__.main`, the function behind
`python -m`); a representative subset runs the real `python -m afm_ray.<command>` in a
subprocess. Every row fails before any compute, so the file takes seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import yaml
from ray_head import free_port, session_processes

COMMANDS = ("train", "teacher", "evaluate", "sweep", "pareto", "export", "final")
# The function behind `python -m afm_ray.<command>`: the main of its package's __main__ module.
MAINS: dict[str, Callable[[list[str]], int]] = {
    command: importlib.import_module(f"afm_ray.{command}.__main__").main for command in COMMANDS
}
REPO = Path(__file__).resolve().parents[1]

SPACE = {
    "name": "tiny",
    "description": "a valid digits space; each row breaks one thing",
    "experiment": "tiny-bad-input",
    "fixed": {
        "data.name": "digits",
        "student.width": 8,
        "teacher.width": 8,
        "optim.epochs": 1,
        "teacher.checkpoint": "train",
    },
    "search": {"attack.eps": {"uniform": [0.05, 0.15]}},
    "num_samples": 1,
}


class Row(NamedTuple):
    cmd: str
    argv: tuple[str, ...]
    expect: str  # a fragment of the one-line message; both may hold {placeholders}
    setup: Callable[[Path, Any], dict[str, str]] | None = None
    subprocess: bool = False
    env: tuple[tuple[str, str], ...] = ()
    needs: str = ""  # "tmpfs": a tmpfs mount; "no-cuda": a machine without CUDA


# ----------------------------------------------------------------------------------- row inputs


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def space_file(tmp: Path, text: str | None = None, **changes: Any) -> dict[str, str]:
    raw = {**yaml.safe_load(yaml.safe_dump(SPACE)), **changes}
    return {"space": str(write(tmp / "space.yaml", text if text is not None else yaml.safe_dump(raw)))}


def config_file(text: str | bytes, name: str = "config.yaml") -> Callable[[Path, Any], dict[str, str]]:
    return lambda tmp, fx: {"file": str(write(tmp / name, text))}


def space_text(text: str | bytes) -> Callable[[Path, Any], dict[str, str]]:
    return lambda tmp, fx: {"space": str(write(tmp / "space.yaml", text))}


def valid_space(**changes: Any) -> Callable[[Path, Any], dict[str, str]]:
    return lambda tmp, fx: space_file(tmp, **changes)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n"
    for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)
SET_BOMB = (
    "[&a [x, x, x, x, x, x, x, x, x], "
    + ", ".join(
        f"&{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]"
        for a, b in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "]"
)
DEEP = "fixed: " + "[" * 1000 + "]" * 1000 + "\n"


class Evil:
    """A pickle payload that runs a shell command when loaded (the issue's crafted CIFAR batch)."""

    def __init__(self, call: Any, *args: Any):
        self.call, self.args = call, args

    def __reduce__(self) -> tuple:
        return self.call, self.args


def crafted_cifar(gadget: str) -> Callable[[Path, Any], dict[str, str]]:
    """A cifar-10-batches-py folder whose first batch would create `marker` when unpickled."""

    def setup(tmp: Path, fx: Any) -> dict[str, str]:
        marker = tmp.parent / f"{tmp.name}-marker"  # outside the row's folder: not part of its snapshot
        command = f"touch {marker}"
        payload = {
            "os.system": Evil(os.system, command),
            "eval": Evil(eval, f"__import__('os').system({command!r})"),
            "subprocess": Evil(subprocess.Popen, ["touch", str(marker)]),
        }[gadget]
        folder = tmp / "cifar" / "cifar-10-batches-py"
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
            write(folder / name, pickle.dumps({**batch, b"data": payload} if name == "data_batch_1" else batch))
        return {"root": str(tmp / "cifar"), "marker": str(marker)}

    return setup


def cifar_batch(data: bytes) -> Callable[[Path, Any], dict[str, str]]:
    def setup(tmp: Path, fx: Any) -> dict[str, str]:
        folder = tmp / "cifar" / "cifar-10-batches-py"
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            write(folder / name, data)
        return {"root": str(tmp / "cifar")}

    return setup


def checkpoint(state: Any = None, raw: bytes | None = None) -> Callable[[Path, Any], dict[str, str]]:
    def setup(tmp: Path, fx: Any) -> dict[str, str]:
        path = tmp / "ckpt" / "checkpoint.pt"
        path.parent.mkdir(parents=True)
        if raw is not None:
            path.write_bytes(raw)
        else:
            torch.save(state(fx) if callable(state) else state, path)
        return {"ckpt": str(path)}

    return setup


def crafted_checkpoint(tmp: Path, fx: Any) -> dict[str, str]:
    marker = tmp.parent / f"{tmp.name}-marker"
    path = write(tmp / "ckpt.pt", pickle.dumps({"model": Evil(os.system, f"touch {marker}"), "config": {}}))
    return {"ckpt": str(path), "marker": str(marker)}


def epoch_folder(tmp: Path, fx: Any) -> dict[str, str]:
    """A folder of two epoch checkpoints (afm-ray's, as a training run's output_dir holds them)."""
    for epoch in (1, 2):
        write(tmp / "epochs" / f"checkpoint_epoch{epoch:04d}" / "checkpoint.pt", Path(fx.ckpt).read_bytes())
    return {"folder": str(tmp / "epochs")}


def robustbench_wrn(tmp: Path, fx: Any) -> dict[str, str]:
    """A WRN-10-1's weights as RobustBench's / TRADES' WideResNet names them, wrapped and prefixed as
    an official script saves them (module., state_dict)."""
    from afm_ray.models import build_model

    model = build_model("wrn", num_classes=10, in_channels=1, mean=[0.0], std=[1.0], depth=10, width=1)
    keys = {}
    for key, value in model.state_dict().items():
        if not key.startswith("normalize."):
            key = re.sub(r"^net\.(block\d)\.(\d+)\.", r"\1.layer.\2.", key).removeprefix("net.")
            keys["module." + key.replace(".conv_shortcut.", ".convShortcut.")] = value
    path = tmp / "wrn.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": keys, "epoch": 76}, path)
    return {"ckpt": str(path)}


def under_a_file(tmp: Path, fx: Any) -> dict[str, str]:
    return {"file": str(write(tmp / "plain.txt", "a file, not a folder"))}


def symlinks(tmp: Path, fx: Any) -> dict[str, str]:
    (tmp / "dangling.yaml").symlink_to(tmp / "gone.yaml")
    (tmp / "loop_a.yaml").symlink_to(tmp / "loop_b.yaml")
    (tmp / "loop_b.yaml").symlink_to(tmp / "loop_a.yaml")
    return {}


def text_db(tmp: Path, fx: Any) -> dict[str, str]:
    return {"db": str(write(tmp / "not-a-db.db", "these are not the bytes of an SQLite database\n"))}


def existing_sweep(tmp: Path, fx: Any) -> dict[str, str]:
    (tmp / "ray_results" / "mine").mkdir(parents=True)
    return space_file(tmp)


def stored_config(config: Any) -> Callable[[Path, Any], dict[str, str]]:
    return checkpoint(lambda fx: {**torch.load(fx.ckpt, weights_only=True), "config": config})


def sweep(*extra: str, storage: str = "{tmp}/ray_results", tracking: str = "sqlite:///{tmp}/mlflow.db",
          optuna: str = "sqlite:///{tmp}/optuna.db", space: str = "{space}") -> tuple[str, ...]:  # fmt: skip
    return ("--space", space, "--storage", storage, "--tracking-uri", tracking, "--optuna-storage", optuna, *extra)


def sets(*pairs: str) -> tuple[str, ...]:
    return tuple(a for kv in pairs for a in ("--set", kv))


TINY = ("optim.epochs=1", "teacher.epochs=1", "student.width=4", "teacher.width=4")


# ----------------------------------------------------------------------------------- the rows

ROWS: dict[str, Row] = {
    # --- arguments
    "train-unknown-flag": Row("train", ("--bogus",), "unrecognized arguments: --bogus", subprocess=True),
    "sweep-num-samples-not-int": Row("sweep", ("--num-samples", "abc"), "argument --num-samples: invalid int value"),
    "evaluate-no-checkpoint-flag": Row("evaluate", (), "the following arguments are required: --checkpoint"),
    "evaluate-samples-not-int": Row("evaluate", ("--checkpoint", "x", "--samples", "1.5"), "invalid int value: '1.5'"),
    "pareto-no-experiment": Row("pareto", (), "the following arguments are required: --experiment"),
    "sweep-num-samples-zero": Row("sweep", ("--num-samples", "0", *sweep()), "--num-samples: got 0", valid_space()),
    # --- how many trials at once, and what each asks for (the space's resources overridden)
    "sweep-max-concurrent-zero": Row(
        "sweep",
        ("--max-concurrent-trials", "0", *sweep()),
        "--max-concurrent-trials: got 0, expected an integer >= 1",
        valid_space(),
    ),  # fmt: skip
    "sweep-max-concurrent-negative": Row(
        "sweep", ("--max-concurrent-trials", "-3", *sweep()), "--max-concurrent-trials: got -3", valid_space()
    ),  # fmt: skip
    "sweep-max-concurrent-not-int": Row(
        "sweep", ("--max-concurrent-trials", "2.5"), "argument --max-concurrent-trials: invalid int value: '2.5'"
    ),  # fmt: skip
    "sweep-cpus-per-worker-negative": Row(
        "sweep",
        ("--cpus-per-worker", "-1", *sweep()),
        "--cpus-per-worker: expected a number >= 0, got -1.0",
        valid_space(),
    ),  # fmt: skip
    "sweep-gpus-per-worker-not-number": Row(
        "sweep", ("--gpus-per-worker", "one"), "argument --gpus-per-worker: invalid float value: 'one'", subprocess=True
    ),  # fmt: skip
    "sweep-memory-per-worker-negative": Row(
        "sweep",
        ("--memory-per-worker", "-8", *sweep()),
        "--memory-per-worker: expected a number >= 0, got -8.0",
        valid_space(),
    ),  # fmt: skip
    "sweep-memory-per-worker-inf": Row(
        "sweep",
        ("--memory-per-worker", "inf", *sweep()),
        "--memory-per-worker: expected a number >= 0, got inf",
        valid_space(),
    ),  # fmt: skip
    "sweep-memory-per-worker-unit": Row(
        "sweep", ("--memory-per-worker", "8Gi"), "argument --memory-per-worker: invalid float value: '8Gi'"
    ),  # fmt: skip
    "sweep-num-workers-zero": Row(
        "sweep", ("--num-workers", "0", *sweep()), "--num-workers: expected an integer >= 1, got 0", valid_space()
    ),  # fmt: skip
    "space-memory-per-worker-negative": Row(
        "sweep",
        sweep(),
        "space.yaml: resources.memory_per_worker: expected a number >= 0, got -2",
        valid_space(resources={"memory_per_worker": -2}),
    ),  # fmt: skip
    "space-memory-per-worker-text": Row(
        "sweep",
        sweep(),
        "resources.memory_per_worker: expected a number >= 0, got '8Gi'",
        valid_space(resources={"memory_per_worker": "8Gi"}),
    ),  # fmt: skip
    "dry-run-no-node-fits": Row(
        "sweep",
        ("--dry-run", "--gpus-per-worker", "1", *sweep()),
        "no node of this machine (a sweep without --address runs its own Ray here) holds a Train worker of "
        "{{CPU 1, GPU 1}}",
        valid_space(),
        needs="no-cuda",
    ),  # fmt: skip
    # --- --set syntax
    "set-no-equals": Row("train", sets("attack.eps"), "expected key=value"),
    "set-no-key": Row("train", sets("=0.1"), "expected key=value"),
    "set-empty-value": Row("train", sets("attack.eps="), "--set attack.eps=: no value"),
    "set-twice": Row("train", sets("attack.eps=0.1", "attack.eps=0.2"), "--set attack.eps is given twice"),
    "set-twice-sweep": Row(
        "sweep", (*sweep(), *sets("optim.lr=0.1", "optim.lr=0.2")), "--set optim.lr is given twice", valid_space()
    ),  # fmt: skip
    "set-bad-yaml": Row("train", sets("attack.eps=[1"), "--set attack.eps: not valid YAML at line 1"),
    "set-value-nested-list": Row("train", sets("data.root=[[[&a [1,1], [*a,*a]]]]"), "data.root: got [[[[1, 1]"),
    "set-yaml-bomb": Row("train", sets("data.root=" + SET_BOMB), "--set data.root: its anchors and aliases expand"),
    "set-unknown-key": Row(
        "train", sets("attack.epss=0.1"), "--set: unknown config key 'attack.epss'; did you mean 'attack.eps'?"
    ),
    "set-python-tag": Row(
        "train", sets("data.root=!!python/object/apply:os.system [touch x]"), "--set data.root: not valid YAML"
    ),  # fmt: skip
    "sweep-set-blamed-on-set": Row(
        "sweep", (*sweep(), *sets("attack.steps=-2")), "--set: attack.steps: got -2, expected steps >= 0", valid_space()
    ),  # fmt: skip
    "sweep-set-unknown-key": Row(
        "sweep", (*sweep(), *sets("optim.lrr=1")), "--set: unknown config key 'optim.lrr'", valid_space()
    ),  # fmt: skip
    # --- values: finite, in range, of the right type
    "lr-inf": Row("train", sets("optim.lr=inf"), "optim.lr: got 'inf', expected a finite number"),
    "lr-yaml-inf": Row("train", sets("optim.lr=.inf"), "optim.lr: got inf, expected a finite number"),
    "lr-nan": Row("train", sets("optim.lr=nan"), "optim.lr: got 'nan', expected a finite number"),
    "lr-overflow": Row("train", sets("optim.lr=1e400"), "optim.lr: got '1e400', expected a finite number"),
    "lr-negative": Row("train", sets("optim.lr=-0.1"), "optim.lr: got -0.1, expected lr > 0"),
    "tau-inf": Row("train", sets("method.tau=.inf"), "method.tau: got inf, expected a finite number"),
    "eval-eps-inf": Row("train", sets("eval.eps=inf"), "eval.eps: got 'inf', expected a finite number"),
    "eval-eps-over-1": Row("train", sets("eval.eps=2"), "eval.eps: got 2.0, expected <= 1 for linf"),
    "eval-eps-negative": Row("teacher", sets("eval.eps=-0.1"), "eval.eps: got -0.1, expected eps >= 0"),
    "eps-division-by-zero": Row("train", sets("attack.eps=1/0"), "attack.eps: got '1/0', expected a number"),
    "steps-not-int": Row("train", sets("attack.steps=2.5"), "attack.steps: got 2.5, expected an integer"),
    "seed-huge": Row(
        "train",
        sets("run.seed=99999999999999999999999"),
        "run.seed: got 99999999999999999999999, expected an integer of at most 19 digits",
    ),  # fmt: skip
    "epochs-float-text": Row("train", sets("optim.epochs=1e30"), "optim.epochs: got '1e30', expected an integer"),
    "image-size-huge": Row("train", sets("data.image_size=100000"), "data.image_size: got 100000, expected 0"),
    "device-cudaX": Row(
        "train",
        sets("run.device=cudaX"),
        "run.device: got 'cudaX', expected auto, cpu, cuda or cuda:N",
    ),  # fmt: skip
    "device-cuda-absent": Row(
        "train", sets(*TINY, "run.device=cuda"), "run.device: 'cuda' requested but no CUDA", needs="no-cuda"
    ),  # fmt: skip
    "device-cuda-index": Row(
        "teacher", sets(*TINY, "run.device=cuda:7"), "run.device: 'cuda:7' requested", needs="no-cuda"
    ),  # fmt: skip
    "dataset-unknown": Row("train", sets("data.name=imagenet"), "data.name: unknown value 'imagenet'"),
    "method-unknown": Row("train", sets("method.name=distill"), "method.name: unknown value 'distill'"),
    "arch-unknown": Row("teacher", sets("teacher.arch=vit"), "teacher.arch: unknown value 'vit'"),
    "warmup-too-long": Row("train", sets("optim.warmup_epochs=20", "optim.epochs=10"), "optim.warmup_epochs: got 20"),
    "policy-typo": Row("train", sets("augment.policy=autoaugmnt"), "augment.policy:"),
    "attack-unknown": Row("train", sets("eval.attacks=clean,pgd50"), "eval.attacks: unknown value 'pgd50'"),
    "bool-garbage": Row("train", sets("optim.nesterov=maybe"), "optim.nesterov: got 'maybe', expected true or false"),
    "alpha-out-of-range": Row("train", sets("method.name=ard", "method.alpha=2"), "method.alpha: got 2.0"),
    "hparam-not-taken": Row(
        "train", sets("method.name=pgd_at", "method.tau=2"), "method.tau: pgd_at has no hyperparameter 'tau'"
    ),
    "batch-size-zero": Row("train", sets("optim.batch_size=0"), "optim.batch_size: got 0, expected >= 1"),
    "unicode-value": Row("train", sets("augment.policy=crop_flip✓"), "augment.policy:"),
    # --- config files
    "config-missing": Row("train", ("--config", "{tmp}/nope.yaml"), "config file '{tmp}/nope.yaml' does not exist"),
    "config-unicode-path": Row(
        "train", ("--config", "{tmp}/конфиг ü.yaml"), "'{tmp}/конфиг ü.yaml' does not exist", subprocess=True
    ),  # fmt: skip
    "config-directory": Row(
        "train",
        (
            "--config",
            "{tmp}",
        ),
        "config file '{tmp}' is a directory",
    ),
    "config-binary": Row(
        "train",
        ("--config", "{file}"),
        "is a binary file, not YAML text",
        config_file(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    ),  # fmt: skip
    "config-latin1": Row(
        "teacher",
        ("--config", "{file}"),
        "is not UTF-8 text (byte 0xe9 at offset 13)",
        config_file("run:\n  seed: \xe9t\xe9\n".encode("latin-1")),
    ),  # fmt: skip
    "config-malformed": Row(
        "train",
        ("--config", "{file}"),
        "not valid YAML at line 3",
        config_file("attack:\n  eps: [0.1\n"),
    ),  # fmt: skip
    "config-empty": Row("train", ("--config", "{file}"), "is empty; expected a YAML mapping", config_file("")),
    "config-comments-only": Row("train", ("--config", "{file}"), "is empty", config_file("# nothing here\n")),
    "config-list": Row(
        "train",
        ("--config", "{file}"),
        "expected a YAML mapping at the top, got a list",
        config_file("- attack.eps: 0.1\n"),
    ),  # fmt: skip
    "config-scalar": Row("train", ("--config", "{file}"), "got a str", config_file("just words\n")),
    "config-duplicate-key": Row(
        "train",
        ("--config", "{file}"),
        "key 'eps' is given twice (first on line 2)",
        config_file("attack:\n  eps: 0.1\n  eps: 0.2\n"),
    ),  # fmt: skip
    "config-nested-and-dotted": Row(
        "train",
        ("--config", "{file}"),
        "'attack.eps' is given twice (nested and dotted)",
        config_file("attack:\n  eps: 0.1\nattack.eps: 0.2\n"),
    ),  # fmt: skip
    "config-yaml-bomb": Row("train", ("--config", "{file}"), "expand to more than 100,000 values", config_file(BOMB)),
    "config-recursive-alias": Row(
        "train", ("--config", "{file}"), "an alias refers to the node that contains it", config_file("a: &x [1, *x]\n")
    ),  # fmt: skip
    "config-deep-nesting": Row("train", ("--config", "{file}"), "nested too deeply", config_file(DEEP)),
    "config-python-tag": Row(
        "train",
        ("--config", "{file}"),
        "could not determine a constructor",
        config_file("run: !!python/object/apply:os.system ['touch x']\n"),
    ),  # fmt: skip
    "config-dangling-symlink": Row("train", ("--config", "{tmp}/dangling.yaml"), "is a broken symlink", symlinks),
    "config-symlink-loop": Row("train", ("--config", "{tmp}/loop_a.yaml"), "is a symlink loop", symlinks),
    "config-device-file": Row("train", ("--config", "/dev/zero"), "is not a regular file (a device, pipe or socket)"),
    "config-too-large": Row(
        "train",
        ("--config", "{file}"),
        "is 2,097,152 bytes; a config file is YAML text of at most",
        config_file("#" * (2 << 20)),
    ),  # fmt: skip
    "config-under-a-file": Row("train", ("--config", "{file}/x.yaml"), "a part of the path is a file", under_a_file),
    "config-bad-value": Row(
        "train",
        ("--config", "{file}"),
        "config file '{file}': attack.steps: got -1",
        config_file("attack:\n  steps: -1\n"),
    ),  # fmt: skip
    "config-unknown-key": Row(
        "teacher", ("--config", "{file}"), "unknown config key 'atack.eps'", config_file("atack:\n  eps: 0.1\n")
    ),  # fmt: skip
    "config-ok-set-bad": Row(
        "train",
        ("--config", "{file}", *sets("attack.steps=-4")),
        "--set: attack.steps: got -4",
        config_file("attack:\n  steps: 3\n"),
    ),  # fmt: skip
    # --- search spaces
    "space-missing": Row("sweep", sweep(space="{tmp}/nope.yaml"), "does not exist; see search_spaces/"),
    "space-directory": Row("sweep", sweep(space="{tmp}"), "search space '{tmp}' is a directory", subprocess=True),
    "space-empty": Row("sweep", sweep(), "search space '{space}' is empty", space_text("")),
    "space-no-search": Row("sweep", sweep(), "search is empty", space_text("fixed:\n  data.name: digits\n")),
    "space-empty-search": Row(
        "sweep", sweep(), "search is empty", space_text("search: {}\nfixed: {data.name: digits}\n")
    ),
    "space-duplicate-key": Row(
        "sweep",
        sweep(),
        "key 'search' is given twice",
        space_text("search: {attack.eps: {uniform: [0, 0.1]}}\nsearch: {}\n"),
    ),  # fmt: skip
    "space-binary": Row("sweep", sweep(), "is a binary file", space_text(b"\x00\x01\x02")),
    "space-not-utf8": Row("sweep", sweep(), "is not UTF-8 text", space_text(b"name: \xff\xfe\n")),
    "space-malformed": Row(
        "sweep", sweep(), "not valid YAML at line", space_text("search: {attack.eps: [\n")
    ),  # fmt: skip
    "space-yaml-bomb": Row("sweep", sweep(), "expand to more than", space_text(BOMB)),
    "space-num-samples-zero": Row(
        "sweep", sweep(), "num_samples: expected an integer >= 1", valid_space(num_samples=0)
    ),
    "space-unknown-top-key": Row("sweep", sweep(), "unknown top-level key 'searh'", valid_space(searh={})),
    "space-fixed-bad-value": Row(
        "sweep",
        sweep(),
        "space.yaml: fixed: attack.steps: got -3",
        valid_space(fixed={"data.name": "digits", "attack.steps": -3}),
    ),  # fmt: skip
    "space-lr-inf": Row(
        "sweep", sweep(), "search.optim.lr", valid_space(search={"optim.lr": {"uniform": [0.1, 1e400]}})
    ),
    # --- sweep plan: data, cluster, stores, names (all before Ray)
    "sweep-data-missing": Row(
        "sweep",
        sweep(),
        "data.root: cifar10: data_batch_1",
        valid_space(fixed={"data.name": "cifar10", "data.root": "/nonexistent"}),
    ),  # fmt: skip
    "sweep-parquet-missing": Row(
        "sweep",
        sweep(),
        "data.root: /nonexistent/pq does not exist",
        valid_space(fixed={"data.name": "parquet", "data.root": "/nonexistent/pq"}),
    ),  # fmt: skip
    "address-closed-port": Row(
        "sweep",
        (*sweep(), "--address", "127.0.0.1:{closed_port}"),
        "no Ray GCS answers at 127.0.0.1:{closed_port}",
        valid_space(),
        subprocess=True,
    ),  # fmt: skip
    "address-env-closed-port": Row(
        "sweep",
        sweep(),
        "--address 127.0.0.1:{closed_port}: no Ray GCS answers",
        valid_space(),
        env=(("RAY_ADDRESS", "127.0.0.1:{closed_port}"),),
    ),  # fmt: skip
    "address-no-port": Row("sweep", (*sweep(), "--address", "headnode"), "expected host:port", valid_space()),
    "address-dashboard-url": Row(
        "sweep", (*sweep(), "--address", "http://127.0.0.1:8265"), "dashboard's job-submission address", valid_space()
    ),  # fmt: skip
    "address-http-server": Row(
        "sweep", (*sweep(), "--address", "127.0.0.1:{http_port}"), "it does not speak gRPC", valid_space()
    ),  # fmt: skip
    "address-silent": Row(
        "sweep",
        (*sweep(), "--address", "127.0.0.1:{silent_port}"),
        "(timed out)",
        valid_space(),
        env=(("AFM_RAY_PROBE_TIMEOUT_S", "1"),),
    ),  # fmt: skip
    "address-ray-client-closed": Row(
        "sweep", (*sweep(), "--address", "ray://127.0.0.1:{closed_port}"), "no Ray client server answers", valid_space()
    ),  # fmt: skip
    "address-unresolvable": Row(
        "sweep",
        (*sweep(), "--address", "no-such-host.invalid:6379"),
        "no Ray GCS answers at no-such-host.invalid:6379",
        valid_space(),
    ),  # fmt: skip
    "probe-timeout-garbage": Row(
        "sweep",
        (*sweep(), "--address", "127.0.0.1:1"),
        "$AFM_RAY_PROBE_TIMEOUT_S: got 'soon'",
        valid_space(),
        env=(("AFM_RAY_PROBE_TIMEOUT_S", "soon"),),
    ),  # fmt: skip
    "optuna-not-a-url": Row("sweep", sweep(optuna="optuna.db"), "not an SQLAlchemy URL", valid_space()),
    "optuna-in-memory": Row("sweep", sweep(optuna="sqlite:///:memory:"), "an in-memory database", valid_space()),
    "optuna-unknown-dialect": Row(
        "sweep", sweep(optuna="nosuchdb://h/x"), "--optuna-storage 'nosuchdb://h/x'", valid_space()
    ),  # fmt: skip
    "optuna-server-closed": Row(
        "sweep",
        sweep(optuna="postgresql://u@127.0.0.1:{closed_port}/db"),
        "--optuna-storage 'postgresql://",
        valid_space(),
    ),  # fmt: skip
    "optuna-not-sqlite": Row(
        "sweep",
        sweep(optuna="sqlite:///{db}"),
        "exists but is not an SQLite database",
        lambda tmp, fx: {**text_db(tmp, fx), **space_file(tmp)},
    ),  # fmt: skip
    "optuna-folder-missing": Row(
        "sweep",
        sweep(optuna="sqlite:////nonexistent/dir/optuna.db"),
        "folder /nonexistent/dir does not exist or is not writable",
        valid_space(),
    ),  # fmt: skip
    "storage-under-a-file": Row(
        "sweep",
        sweep(storage="{file}/results"),
        "--storage {file}/results: not writable",
        lambda tmp, fx: {**under_a_file(tmp, fx), **space_file(tmp)},
        subprocess=True,
    ),  # fmt: skip
    "storage-full-disk": Row(
        "sweep", sweep(storage="{full}/results"), "No space left on device", valid_space(), needs="tmpfs"
    ),  # fmt: skip
    "storage-read-only": Row(
        "sweep", sweep(storage="{ro}/results"), "Read-only file system", valid_space(), needs="tmpfs"
    ),  # fmt: skip
    "tracking-unreachable": Row(
        "sweep",
        sweep(tracking="http://127.0.0.1:{closed_port}"),
        "MLflow tracking server http://127.0.0.1:{closed_port} is unreachable",
        valid_space(),
        subprocess=True,
    ),  # fmt: skip
    "tracking-not-mlflow": Row(
        "sweep", sweep(tracking="http://127.0.0.1:{http_port}"), "answered HTTP 404", valid_space()
    ),  # fmt: skip
    "tracking-silent": Row(
        "sweep",
        sweep(tracking="http://127.0.0.1:{silent_port}"),
        "is unreachable",
        valid_space(),
        env=(("AFM_RAY_PROBE_TIMEOUT_S", "1"),),
    ),  # fmt: skip
    "tracking-file-store": Row("sweep", sweep(tracking="mlruns"), "MLflow's file store is disabled", valid_space()),
    "tracking-relative-sqlite": Row(
        "sweep", sweep(tracking="sqlite:///mlflow.db"), "use an absolute SQLite URI", valid_space()
    ),  # fmt: skip
    "tracking-not-sqlite": Row(
        "sweep",
        sweep(tracking="sqlite:///{db}"),
        "exists but is not an SQLite database",
        lambda tmp, fx: {**text_db(tmp, fx), **space_file(tmp)},
    ),  # fmt: skip
    "tracking-deleted-experiment": Row(
        "sweep",
        (*sweep(tracking="{mlflow_uri}"), "--experiment", "gone"),
        "MLflow experiment 'gone' is deleted",
        valid_space(),
    ),  # fmt: skip
    "sweep-name-path": Row(
        "sweep", (*sweep(), "--name", "../escape"), "--name '../escape': use letters", valid_space()
    ),
    "sweep-exists": Row(
        "sweep", (*sweep(), "--name", "mine"), "sweep {tmp}/ray_results/mine already exists", existing_sweep
    ),  # fmt: skip
    "resume-unknown-name": Row(
        "sweep", (*sweep(), "--resume", "--name", "nosuch"), "--resume: no sweep 'nosuch'", valid_space()
    ),  # fmt: skip
    "resume-nothing": Row("sweep", (*sweep(), "--resume"), "--resume: no sweep of space 'tiny'", valid_space()),
    # --- data in train / teacher / evaluate
    "train-cifar-missing": Row(
        "train",
        sets(*TINY, "data.name=cifar10", "data.root={tmp}/nowhere"),
        "data.root: cifar10: data_batch_1",
    ),  # fmt: skip
    "train-cifar-no-root": Row("train", sets(*TINY, "data.name=cifar10"), "needs root="),
    "teacher-parquet-missing": Row(
        "teacher", sets(*TINY, "data.name=parquet", "data.root={tmp}/pq"), "data.root: {tmp}/pq does not exist"
    ),  # fmt: skip
    "train-mnist-not-gzip": Row(
        "train",
        sets(*TINY, "data.name=mnist5k", "data.root={file}"),
        "is not a gzip CSV",
        config_file("1,2,3\n", "mnist_5k.csv.gz"),
    ),  # fmt: skip
    "train-parquet-corrupt": Row(
        "train",
        sets(*TINY, "data.name=parquet", "data.root={file}"),
        "not a readable Parquet file",
        config_file(b"PAR1 not really", "train.parquet"),
    ),  # fmt: skip
    "train-cifar-not-pickle": Row(
        "train",
        sets(*TINY, "data.name=cifar10", "data.root={root}"),
        "is not a CIFAR python pickle",
        cifar_batch(b"plain text"),
    ),  # fmt: skip
    "train-cifar-truncated": Row(
        "train",
        sets(*TINY, "data.name=cifar10", "data.root={root}"),
        "is not a CIFAR python pickle",
        cifar_batch(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:40]),
    ),  # fmt: skip
    "train-cifar-wrong-shape": Row(
        "train",
        sets(*TINY, "data.name=cifar10", "data.root={root}"),
        "b'data' is uint8 (2, 1024) with 2 labels",
        cifar_batch(pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})),
    ),  # fmt: skip
    "train-crafted-cifar-system": Row(
        "train",
        sets(*TINY, "data.name=cifar10", "data.root={root}"),
        "refused to unpickle posix.system",
        crafted_cifar("os.system"),
        subprocess=True,
    ),  # fmt: skip
    "teacher-crafted-cifar-eval": Row(
        "teacher",
        sets(*TINY, "data.name=cifar10", "data.root={root}"),
        "refused to unpickle builtins.eval",
        crafted_cifar("eval"),
    ),  # fmt: skip
    "train-crafted-cifar-popen": Row(
        "train",
        sets(*TINY, "data.name=cifar10", "data.root={root}"),
        "refused to unpickle subprocess.Popen",
        crafted_cifar("subprocess"),
    ),  # fmt: skip
    "evaluate-crafted-cifar-via-checkpoint": Row(
        "evaluate",
        ("--checkpoint", "{ckpt}"),
        "refused to unpickle posix.system",
        lambda tmp, fx: (
            crafted_cifar("os.system")(tmp, fx)
            | stored_config({"data.name": "cifar10", "data.root": str(tmp / "cifar")})(tmp, fx)
        ),
    ),  # fmt: skip
    # --- checkpoints
    "teacher-ckpt-missing": Row(
        "train", sets(*TINY, "teacher.checkpoint={tmp}/none.pt"), "teacher.checkpoint: no checkpoint at"
    ),  # fmt: skip
    "teacher-ckpt-empty": Row(
        "train",
        sets(*TINY, "teacher.checkpoint={ckpt}"),
        "cannot be loaded with weights_only",
        checkpoint(raw=b""),
        subprocess=True,
    ),  # fmt: skip
    "teacher-ckpt-crafted": Row(
        "train", sets(*TINY, "teacher.checkpoint={ckpt}"), "cannot be loaded with weights_only", crafted_checkpoint
    ),  # fmt: skip
    "teacher-ckpt-text": Row(
        "teacher",
        sets(*TINY, "teacher.checkpoint={ckpt}"),
        "cannot be loaded with weights_only",
        checkpoint(raw=b"hello"),
    ),  # fmt: skip
    "teacher-ckpt-wrong-arch": Row(
        "train",
        sets(*TINY, "teacher.arch=resnet18", "teacher.checkpoint={ckpt}"),
        "holds a 'small_cnn' but teacher.arch is 'resnet18'",
        checkpoint(lambda fx: torch.load(fx.ckpt, weights_only=True)),
    ),  # fmt: skip
    "teacher-ckpt-list": Row(
        "train",
        sets(*TINY, "teacher.checkpoint={ckpt}"),
        "expected an afm-ray checkpoint or a state dict of tensors",
        checkpoint([1, 2, 3]),
    ),  # fmt: skip
    "resume-missing": Row(
        "train", sets(*TINY, "method.name=pgd_at", "run.resume_from={tmp}/none"), "run.resume_from: no checkpoint at"
    ),  # fmt: skip
    # --- which weights are the student; the teacher ensemble, teacher.select, teachers from outside
    "student-select-unknown": Row(
        "train", sets("student.select=best"), "student.select: unknown value 'best'; did you mean 'best_pgd'?"
    ),  # fmt: skip
    "student-average-unknown": Row("train", sets("student.average=ewa"), "student.average: unknown value 'ewa'"),
    "ema-decay-out-of-range": Row(
        "train", sets("student.ema_decay=1.5"), "student.ema_decay: got 1.5, expected 0 < decay < 1"
    ),  # fmt: skip
    "swa-start-out-of-range": Row(
        "sweep",
        (*sweep(), *sets("student.swa_start=1")),
        "student.swa_start: got 1.0, expected 0 <= fraction < 1",
        valid_space(),
    ),  # fmt: skip
    "teacher-select-unknown": Row(
        "teacher", sets("teacher.select=best"), "teacher.select: got 'best', expected one of"
    ),
    "teacher-select-beyond-trained-epochs": Row(
        "train",
        sets(*TINY, "teacher.select=epoch:9"),
        "teacher.select: epoch:9 but the teacher is trained for teacher.epochs=1",
    ),  # fmt: skip
    "teacher-select-beyond-folder": Row(
        "train",
        sets(*TINY, "teacher.checkpoint={folder}", "teacher.select=epoch:9"),
        "teacher.select: epoch:9 but teacher.checkpoint {folder} holds epochs 1..2",
        epoch_folder,
    ),  # fmt: skip
    "teacher-select-on-one-checkpoint": Row(
        "teacher",
        sets(*TINY, "teacher.checkpoint={ckpt}", "teacher.select=best_pgd"),
        "is one checkpoint, not a folder of epoch checkpoints",
        checkpoint(lambda fx: torch.load(fx.ckpt, weights_only=True)),
    ),  # fmt: skip
    "teacher-ensemble-member-missing": Row(
        "train",
        sets(*TINY, "teacher.checkpoint={ckpt},{tmp}/none.pt"),
        "teacher.checkpoint: no checkpoint at '{tmp}/none.pt'",
        checkpoint(lambda fx: torch.load(fx.ckpt, weights_only=True)),
    ),  # fmt: skip
    "teacher-ensemble-member-missing-sweep": Row(
        "sweep",
        sweep(),
        "teacher.checkpoint: nothing at '{tmp}/none.pt'",
        lambda tmp, fx: space_file(tmp, fixed={**SPACE["fixed"], "teacher.checkpoint": f"{fx.ckpt},{tmp}/none.pt"}),
    ),  # fmt: skip
    "teacher-ensemble-train-member": Row(
        "train", sets("teacher.checkpoint=train,{tmp}/a.pt"), "'train' cannot be an ensemble member"
    ),  # fmt: skip
    "teacher-external-mismatch": Row(
        "train",
        sets(
            "data.name=digits", "teacher.arch=wrn", "teacher.depth=16", "teacher.width=1", "teacher.checkpoint={ckpt}"
        ),
        "does not match architecture 'wrn' (depth 16, width 1): 36 keys missing",
        robustbench_wrn,
    ),  # fmt: skip
    "evaluate-ckpt-missing": Row(
        "evaluate", ("--checkpoint", "{tmp}/none.pt"), "no checkpoint at '{tmp}/none.pt'", subprocess=True
    ),  # fmt: skip
    "evaluate-ckpt-empty": Row("evaluate", ("--checkpoint", "{ckpt}"), "(EOFError", checkpoint(raw=b"")),
    "evaluate-ckpt-dir-empty": Row(
        "evaluate", ("--checkpoint", "{tmp}"), "expected a directory containing checkpoint.pt"
    ),
    "evaluate-ckpt-crafted": Row(
        "evaluate", ("--checkpoint", "{ckpt}"), "not a loadable afm-ray checkpoint", crafted_checkpoint
    ),  # fmt: skip
    "evaluate-ckpt-no-config": Row(
        "evaluate",
        ("--checkpoint", "{ckpt}"),
        "expected keys 'model' and 'config'",
        checkpoint({"weights": torch.zeros(2)}),
    ),  # fmt: skip
    "evaluate-ckpt-config-list": Row(
        "evaluate", ("--checkpoint", "{ckpt}"), "its stored config is a list", checkpoint({"model": {}, "config": [1]})
    ),  # fmt: skip
    "evaluate-ckpt-config-invalid": Row(
        "evaluate",
        ("--checkpoint", "{ckpt}"),
        "its stored config is invalid (attack.steps: got -1",
        stored_config({"attack.steps": -1}),
    ),  # fmt: skip
    "evaluate-ckpt-model-not-tensors": Row(
        "evaluate",
        ("--checkpoint", "{ckpt}"),
        "its 'model' entry is not a state dict",
        checkpoint(lambda fx: {**torch.load(fx.ckpt, weights_only=True), "model": [1, 2]}),
    ),  # fmt: skip
    "evaluate-data-gone": Row(
        "evaluate",
        ("--checkpoint", "{ckpt}"),
        "data.root: cifar10: data_batch_1",
        stored_config({"data.name": "cifar10", "data.root": "/gone"}),
    ),  # fmt: skip
    "evaluate-eps-over-1": Row(
        "evaluate",
        ("--checkpoint", "{ckpt}", "--eps", "2"),
        "--eps: eval.eps: got 2.0",
        checkpoint(lambda fx: torch.load(fx.ckpt, weights_only=True)),
    ),  # fmt: skip
    "evaluate-eps-text": Row(
        "evaluate",
        ("--checkpoint", "{ckpt}", "--eps", "big"),
        "--eps: eval.eps: got 'big'",
        checkpoint(lambda fx: torch.load(fx.ckpt, weights_only=True)),
    ),  # fmt: skip
    "evaluate-attacks-unknown": Row(
        "evaluate",
        ("--checkpoint", "{ckpt}", "--attacks", "clean,pgd99"),
        "--attacks: eval.attacks: unknown value 'pgd99'",
        checkpoint(lambda fx: torch.load(fx.ckpt, weights_only=True)),
    ),  # fmt: skip
    "evaluate-samples-negative": Row(
        "evaluate",
        ("--checkpoint", "{ckpt}", "--samples", "-1"),
        "--samples: got -1",
        checkpoint(lambda fx: torch.load(fx.ckpt, weights_only=True)),
    ),  # fmt: skip
    "evaluate-set-device": Row(
        "evaluate",
        ("--checkpoint", "{ckpt}", *sets("run.device=cuda:3")),
        "'cuda:3' requested",
        checkpoint(lambda fx: torch.load(fx.ckpt, weights_only=True)),
        needs="no-cuda",
    ),  # fmt: skip
    "evaluate-set-blamed-on-set": Row(
        "evaluate",
        ("--checkpoint", "{ckpt}", *sets("eval.samples=-5")),
        "--set: eval.samples: got -5",
        checkpoint(lambda fx: torch.load(fx.ckpt, weights_only=True)),
    ),  # fmt: skip
    # --- folders a run writes
    "output-dir-under-a-file": Row(
        "train", sets(*TINY, "run.output_dir={file}/runs"), "run.output_dir {file}/runs: not writable", under_a_file
    ),  # fmt: skip
    "output-dir-read-only": Row(
        "train", sets(*TINY, "run.output_dir={ro}/runs"), "Read-only file system", needs="tmpfs"
    ),  # fmt: skip
    "teacher-cache-under-a-file": Row(
        "teacher",
        sets(*TINY, "teacher.cache_dir={file}/cache"),
        "teacher cache {file}/cache: not writable",
        under_a_file,
    ),  # fmt: skip
    "teacher-cache-full-disk": Row(
        "teacher", sets(*TINY, "teacher.cache_dir={full}/cache"), "No space left on device", needs="tmpfs"
    ),  # fmt: skip
    "teacher-cache-env-under-a-file": Row(
        "train",
        sets(*TINY),
        "teacher cache {file}/c/teachers: not writable",
        under_a_file,
        env=(("AFM_RAY_CACHE", "{file}/c"),),
    ),  # fmt: skip
    # --- export
    "export-unknown-flag": Row(
        "export", ("--bogus",), "the following arguments are required: --format, --out", subprocess=True
    ),  # fmt: skip
    "export-no-model": Row(
        "export", ("--format", "onnx", "--out", "{tmp}/out"), "one of the arguments --model --trial is required"
    ),  # fmt: skip
    "export-unknown-trial": Row(
        "export",
        ("--trial", "917f2149", "--format", "onnx", "--out", "{tmp}/out", "--tracking-uri", "{mlflow_uri}"),
        "--trial '917f2149': no trial run has that trial id, run name or run id",
    ),  # fmt: skip
    "export-unknown-format": Row(
        "export", ("--model", "runs:/abc", "--format", "pdf", "--out", "{tmp}/out"), "argument --format: invalid choice"
    ),  # fmt: skip
    "export-batch-zero": Row(
        "export", ("--model", "runs:/abc", "--format", "onnx", "--out", "{tmp}/out", "--batch", "0"), "--batch: got 0"
    ),  # fmt: skip
    "export-not-a-model-uri": Row(
        "export",
        ("--model", "s3://bucket/student", "--format", "onnx", "--out", "{tmp}/out", "--tracking-uri", "{mlflow_uri}"),
        "expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID",
    ),  # fmt: skip
    "export-unknown-model": Row(
        "export",
        (
            "--model",
            "models:/nope@pareto-1",
            "--format",
            "onnx",
            "--out",
            "{tmp}/out",
            "--tracking-uri",
            "{mlflow_uri}",
        ),
        "models:/nope@pareto-1",
    ),  # fmt: skip
    "export-no-database": Row(
        "export",
        ("--model", "runs:/abc", "--format", "onnx", "--out", "{tmp}/out", "--tracking-uri", "sqlite:///{tmp}/typo.db"),
        "no MLflow database at {tmp}/typo.db",
    ),  # fmt: skip
    # --- final (python -m afm_ray.final)
    "final-unknown-recipe": Row(
        "final",
        ("--recipe", "rslad_cifar10"),
        "--recipe: unknown recipe 'rslad_cifar10'; did you mean",
        subprocess=True,
    ),  # fmt: skip
    "final-seeds-zero": Row(
        "final", ("--recipe", "rslad_cifar10_resnet18", "--seeds", "0"), "--seeds 0: expected >= 1"
    ),  # fmt: skip
    "final-samples-negative": Row(
        "final", ("--recipe", "rslad_cifar10_resnet18", "--samples", "-5"), "--samples -5: expected >= 0"
    ),  # fmt: skip
    "final-unknown-trial": Row(
        "final",
        ("--experiment", "kept", "--trial", "nope", "--tracking-uri", "{mlflow_uri}"),
        "--trial 'nope': experiment 'kept' has no trial runs",
    ),  # fmt: skip
    "final-unknown-experiment": Row(
        "final", ("--experiment", "nope", "--tracking-uri", "{mlflow_uri}"), "experiment 'nope' not found"
    ),  # fmt: skip
    "final-override-rejected": Row(
        "final",
        ("--recipe", "rslad_cifar10_resnet18", *sets("optim.epochs=0")),
        "--set: optim.epochs: got 0, expected >= 1",
    ),  # fmt: skip
    "final-override-unknown-key": Row(
        "final",
        ("--recipe", "adaad_cifar10_resnet18", *sets("optim.epoch=300")),
        "unknown config key 'optim.epoch'; did you mean 'optim.epochs'?",
    ),  # fmt: skip
    "final-no-source": Row("final", (), "give either --recipe NAME"),
    "final-recipe-and-trial": Row(
        "final", ("--recipe", "rslad_cifar10_resnet18", "--trial", "abc"), "give either --recipe NAME"
    ),  # fmt: skip
    "final-out-suffix": Row("final", ("--recipe", "rslad_cifar10_resnet18", "--out", "t.xlsx"), ".csv or .md"),
    # --- pareto
    "pareto-unreachable": Row(
        "pareto",
        ("--experiment", "x", "--tracking-uri", "http://127.0.0.1:{closed_port}"),
        "MLflow tracking server http://127.0.0.1:{closed_port} is unreachable",
        subprocess=True,
    ),  # fmt: skip
    "pareto-silent-server": Row(
        "pareto",
        ("--experiment", "x", "--tracking-uri", "http://127.0.0.1:{silent_port}"),
        "is unreachable",
        env=(("AFM_RAY_PROBE_TIMEOUT_S", "1"),),
    ),  # fmt: skip
    "pareto-not-mlflow": Row(
        "pareto", ("--experiment", "x", "--tracking-uri", "http://127.0.0.1:{http_port}"), "answered HTTP 404"
    ),  # fmt: skip
    "pareto-no-database": Row(
        "pareto",
        ("--experiment", "x", "--tracking-uri", "sqlite:///{tmp}/typo.db"),
        "no MLflow database at {tmp}/typo.db",
    ),  # fmt: skip
    "pareto-unknown-experiment": Row(
        "pareto", ("--experiment", "nope", "--tracking-uri", "{mlflow_uri}"), "experiment 'nope' not found"
    ),  # fmt: skip
    "pareto-deleted-experiment": Row(
        "pareto", ("--experiment", "gone", "--tracking-uri", "{mlflow_uri}"), "experiment 'gone' is deleted"
    ),  # fmt: skip
    "pareto-bad-objective": Row(
        "pareto", ("--experiment", "x", "--objectives", "aa_acc"), "--objectives: bad objective 'aa_acc'"
    ),  # fmt: skip
    "pareto-objective-twice": Row(
        "pareto", ("--experiment", "x", "--objectives", "aa_acc:max", "aa_acc:min"), "given more than once: aa_acc"
    ),  # fmt: skip
    "pareto-out-suffix": Row("pareto", ("--experiment", "x", "--out", "t.xlsx"), ".parquet or .csv"),
    "pareto-out-directory": Row(
        "pareto",
        ("--experiment", "x", "--out", "{tmp}/t.csv"),
        "--out {tmp}/t.csv: is a directory",
        lambda tmp, fx: (tmp / "t.csv").mkdir() or {},
    ),  # fmt: skip
    "pareto-plot-suffix": Row("pareto", ("--experiment", "x", "--plot", "front.pngg"), "--plot 'front.pngg'"),
    "pareto-plot-under-a-file": Row(
        "pareto",
        ("--experiment", "x", "--plot", "{file}/f.png"),
        "--plot {file}/f.png: its folder cannot be written",
        under_a_file,
    ),  # fmt: skip
}


# ----------------------------------------------------------------------------------- fixtures


class Fixtures:
    """Services and files that rows share: a web server that is not MLflow, a port that never
    answers, an MLflow store with a deleted experiment, a small valid checkpoint, tmpfs mounts."""

    def __init__(self, root: Path):
        self.root = root
        self.mounts: list[Path] = []
        self.closed_port = free_port()

        class NotMlflow(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- http.server's name
                self.send_error(404)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.http_port = self.http.server_address[1]
        self.silent = socket.socket()  # listens (the kernel completes the handshake) and never answers
        self.silent.bind(("127.0.0.1", 0))
        self.silent.listen(16)
        self.silent_port = self.silent.getsockname()[1]
        self.mlflow_uri = self._mlflow_store()
        self.ckpt = self._checkpoint()
        self.full = self._tmpfs("full", "size=64k")
        self.ro = self._tmpfs("ro", "ro,size=64k")

    def _mlflow_store(self) -> str:
        from mlflow.tracking import MlflowClient

        uri = f"sqlite:///{self.root / 'mlflow.db'}"
        client = MlflowClient(uri)
        client.create_experiment("kept")
        client.delete_experiment(client.create_experiment("gone"))
        return uri

    def _checkpoint(self) -> str:
        from afm_ray.checkpoints import save_training_state
        from afm_ray.config import from_flat, to_flat
        from afm_ray.data import load_run_data
        from afm_ray.models import build_model, model_kwargs

        cfg = from_flat({"data.name": "digits", "student.width": 4})
        model = build_model("small_cnn", **model_kwargs(cfg.student, load_run_data(cfg)))
        return str(save_training_state(self.root / "ckpt", model=model, config=to_flat(cfg), epoch=1))

    def _tmpfs(self, name: str, options: str) -> str | None:
        target = self.root / name
        target.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True
        ).returncode:
            return None
        self.mounts.append(target)
        if name == "full":
            fh = open(target / "fill", "wb")  # noqa: SIM115 -- written until the disk is full
            try:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
            except OSError:  # ENOSPC: the disk is full, as the rows need it
                pass
            finally:
                with contextlib.suppress(OSError):
                    fh.close()
        return str(target)

    def values(self) -> dict[str, str]:
        keys = ("closed_port", "http_port", "silent_port", "mlflow_uri", "full", "ro")
        return {k: str(getattr(self, k)) for k in keys}

    def close(self) -> None:
        self.http.shutdown()
        self.silent.close()
        for target in self.mounts:
            subprocess.run(["umount", str(target)], check=False)


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Any:
    fixtures = Fixtures(tmp_path_factory.mktemp("catalogue"))
    yield fixtures
    fixtures.close()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root`, files with their size and modification time (symlinks not followed)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        # torch's FLOP counter (the teacher's cost estimate) makes its empty cache folder in $TMPDIR
        dirs[:] = [d for d in dirs if not (d.startswith("torchinductor_") and not os.listdir(os.path.join(folder, d)))]
        for name in dirs:  # a folder's own times change when a writability probe comes and goes
            out[os.path.relpath(os.path.join(folder, name), root)] = (0, 0)
        for name in files:
            info = os.lstat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (info.st_size, info.st_mtime_ns)
    return out


def children() -> set[int]:
    """Processes whose parent is this one."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            if (
                entry.isdigit()
                and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid()
            ):
                found.add(int(entry))
        except (OSError, IndexError):
            pass
    return found


# ----------------------------------------------------------------------------------- the test


def test_the_catalogue_is_large_and_covers_every_command():
    assert len(ROWS) >= 80
    assert {r.cmd for r in ROWS.values()} == set(MAINS)
    assert sum(r.subprocess for r in ROWS.values()) >= 10


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_is_one_line_exit_2_nothing_written(name, fx, tmp_path, monkeypatch, capsys):
    row = ROWS[name]
    if row.needs == "tmpfs" and fx.full is None:
        pytest.skip("mount -t tmpfs is not permitted here (needs root); the full and read-only disk rows need it")
    if row.needs == "no-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA devices; the row is about a machine without them")
    tmp = tmp_path / "row"
    (tmp / "systmp").mkdir(parents=True)
    values = {"tmp": str(tmp), **fx.values()}
    if row.setup is not None:
        values |= row.setup(tmp, fx)
    argv = [a.format(**values) for a in row.argv]
    expect = row.expect.format(**values)
    env = {k: v.format(**values) for k, v in row.env}
    before, kids = snapshot(tmp), children()

    if row.subprocess:
        code, err = run_subprocess(row.cmd, argv, tmp, env)
    else:
        code, err = run_in_process(row.cmd, argv, tmp, env, monkeypatch, capsys)

    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(tmp) == before, "the command wrote files"
    assert children() <= kids, "the command left a process running"
    if "marker" in values:
        assert not Path(values["marker"]).exists(), "the crafted file ran code"


def run_in_process(cmd: str, argv: list[str], tmp: Path, env: dict[str, str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("AFM_RAY_CACHE", str(tmp / "cache"))
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AFM_RAY_PROBE_TIMEOUT_S"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp / "systmp"))
    ray_before = {m for m in ("ray", "afm_ray.sweep.driver") if m in sys.modules}
    capsys.readouterr()
    try:
        code = MAINS[cmd](argv)
    except SystemExit as exit_:  # argparse exits on a bad argument
        code = exit_.code
    assert {m for m in ("ray", "afm_ray.sweep.driver") if m in sys.modules} == ray_before, "Ray was imported"
    return code, capsys.readouterr().err


def run_subprocess(cmd: str, argv: list[str], tmp: Path, extra_env: dict[str, str]) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"AFM_RAY_CACHE": str(tmp / "cache"), "TMPDIR": str(tmp / "systmp"), "PYTHONPATH": str(REPO), **extra_env}
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", f"afm_ray.{cmd}", *argv],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own session: whatever it starts is found by session id
    )
    _, err = proc.communicate(timeout=120)
    assert not session_processes(proc.pid), "the command left processes running"
    imports = [line for line in err.splitlines() if line.startswith("import time:")]
    assert not any(line.split("|")[-1].strip().split(".")[0] == "ray" for line in imports), "Ray was imported"
    return proc.returncode, "\n".join(line for line in err.splitlines() if not line.startswith("import time:"))
