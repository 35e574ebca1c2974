"""What a result records about where it came from: versions, git revision, hardware."""

from __future__ import annotations

import os
import platform as std_platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("bdlab", "torch", "torchvision", "numpy", "safetensors", "scikit-learn", "pyarrow")


def package_versions() -> dict[str, str]:
    versions = {"python": std_platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> dict[str, str | bool]:
    """The commit of the source tree that `trials` was imported from, and whether it was modified."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": False}


def hardware(device: torch.device) -> dict[str, str | int]:
    info: dict[str, str | int] = {
        "device": str(device),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "machine": std_platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
