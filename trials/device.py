"""Device choice at run time, and the CUDA-only speedups (channels_last, bf16 autocast)."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn

from trials.errors import InvalidValue


def pick_device(requested: str | None = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU; an explicit `cuda` without a GPU is an error."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidValue("--device", requested, "no CUDA device is visible; use auto or cpu")
    if not (requested == "cpu" or requested.startswith("cuda")):
        raise InvalidValue("--device", requested, "allowed: auto, cpu, cuda, cuda:N")
    return torch.device(requested)


def use_fast_path(device: torch.device, amp: bool | None) -> bool:
    """bf16 autocast and channels_last: on by default on CUDA, never on the CPU."""
    return device.type == "cuda" and (amp is None or amp)


def prepare_model(model: nn.Module, device: torch.device, fast: bool) -> nn.Module:
    model = model.to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_input(x: torch.Tensor, fast: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if fast else x


@contextlib.contextmanager
def autocast(device: torch.device, fast: bool) -> Iterator[None]:
    if fast:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, *stream: str) -> int:
    """A seed for a named random stream of a run, e.g. derive_seed(0, "defense", "pbe").

    Runs that share the user's seed must not share random streams: a defense seeded like the attack
    it cleans would redraw the attack's own permutations (PBE's random initial pool, seed 0, was
    exactly the attack's first poisoned images, seed 0). Stable across processes and platforms."""
    digest = hashlib.blake2b(":".join([str(seed), *stream]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**62


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
