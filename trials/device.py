"""Device choice at run time, the CUDA-only speedups (channels_last, bf16 autocast, TF32), and the
precision of a trial: training under bf16 autocast or in float32 (TF32 allowed on CUDA), evaluation
always in IEEE float32 (`exact_fp32`)."""

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


def use_amp(device: torch.device, amp: bool | None, default: bool = True) -> bool:
    """bf16 autocast and channels_last in training: never on the CPU; on CUDA `amp`, or `default`
    when it is None (a defense's declared precision; attacks train under autocast)."""
    return device.type == "cuda" and (default if amp is None else amp)


def allow_tf32(device: torch.device) -> None:
    """Where a trial prepares its device: float32 matmuls and convolutions may use TF32 on CUDA (the
    training of fp32 defenses, and of any trial run without amp). Evaluation turns it off again
    (`exact_fp32`). Only the torch >= 2.9 `fp32_precision` flags are used: torch refuses to read
    the TF32 flags once the legacy `allow_tf32` and the new ones are mixed."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def precision_name(device: torch.device, amp: bool) -> str:
    """The training precision a trial records in spec.yaml: bf16-autocast, fp32+tf32 or fp32."""
    if amp:
        return "bf16-autocast"
    return "fp32+tf32" if device.type == "cuda" else "fp32"


_TF32_FLAGS = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """IEEE float32 inside, whatever the caller set: autocast off (even inside an active autocast
    region) and, on CUDA, no TF32; the flags are restored on exit. Every evaluation runs in it."""
    saved = [flags.fp32_precision for flags in _TF32_FLAGS] if device.type == "cuda" else []
    try:
        for flags in _TF32_FLAGS[: len(saved)]:
            flags.fp32_precision = "ieee"
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        for flags, value in zip(_TF32_FLAGS, saved, strict=False):
            flags.fp32_precision = value


def prepare_model(model: nn.Module, device: torch.device, amp: bool) -> nn.Module:
    model = model.to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_input(x: torch.Tensor, amp: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if amp else x


@contextlib.contextmanager
def autocast(device: torch.device, amp: bool) -> Iterator[None]:
    if amp:
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
