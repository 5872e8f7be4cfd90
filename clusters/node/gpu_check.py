"""Fail a GPU node at boot, in one line, when torch cannot use its GPU.

Every GPU node type of clusters/aws.yaml, gcp.yaml and kuberay/raycluster.yaml runs this inside the
afm-ray image before `ray start` (the image has it at /home/ray/node/gpu_check.py): a node whose
NVIDIA driver is older than the CUDA of the image's torch, or whose container got no GPU, then never
joins Ray. The launcher's autoscaler logs the line and terminates the node; on Kubernetes the pod
ends in Error with the line in its log. Without it such a node joins with `GPU: 1` and every trial
placed there fails on its first CUDA call.

    python /home/ray/node/gpu_check.py      # exit 0 and one line naming the GPUs, or 1 and why not
"""

from __future__ import annotations

import shutil
import subprocess
import sys

# CUDA toolkit -> the Linux driver it ships with (NVIDIA's CUDA release notes); the same table as
# clusters/checks/machines.py (tests/test_clusters.py keeps the two equal).
CUDA_MIN_DRIVER = {"12.4": 550, "12.6": 560, "12.8": 570, "12.9": 575, "13.0": 580}


def host_driver() -> str | None:
    """The NVIDIA driver version nvidia-smi reports in this container, None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def why_not(cuda: str | None, driver: str | None) -> str:
    """Why torch sees no GPU, as far as this node can tell."""
    if cuda is None:
        return "this torch is a CPU build; the image must install a CUDA build (clusters/Dockerfile)"
    if driver is None:
        return (
            "the container sees no NVIDIA driver (nvidia-smi fails): the host has no GPU, its driver is not "
            "loaded, or Docker started the container without the NVIDIA runtime"
        )
    needed = CUDA_MIN_DRIVER.get(cuda)
    if needed and int(driver.split(".")[0]) < needed:
        return f"the host's NVIDIA driver {driver} is older than CUDA {cuda} needs (>= {needed}): use a newer image"
    return f"NVIDIA driver {driver} is present but CUDA cannot initialise (see `nvidia-smi` on the host)"


def main() -> int:
    import torch

    cuda = torch.version.cuda
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"gpu_check: torch {torch.__version__} (CUDA {cuda}) uses {torch.cuda.device_count()} GPU(s): {names}")
        return 0
    print(
        f"gpu_check: error: torch {torch.__version__} (CUDA {cuda or 'none'}) cannot use a GPU on this node: "
        f"{why_not(cuda, host_driver())}",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
