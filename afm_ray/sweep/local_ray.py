"""Join the Ray cluster a sweep runs on, or start a local one that other Rays cannot confuse.

Ray Train's placement-group cleaner finds its cluster through the State API's default address:
$RAY_ADDRESS, else `<ray temp dir>/ray_current_cluster`, else the only GCS process on the
machine. `ray.init()` starting a local Ray sets neither, so as soon as a second Ray runs on
the same machine (a test, another sweep, a notebook) the cleaner's lookup fails, its monitor
thread dies, and every finished trial's CPUs stay reserved: the next trial waits forever.
A local sweep therefore runs its Ray under a temp dir of its own whose `ray_current_cluster`
names it; Ray's processes inherit RAY_TMPDIR from this driver, so their lookups land here.

`ray.init` replaces the SIGTERM handler with an immediate exit (a confirmation killed that way
aborted inside Ray's core); every command joins Ray here, so SIGTERM takes Ctrl-C's path again
right after (afm_ray.signals).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ray

from afm_ray.signals import install_sigterm_as_sigint


def connect_or_start(address: str | None) -> None:
    """ray.init: join `address` (a running cluster), or start a local Ray isolated as above."""
    options = dict(log_to_driver=False, configure_logging=True, logging_level="WARNING")
    if address:
        ray.init(address=address, **options)
        install_sigterm_as_sigint()
        return
    # Short: Ray's Unix socket paths below it must fit in 107 bytes.
    root = tempfile.mkdtemp(prefix="afm-ray-")
    os.environ["RAY_TMPDIR"] = root
    ray.init(address="local", **options)
    ray_dir = Path(root) / "ray"
    ray_dir.mkdir(exist_ok=True)
    (ray_dir / "ray_current_cluster").write_text(ray.get_runtime_context().gcs_address)
    install_sigterm_as_sigint()
