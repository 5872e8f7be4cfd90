"""Teachers from outside: a plain state dict saved by RobustBench or an official AT/TRADES script,
mapped to the key names of afm-ray's models (afm_ray.models: ``normalize.*`` + ``net.<architecture>``).

What is mapped (each step only where it applies; the result is then checked key by key and shape by
shape against the architecture teacher.* names, afm_ray.checkpoints):

- wrapping: ``{"state_dict": ...}``, ``{"model_state_dict": ...}``, ``{"model": ...}``, ``{"net": ...}``
  (training scripts save the weights beside the epoch and the optimiser; those are ignored);
- prefixes: ``module.`` (DataParallel / DistributedDataParallel), ``_orig_mod.`` (torch.compile),
  ``model.`` (RobustBench strips it too);
- names, per architecture: the WideResNet of TRADES and RobustBench
  (robustbench/model_zoo/architectures/wide_resnet.py: ``block1.layer.0.convShortcut.weight``) to ours
  (``net.block1.0.conv_shortcut.weight``), its unused ``sub_block1.*`` (the TRADES code builds it, its
  forward never runs it) dropped; the PreAct ResNet-18 of RobustBench / robust_overfitting
  (``layer2.0.shortcut.0.weight``) to ours (``net.layer2.0.shortcut.weight``); ResNet-18
  (kuangliu/pytorch-cifar) and small_cnn need only the ``net.`` prefix;
- normalisation. RobustBench's models take images in [0, 1]; some normalise inside and carry the
  statistics as buffers (``mu``/``sigma``, or ``mean``/``std``): those become our ``normalize.mean`` /
  ``normalize.std``. A state dict without them is taken to expect raw [0, 1] inputs (mean 0, std 1), as
  the TRADES WideResNet and most RobustBench CIFAR WideResNets do. Not detectable from the weights: a
  model whose class normalises with constants that are not in its state dict (RobustBench's
  Rice2020Overfitting checkpoint lacks the mu/sigma its class defines), or a script that normalised in its
  data loader (robust_overfitting, fast_adversarial). For those, add the statistics to the state dict as
  ``mu`` and ``sigma`` (shape (1, C, 1, 1)) before loading.

Weights only: the file is read with ``torch.load(weights_only=True)``, never unpickling code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "_orig_mod.", "model.")
NORMALISATION_NAMES = (("mu", "sigma"), ("mean", "std"))
WRN_ARCHS = ("wrn", "wrn34_10", "wrn28_10")

# (pattern, replacement) on keys without the net. prefix, per architecture.
_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    **{
        arch: ((r"^(block\d)\.layer\.(\d+)\.", r"\1.\2."), (r"\.convShortcut\.", ".conv_shortcut."))
        for arch in WRN_ARCHS
    },
    "preact_resnet18": ((r"\.shortcut\.0\.", ".shortcut."),),
}
# Keys an official script saves that its model never uses.
_UNUSED = {arch: (r"^sub_block1\.",) for arch in WRN_ARCHS}


def tensor_mapping(value: Any) -> bool:
    """Whether ``value`` is a non-empty mapping of names to tensors (a state dict)."""
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, Tensor) for v in value.values())


def unwrap_state_dict(state: Any) -> Mapping[str, Tensor] | None:
    """The state dict inside what a training script saved (itself, or under a wrapper key, up to
    two levels deep); None when there is none."""
    for _ in range(3):
        if tensor_mapping(state):
            return state
        if not isinstance(state, Mapping):
            return None
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            return None
        state = inner
    return None


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def to_our_layout(state: Mapping[str, Tensor], arch: str, in_channels: int) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` (already unwrapped) with afm-ray's key names for ``arch``, and what was mapped (for messages).

    A state dict already in our layout (``net.*`` keys) passes through unchanged.
    """
    keys = {k: _strip_prefix(k) for k in state}
    notes = []
    if any(k != v for k, v in keys.items()):
        notes.append("prefixes " + "/".join(p for p in PREFIXES if any(k.startswith(p) for k in state)) + " removed")
    stripped = {new: state[old] for old, new in keys.items()}
    if any(k.startswith("net.") for k in stripped):
        return stripped, notes
    out: dict[str, Tensor] = {}
    mean = std = None
    for mean_name, std_name in NORMALISATION_NAMES:
        if mean_name in stripped and std_name in stripped:
            mean, std = stripped.pop(mean_name), stripped.pop(std_name)
            notes.append(f"normalisation from {mean_name}/{std_name}")
            break
    if mean is None:
        notes.append("no normalisation buffers: inputs taken as raw [0, 1] (mean 0, std 1)")
        mean, std = torch.zeros(in_channels), torch.ones(in_channels)
    out["normalize.mean"] = mean.reshape(1, -1, 1, 1).float()
    out["normalize.std"] = std.reshape(1, -1, 1, 1).float()
    dropped = [k for k in stripped if any(re.search(p, k) for p in _UNUSED.get(arch, ()))]
    if dropped:
        notes.append(f"{len(dropped)} unused keys dropped ({dropped[0]}, ...)")
    renamed = 0
    for key, value in stripped.items():
        if key in dropped:
            continue
        new = key
        for pattern, replacement in _RENAMES.get(arch, ()):
            new = re.sub(pattern, replacement, new)
        renamed += new != key
        out[f"net.{new}"] = value
    if renamed:
        notes.append(f"{renamed} keys renamed to afm-ray's {arch}")
    return out, notes
