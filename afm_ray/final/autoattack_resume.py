"""AutoAttack "standard" that survives preemption: a rerun skips the attacks that already ran.

AutoAttack standard runs APGD-CE, APGD-T, FAB-T and Square in turn, each on the images still
robust after the previous ones (Croce & Hein 2020). On a whole CIFAR-10 test split that is hours of
GPU time for a ResNet-18, so a preempted evaluation must continue, not start over.

pyautoattack 0.2.0's own `run_standard_evaluation(..., state_path=Path)` writes such a state, but
cannot read it back: the set of attacks is written as the text of a Python set, which
`EvaluationState.from_disk` then compares with a set (always unequal: "The state was created with a
different set of attacks"), and a restored run would fail on a name bound only in a fresh run
(`y_adv`). tests/test_final_stage.py pins both, so a fixed release shows up there. This module keeps
the same record itself: it runs pyautoattack's standard attacks one at a time (each with the
standard version's settings and seed), on the images still robust, and writes after each attack
which attacks have run and which images are still robust. Because every attack reseeds itself per
batch and sees the same batches either way, the result equals one uninterrupted
`run_standard_evaluation` (tested). An attack interrupted midway runs again from its start.

The state is a small JSON file (local path or pyarrow URI: s3://, gs://, ...) holding a fingerprint
of the model's weights and of the images, so a state left by another student is never reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from afm_ray.attacks import _AA_NORMS, _autoattack_logs_to, _parameters_frozen
from afm_ray.models import eval_mode
from afm_ray.storage import filesystem, is_uri, write_bytes

STATE_VERSION = 1


def fingerprint(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, seed: int) -> str:
    """sha256 of the weights, the images, the labels and the attack budget: what a state belongs to."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for t in (x, y):
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{eps!r}|{norm}|{seed}".encode())
    return digest.hexdigest()


def read_state(location: str) -> dict[str, Any] | None:
    """The state at ``location`` (local path or URI), or None if there is none or it is unreadable."""
    try:
        if is_uri(location):
            fs, path = filesystem(location)
            with fs.open_input_stream(path) as stream:
                text = stream.read().decode()
        else:
            with open(location, encoding="utf-8") as fh:
                text = fh.read()
        state = json.loads(text)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("version") == STATE_VERSION else None


def standard_attacks(norm: str) -> list[str]:
    """The attacks of AutoAttack standard for ``norm``, in pyautoattack's order."""
    from pyautoattack import AutoAttack

    probe = AutoAttack(nn.Identity(), eps=0.0, norm=_AA_NORMS[norm], version="standard")
    return list(probe.attacks_to_run)


def autoattack_resumable(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    batch_size: int,
    seed: int,
    state_location: str,
    progress: Callable[[str], None] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Per-image robustness (bool, on x.device) under AutoAttack standard, and the final state.

    ``state_location`` (a file path or URI) is read first: attacks it records as run are skipped
    and its robust flags are the starting point. The state's ``resumed`` lists the attacks skipped
    in this call, ``ran`` those run. The model is in eval mode during the call (restored after).
    """
    from pyautoattack import AutoAttack

    key = fingerprint(model, x, y, eps=eps, norm=norm, seed=seed)
    attacks = standard_attacks(norm)
    state = read_state(state_location)
    if state is not None and (state.get("fingerprint") != key or state.get("attacks") != attacks):
        if progress:
            progress("aa: the state found belongs to another model, image set or budget; starting over")
        state = None
    with eval_mode((model,)), _parameters_frozen(model):
        if state is None:
            with torch.no_grad():
                clean = torch.cat([model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]
                                   for i in range(0, len(y), batch_size)])  # fmt: skip
            state = {"version": STATE_VERSION, "fingerprint": key, "attacks": attacks, "done": [],
                     "clean": clean.cpu().tolist(), "robust": clean.cpu().tolist()}  # fmt: skip
            write_bytes(state_location, json.dumps(state).encode())
        resumed = list(state["done"])
        if resumed and progress:
            progress(f"aa: resumed: {', '.join(resumed)} already ran; {sum(state['robust'])} images still robust")
        robust = torch.tensor(state["robust"], dtype=torch.bool)
        ran = []
        for attack in attacks:
            if attack in state["done"]:
                continue
            idx = robust.nonzero().flatten()
            if len(idx):
                adversary = AutoAttack(model, eps=eps, norm=_AA_NORMS[norm], version="standard", device=x.device,
                                       seed=seed)  # fmt: skip
                adversary.attacks_to_run = [attack]  # the standard version's settings, one attack
                xs, ys = x[idx.to(x.device)], y[idx.to(y.device)]
                with _autoattack_logs_to(progress, "aa: "):
                    _, y_adv = adversary.run_standard_evaluation(xs, ys, batch_size=batch_size)
                robust[idx] = (y_adv.to(ys.device) == ys).cpu()
            ran.append(attack)
            state = {**state, "done": [*state["done"], attack], "robust": robust.tolist()}
            write_bytes(state_location, json.dumps(state).encode())  # atomic locally: never half a state
            if progress:
                progress(f"aa: {attack} done, {int(robust.sum())}/{len(robust)} images still robust")
    return robust.to(x.device), {**state, "resumed": resumed, "ran": ran}
