"""The attacked-model folder: what `bdlab attack` writes and every defense reads back.

| file | content |
|---|---|
| model.safetensors | the backdoored model's state dict |
| trigger.safetensors | what defines the trigger beyond the parameters (patch, key image, warp grids...) |
| trigger.png, trigger_examples.png | the trigger as an image, and stamped on eight report-half images |
| poison.json | poisoned indices (attacker's training set and dataset's training split), old and new labels |
| poisoned_images.safetensors | the poisoned rows as the attacker stored them |
| spec.yaml, metrics.json | the fully resolved spec, and the metrics |

A defense's folder holds its model, spec.yaml and metrics.json (`save_defense_result`). Weights are
safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from trials import files
from trials.attacks import Attack, make_attack
from trials.data import ImageData, make_dataset
from trials.device import pick_device
from trials.metrics import build_eval_set, evaluate_halves, with_backdoored

if TYPE_CHECKING:
    from trials.run.attack import AttackResult
    from trials.run.defense import DefenseResult


def save_attack_result(result: AttackResult, out: str | Path) -> Path:
    """Write an attacked-model folder: weights, trigger, poison indices, resolved spec, metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in result.model.state_dict().items()}
    files.save_weights(state, out / "model.safetensors", metadata={"model": result.spec["model"]})
    trigger_state = result.attack.state()
    if trigger_state:
        files.save_weights(
            trigger_state, out / "trigger.safetensors", metadata={"attack": result.spec["attack"]["name"]}
        )
    files.save_image(result.attack.render_trigger().cpu(), out / "trigger.png", scale=4)
    examples = result.data.report_x[result.attack.attacked_mask(result.data.report_y)][:8]
    if len(examples):
        stamped = result.attack.apply(examples.float() / 255)
        files.save_image(torch.cat(list(stamped.cpu()), dim=2), out / "trigger_examples.png", scale=2)
    heldout_free = _attacker_to_split_index(result.data)
    files.write_json(
        {
            "count": int(len(result.poisoned.index)),
            "index": result.poisoned.index.tolist(),
            "train_split_index": heldout_free[result.poisoned.index.cpu()].tolist(),
            "original_labels": result.poisoned.original_labels.tolist(),
            "new_labels": result.poisoned.labels[result.poisoned.index].tolist(),
            "note": "index: position in the attacker's training set; train_split_index: in the dataset's training split",
        },
        out / "poison.json",
    )
    if len(result.poisoned.index):
        # the poisoned rows as the attacker stored them (defenses that use the poisoned training set)
        files.save_weights(
            {"images": result.poisoned.images[result.poisoned.index].cpu()}, out / POISONED_FILE
        )
    files.write_yaml(result.spec, out / "spec.yaml")
    files.write_json(result.metrics, out / "metrics.json")
    return out


def _attacker_to_split_index(data: ImageData) -> torch.Tensor:
    keep = torch.ones(data.train_split_size, dtype=torch.bool)
    keep[torch.as_tensor(data.heldout_index, dtype=torch.long)] = False
    return torch.nonzero(keep).flatten()


# --- reading an attacked-model folder back -------------------------------------------------------

ATTACKED_FILES = ("spec.yaml", "model.safetensors")
POISONED_FILE = "poisoned_images.safetensors"


@dataclass
class AttackedModel:
    """An attacked-model folder loaded back: its spec, model, attack (with its trigger) and data."""

    folder: Path
    spec: dict[str, Any]
    model: nn.Module
    attack: Attack
    data: ImageData
    metrics: dict[str, Any]
    # the folder's own (backdoored) model where `weights` replaced `model`; None when `model` is it
    backdoored: nn.Module | None = None
    # the test halves and the model's metrics on them, once per loaded folder (trials.run.defense)
    evaluation: Any = field(default=None, repr=False, compare=False)

    def poisoned_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The attacker's poisoned training set (images, labels as poisoned), rebuilt from the
        clean training split, poison.json and the stored poisoned rows."""
        import json

        from trials.errors import BdlabError

        index_file, rows_file = self.folder / "poison.json", self.folder / POISONED_FILE
        record = json.loads(index_file.read_text()) if index_file.exists() else None
        if record is None or (record["count"] and not rows_file.exists()):
            raise BdlabError(
                f"--attacked: {str(self.folder)!r} lacks poison.json or {POISONED_FILE} (needed by defenses that use "
                "the poisoned training set); re-run `bdlab attack` to write them"
            )
        images, labels = self.data.train_x.clone(), self.data.train_y.clone()
        if record["count"]:
            index = torch.as_tensor(record["index"], dtype=torch.long, device=images.device)
            images[index] = files.load_weights(rows_file, field="--attacked poisoned images")["images"].to(
                images.device
            )
            labels[index] = torch.as_tensor(record["new_labels"], dtype=labels.dtype, device=labels.device)
        return images, labels


def load_attacked(
    folder: str | Path, device: str = "auto", weights: str | Path | None = None
) -> AttackedModel:
    """Load a folder written by `save_attack_result`; `weights` replaces its model file (e.g. a
    defended model). Weights are read as safetensors only."""
    import json

    import yaml

    from trials.errors import BdlabError
    from trials.models import build_model

    folder = Path(folder)
    if not folder.is_dir():
        raise BdlabError(
            f"--attacked: {str(folder)!r} is not a folder; expected one written by `bdlab attack`"
        )
    missing = [f for f in ATTACKED_FILES if not (folder / f).exists()]
    if missing:
        raise BdlabError(
            f"--attacked: {str(folder)!r} lacks {', '.join(missing)}; expected a folder written by `bdlab attack`"
        )
    try:
        spec = yaml.safe_load((folder / "spec.yaml").read_text())
        ds, attack_spec, model_name = spec["dataset"], spec["attack"], spec["model"]
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise BdlabError(
            f"--attacked: {str(folder / 'spec.yaml')!r} is not a valid attack spec ({err})"
        ) from None
    state = files.load_weights(
        weights or folder / "model.safetensors", field="--weights" if weights else "--attacked"
    )
    dev = pick_device(device)
    data = make_dataset(ds["name"], ds.get("params"), ds.get("root")).load(dev)
    model = build_model(model_name, data.num_classes, data.image_shape[-1], data.mean, data.std)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:2]}"
            if missing
            else f"unexpected {unexpected[:2]}"
            if unexpected
            else f"shape of {wrong[:2]}"
        )
        raise BdlabError(f"model: the weights do not fit a {model_name} for {ds['name']} ({detail})")
    model.load_state_dict(state, strict=True)
    attack = make_attack(
        attack_spec["name"], attack_spec["params"], data.num_classes, data.image_shape, spec["seed"]
    )
    if (folder / "trigger.safetensors").exists():
        attack.load_state(files.load_weights(folder / "trigger.safetensors", field="--attacked trigger"))
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    backdoored = None
    if weights is not None:  # asr_paper of other weights conditions on the folder's model
        backdoored = copy.deepcopy(model)
        backdoored.load_state_dict(files.load_weights(folder / "model.safetensors", field="--attacked"))
        backdoored = backdoored.to(dev).eval()
    return AttackedModel(folder, spec, model.to(dev).eval(), attack, data, metrics, backdoored)


def evaluate_attacked(loaded: AttackedModel) -> dict[str, Any]:
    """Report-half metrics at top level and validation-half metrics under "val" (asr_paper against
    the folder's backdoored model when other weights were loaded); in float32, as every evaluation."""
    val_set = with_backdoored(
        build_eval_set(loaded.data.val_x, loaded.data.val_y, loaded.attack), loaded.backdoored
    )
    report_set = with_backdoored(
        build_eval_set(loaded.data.report_x, loaded.data.report_y, loaded.attack), loaded.backdoored
    )
    return evaluate_halves(loaded.model, report_set, val_set)


def save_defense_result(result: DefenseResult, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    files.save_weights(state, out / "model.safetensors", metadata={"defense": result.spec["defense"]["name"]})
    files.write_yaml(result.spec, out / "spec.yaml")
    files.write_json(result.metrics, out / "metrics.json")
    return out
