"""Reading and writing weights and result folders. Weights are safetensors; nothing is unpickled.

The platform loads models that are suspected to be malicious by definition, and a pickle can run
arbitrary code when loaded. `load_weights` therefore accepts only safetensors files and refuses
anything else with a one-line error; `import_checkpoint` reads a foreign PyTorch checkpoint with
`torch.load(weights_only=True)`, which rejects every pickled object that is not plain tensors.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from trials.errors import BdlabError, UnsafeModelFile


def is_safetensors(path: str | Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            if len(head) < 9:
                return False
            (length,) = struct.unpack("<Q", head[:8])
            return head[8:9] == b"{" and 0 < length <= os.path.getsize(path) - 8
    except OSError:
        return False


def _describe_foreign(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return "a PyTorch zip checkpoint (pickle inside)"
    if head[:1] == b"\x80":
        return "a Python pickle"
    return "not a safetensors file"


def load_weights(path: str | Path, field: str = "model") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise BdlabError(f"{field}: {str(path)!r} does not exist; expected a .safetensors weights file")
    if not is_safetensors(path):
        raise UnsafeModelFile(
            f"{field}: {str(path)!r} is {_describe_foreign(path)}; only safetensors weights are loaded "
            "(bdlab never unpickles a model; convert foreign checkpoints with `bdlab import-checkpoint`)"
        )
    return load_file(str(path))


def save_weights(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def import_checkpoint(
    path: str | Path,
    input_mean: tuple[float, ...] | None = None,
    input_std: tuple[float, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """A foreign `torch.save` checkpoint, read with weights_only=True (plain tensors only).

    Names are kept as they are (a `{"state_dict": ...}` wrapper is unwrapped). Every platform model
    normalizes its input itself (`normalize.mean` / `normalize.std` buffers, docs/models.md), where
    foreign code normalizes in its data pipeline or not at all: `input_mean` / `input_std` add those
    buffers with the statistics the foreign model was trained behind (BackdoorBench: its dataset's
    mean and std; BPE/PBE, CLP: none, i.e. mean 0 and std 1), so the result loads into the model.
    """
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any refusal by the safe loader is reported as such
        raise UnsafeModelFile(
            f"checkpoint: {str(path)!r} holds more than plain tensors ({type(err).__name__})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BdlabError(f"checkpoint: {str(path)!r} is not a state dict of tensors")
    if (input_mean is None) != (input_std is None):
        raise BdlabError("import-checkpoint: give --input-mean and --input-std together")
    if input_mean is not None and input_std is not None:
        if len(input_mean) != len(input_std):
            raise BdlabError(
                f"import-checkpoint: --input-mean has {len(input_mean)} values, --input-std {len(input_std)}"
            )
        if any(s <= 0 for s in input_std):
            raise BdlabError(f"import-checkpoint: --input-std must be positive, got {list(input_std)}")
        present = sorted(k for k in ("normalize.mean", "normalize.std") if k in obj)
        if present:
            raise BdlabError(
                f"checkpoint: {str(path)!r} already holds {present[0]}; drop --input-mean/--input-std"
            )
        obj = dict(obj)
        obj["normalize.mean"] = torch.tensor(input_mean, dtype=torch.float32).view(1, -1, 1, 1)
        obj["normalize.std"] = torch.tensor(input_std, dtype=torch.float32).view(1, -1, 1, 1)
    return obj


def write_json(data: Any, path: str | Path) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_yaml(data: Any, path: str | Path) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def save_image(img: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    """A 3xHxW float image in [0, 1] as PNG, optionally enlarged by nearest neighbour."""
    from PIL import Image

    arr = (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    pil.save(str(path))
