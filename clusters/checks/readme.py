"""clusters/README.md, the walk-through every flow follows: its commands are checked like the configs'.

Every `python -m afm_ray.X --flag` uses a flag the module defines; every sweep names a shipped space
(or a file of yours) and keeps its stores off the head; no command carries a credential; the KubeRay
version the page asks for is the one the manifests are checked against (checks/crd.py).
"""

from __future__ import annotations

import re
import shlex

from checks.common import afm_ray_commands, flag_problems
from checks.crd import KUBERAY_VERSION
from checks.fit import shipped_spaces
from checks.stores import credential_problems, sweep_store_problems

KUBERAY_MENTION = re.compile(r"KubeRay(?: operator)?\s+(?:>=\s*)?v?(\d+\.\d+(?:\.\d+)?)(?:\s+or later)?")


def readme_problems(text: str) -> list[str]:
    """The README's commands and version statements."""
    problems = flag_problems(text)
    for module, args in afm_ray_commands(text):
        if module != "sweep":
            continue
        try:
            words = shlex.split(re.sub(r"[`)].*$", "", args))
        except ValueError:
            continue
        problems += sweep_store_problems(words, "python -m afm_ray.sweep", None)
        space = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--space"), None)
        if space and "/" not in space and not space.endswith(".yaml") and space not in shipped_spaces():
            problems.append(
                f"python -m afm_ray.sweep --space {space}: no such shipped space ({', '.join(shipped_spaces())})"
            )
    problems += credential_problems([line for line in text.splitlines() if "://" in line])
    wanted = KUBERAY_VERSION.rsplit(".0", 1)[0] if KUBERAY_VERSION.endswith(".0") else KUBERAY_VERSION
    for match in KUBERAY_MENTION.finditer(text):
        if match.group(1) not in (KUBERAY_VERSION, wanted):
            problems.append(
                f"{match.group(0)!r}: the manifests are checked against KubeRay {KUBERAY_VERSION}'s CRDs, the oldest "
                "release with worker-group priorities; say that version"
            )
    return problems
