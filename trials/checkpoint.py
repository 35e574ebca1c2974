"""Checkpoints without pickle: nested state (module, optimizer and scheduler state dicts, generator
states, numbers) saved as one safetensors file for the tensors and one JSON file for the structure.

Dict keys keep their type (optimizer states are keyed by int), so a loaded state is the saved one.
A checkpoint is written to a temporary name and renamed, so a run killed while saving keeps the
previous checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode_key(k), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _encode_key(key: Any) -> list[Any]:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"cannot checkpoint a dict key of type {type(key).__name__}")
    return ["int" if isinstance(key, int) else "str", key]


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {(int(k) if kind == "int" else k): _decode(v, tensors) for (kind, k), v in obj["__dict__"]}
    return obj


def save_state(state: dict[str, Any], folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)
    # The tensors get a fresh name and state.json, replaced last, points to them: a run killed at
    # any moment leaves a consistent pair (the new one or the previous one).
    previous = _tensor_file(folder)
    name = f"tensors-{os.getpid()}-{time.monotonic_ns()}.safetensors"
    save_file(tensors, str(folder / name))
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"tensors": name, "state": structure}))
    os.replace(tmp, folder / STATE_FILE)
    if previous is not None and previous.name != name:
        previous.unlink(missing_ok=True)


def _tensor_file(folder: Path) -> Path | None:
    path = folder / STATE_FILE
    if not path.exists():
        return None
    return folder / json.loads(path.read_text())["tensors"]


def load_state(folder: str | Path) -> dict[str, Any] | None:
    """The saved state, or None when the folder holds no checkpoint."""
    folder = Path(folder)
    if not (folder / STATE_FILE).exists():
        return None
    saved = json.loads((folder / STATE_FILE).read_text())
    tensors = load_file(str(folder / saved["tensors"]))
    return _decode(saved["state"], tensors)
