"""What the clouds' machines are, offline: vCPUs, memory and GPUs per instance or machine type, the
NVIDIA driver of the boot images the configs name, and the driver the pinned torch build needs.

Ray takes a node type's `resources` as declared (clusters/aws.yaml, gcp.yaml): a CPU machine declared
with `GPU: 1` is scheduled trials it cannot run, and a GPU image whose driver is older than torch's
CUDA leaves `torch.cuda.is_available()` False on every node. Nothing here asks a cloud: a type or an
image the tables do not know is a problem to fix (add it, with its numbers from the provider's page),
never a guess. Figures: the providers' instance-type pages (AWS EC2 instance types, GCP machine
families), NVIDIA's CUDA toolkit release notes (the driver each toolkit ships with), the image
families' names (GCP names its Deep Learning VM families by driver) and AWS's DLAMI release notes.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Machine(NamedTuple):
    vcpus: int
    memory_gib: float
    gpus: int = 0
    gpu: str = ""


# AWS EC2 instance types (vCPUs, GiB, GPUs).
AWS = {
    **{f"m6i.{s}": Machine(c, m) for s, c, m in [("large", 2, 8), ("xlarge", 4, 16), ("2xlarge", 8, 32),
                                                   ("4xlarge", 16, 64), ("8xlarge", 32, 128)]},
    **{f"m7i.{s}": Machine(c, m) for s, c, m in [("large", 2, 8), ("xlarge", 4, 16), ("2xlarge", 8, 32),
                                                   ("4xlarge", 16, 64)]},
    **{f"m5.{s}": Machine(c, m) for s, c, m in [("large", 2, 8), ("xlarge", 4, 16), ("2xlarge", 8, 32),
                                                  ("4xlarge", 16, 64)]},
    **{f"c6i.{s}": Machine(c, m) for s, c, m in [("large", 2, 4), ("xlarge", 4, 8), ("2xlarge", 8, 16)]},
    **{f"r6i.{s}": Machine(c, m) for s, c, m in [("large", 2, 16), ("xlarge", 4, 32), ("2xlarge", 8, 64)]},
    **{f"g5.{s}": Machine(c, m, g, "A10G") for s, c, m, g in [
        ("xlarge", 4, 16, 1), ("2xlarge", 8, 32, 1), ("4xlarge", 16, 64, 1), ("8xlarge", 32, 128, 1),
        ("12xlarge", 48, 192, 4), ("16xlarge", 64, 256, 1), ("24xlarge", 96, 384, 4), ("48xlarge", 192, 768, 8)]},
    **{f"g6.{s}": Machine(c, m, g, "L4") for s, c, m, g in [
        ("xlarge", 4, 16, 1), ("2xlarge", 8, 32, 1), ("4xlarge", 16, 64, 1), ("8xlarge", 32, 128, 1),
        ("12xlarge", 48, 192, 4), ("16xlarge", 64, 256, 1), ("24xlarge", 96, 384, 4), ("48xlarge", 192, 768, 8)]},
    **{f"g6e.{s}": Machine(c, m, g, "L40S") for s, c, m, g in [
        ("xlarge", 4, 32, 1), ("2xlarge", 8, 64, 1), ("4xlarge", 16, 128, 1), ("12xlarge", 48, 384, 4)]},
    **{f"g4dn.{s}": Machine(c, m, g, "T4") for s, c, m, g in [
        ("xlarge", 4, 16, 1), ("2xlarge", 8, 32, 1), ("4xlarge", 16, 64, 1), ("12xlarge", 48, 192, 4)]},
    "p3.2xlarge": Machine(8, 61, 1, "V100"),
    "p3.8xlarge": Machine(32, 244, 4, "V100"),
    "p4d.24xlarge": Machine(96, 1152, 8, "A100"),
    "p5.48xlarge": Machine(192, 2048, 8, "H100"),
}  # fmt: skip

# GCP machine types (vCPUs, GB, GPUs built in: G2, A2 and A3 machines come with theirs).
GCP = {
    **{f"n2-standard-{c}": Machine(c, 4 * c) for c in (2, 4, 8, 16, 32)},
    **{f"n2-highmem-{c}": Machine(c, 8 * c) for c in (2, 4, 8)},
    **{f"e2-standard-{c}": Machine(c, 4 * c) for c in (2, 4, 8, 16)},
    **{f"n1-standard-{c}": Machine(c, 3.75 * c) for c in (4, 8, 16)},  # GPUs: guestAccelerators
    **{f"g2-standard-{c}": Machine(c, 4 * c, g, "L4") for c, g in [(4, 1), (8, 1), (12, 1), (16, 1), (24, 2),
                                                                    (32, 1), (48, 4), (96, 8)]},
    **{f"a2-highgpu-{g}g": Machine(12 * g, 85 * g, g, "A100") for g in (1, 2, 4, 8)},
    "a2-ultragpu-1g": Machine(12, 170, 1, "A100 80GB"),
    "a3-highgpu-8g": Machine(208, 1872, 8, "H100"),
}  # fmt: skip


def machine(provider: str, node_config: dict) -> tuple[str | None, Machine | None]:
    """(machine type name, what it is) of a launcher node type; the Machine is None for an unknown type."""
    if provider == "aws":
        name = node_config.get("InstanceType")
        return name, AWS.get(name)
    name = str(node_config.get("machineType", "")).rsplit("/", 1)[-1] or None
    found = GCP.get(name)
    extra = sum(int(a.get("acceleratorCount", 0)) for a in node_config.get("guestAccelerators") or [])
    if found and extra:
        found = found._replace(gpus=found.gpus + extra, gpu="attached")
    return name, found


# ------------------------------------------------------------------------------ drivers

# torch build -> CUDA: the PyPI wheel of torch 2.13.0 for Linux x86_64 is a CUDA 13.0 build (its
# metadata requires cuda-toolkit 13.0.x, nvidia-cudnn-cu13, nvidia-nccl-cu13); a PyTorch index
# (TORCH_INDEX_URL in clusters/Dockerfile, .../whl/cuXYZ) chooses CUDA X.Y instead.
PYPI_TORCH_CUDA = {"2.13.0": "13.0"}
# CUDA toolkit -> the Linux driver it ships with (NVIDIA's CUDA toolkit release notes, table
# "CUDA Toolkit and Corresponding Driver Versions", GA releases).
CUDA_MIN_DRIVER = {"12.4": 550, "12.6": 560, "12.8": 570, "12.9": 575, "13.0": 580}
# AWS Deep Learning AMIs named through their public SSM parameter (ImageId: resolve:ssm:...), with the
# oldest driver of their releases since torch 2.13.0 (the DLAMI release notes list 580.x and 595.x).
AWS_AMI_DRIVER = {
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id": 580,
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id": 580,
}
GCP_FAMILY_DRIVER = re.compile(r"/images/family/[a-z0-9-]*-nvidia-(\d{3})$")


def torch_cuda(torch_version: str | None, index_url: str) -> str | None:
    """The CUDA version of the torch build the image installs (None: not known here)."""
    if match := re.search(r"/whl/cu(\d+)(\d)/?$", index_url or ""):
        return f"{match.group(1)}.{match.group(2)}"
    return PYPI_TORCH_CUDA.get(torch_version or "")


def image_driver(provider: str, node_config: dict) -> tuple[str, int | None]:
    """(the boot image as the config names it, its NVIDIA driver's major version or None if unknown)."""
    if provider == "aws":
        image = str(node_config.get("ImageId", ""))
        return image, AWS_AMI_DRIVER.get(image.removeprefix("resolve:ssm:"))
    disks = node_config.get("disks") or []
    image = next((str((d.get("initializeParams") or {}).get("sourceImage", "")) for d in disks if d.get("boot")), "")
    match = GCP_FAMILY_DRIVER.search(image)
    return image, int(match.group(1)) if match else None
