"""One attack trial (`run_attack(spec) -> AttackResult`) and one defense trial (`run_defense(spec,
attacked) -> DefenseResult`), and writing them to folders.

The runner knows no attack by name: everything an attack does differently (train a reference
model, start from another model, train some layers only, transform batches) goes through the
`Attack` interface.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from trials import files, provenance
from trials.attacks import ATTACKS, Attack, AttackContext, PoisonedSet, make_attack
from trials.data import ImageData, make_dataset
from trials.defenses import DEFENSES, Defense, DefenseContext, DefenseData, make_defense
from trials.device import (
    derive_seed,
    make_generator,
    pick_device,
    prepare_model,
    seed_everything,
    use_fast_path,
)
from trials.errors import InvalidValue
from trials.metrics import EvalSet, build_eval_set, evaluate, penultimate_shift
from trials.models import MODELS
from trials.params import as_dict, resolve_params
from trials.training import Progress, TrainRecipe, default_recipe, train_classifier


@dataclass
class AttackSpec:
    """Everything that defines an attacked model (the cache key of the sweep work is built from it)."""

    dataset: str = "digits"
    model: str = "mini_resnet"
    attack: str = "badnets"
    attack_params: dict[str, Any] = field(default_factory=dict)
    dataset_params: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    seed: int = 0
    epochs: int | None = None  # None: the dataset's recipe
    recipe: dict[str, Any] = field(default_factory=dict)  # overrides of TrainRecipe fields
    device: str = "auto"
    amp: bool | None = None  # bf16 autocast + channels_last; None = on for CUDA, never on CPU
    clean_reference: bool = False  # also train a clean model of the same recipe, for comparison


@dataclass
class AttackResult:
    model: nn.Module
    attack: Attack
    poisoned: PoisonedSet
    data: ImageData
    metrics: dict[str, Any]
    spec: dict[str, Any]  # fully resolved
    clean_model: nn.Module | None = None


def resolve_recipe(spec: AttackSpec) -> TrainRecipe:
    base = default_recipe(spec.dataset)
    overrides = dict(spec.recipe)
    if spec.epochs is not None:
        overrides["epochs"] = spec.epochs
    merged = {**as_dict(base), **overrides}
    return resolve_params(TrainRecipe, merged, owner="recipe")


def validate(spec: AttackSpec) -> tuple[Any, TrainRecipe]:
    """Check every name and parameter before any data is read; returns (attack params, recipe)."""
    make_dataset(spec.dataset, spec.dataset_params, spec.data_root)
    MODELS.get(spec.model)
    attack_cls = ATTACKS.get(spec.attack)
    attack_params = resolve_params(attack_cls.Params, spec.attack_params, owner=f"attack {spec.attack}")
    return attack_params, resolve_recipe(spec)


def run_attack(spec: AttackSpec, progress: Progress | None = None) -> AttackResult:
    started = time.perf_counter()
    attack_params, recipe = validate(spec)
    device = pick_device(spec.device)
    fast = use_fast_path(device, spec.amp)
    seed_everything(spec.seed)
    generator = make_generator(device, spec.seed)

    dataset = make_dataset(spec.dataset, spec.dataset_params, spec.data_root)
    data = dataset.load(device)
    attack = make_attack(spec.attack, as_dict(attack_params), data.num_classes, data.image_shape, spec.seed)
    ctx = AttackContext(data, spec.model, recipe, generator, fast, progress)
    attack.setup(ctx)
    val_set = build_eval_set(data.val_x, data.val_y, attack)
    report_set = build_eval_set(data.report_x, data.report_y, attack)

    poisoned = attack.poison(data.train_x, data.train_y, ctx)
    model = attack.initial_model(ctx)
    if model is None:
        model = ctx.new_model()

    def on_validation(m: nn.Module) -> dict[str, float]:
        scores = evaluate(m, val_set, fast)
        return {"val_acc": scores["acc"], "val_asr": scores["asr"]}

    poisoned_mask = torch.zeros(len(poisoned.labels), dtype=torch.bool, device=device)
    poisoned_mask[poisoned.index] = True
    train_classifier(
        model,
        data.train_x if attack.stamps_after_augmentation else poisoned.images,
        poisoned.labels,
        recipe,
        generator=generator,
        flip_allowed=data.flip,
        fast=fast,
        batch_hook=attack.batch_hook if attack.has_batch_hook else None,
        poisoned_mask=poisoned_mask,
        parameters=attack.trainable_parameters(model),
        evaluate=on_validation,
        progress=progress,
        tag="attack",
    )
    metrics = _metrics(model, report_set, val_set, fast)
    clean_model = None
    if spec.clean_reference or ctx.has_clean_model:
        clean_model = ctx.clean_model()
        metrics["clean_reference"] = _metrics(clean_model, report_set, val_set, fast)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    resolved = {
        "kind": "attack",
        "dataset": {
            "name": spec.dataset,
            "root": str(Path(spec.data_root).resolve()) if spec.data_root else None,
            "params": {**as_dict(dataset.split), **as_dict(dataset.params)},
            "summary": data.summary(),
        },
        "model": spec.model,
        "attack": {"name": spec.attack, "params": as_dict(attack.params)},
        "seed": spec.seed,
        "recipe": as_dict(recipe),
        "clean_reference": clean_model is not None,
        "device": provenance.hardware(device),
        "amp": fast,
        "poisoned": int(len(poisoned.index)),
        "versions": provenance.package_versions(),
        "git": provenance.git_revision(),
    }
    return AttackResult(model, attack, poisoned, data, metrics, resolved, clean_model)


def _metrics(model: nn.Module, report_set: EvalSet, val_set: EvalSet, fast: bool) -> dict[str, Any]:
    out: dict[str, Any] = dict(evaluate(model, report_set, fast))
    out["penultimate_shift"] = penultimate_shift(model, report_set)
    out["val"] = dict(evaluate(model, val_set, fast))
    return out


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


def spec_from_dict(d: dict[str, Any]) -> AttackSpec:
    names = {f.name for f in dataclasses.fields(AttackSpec)}
    return AttackSpec(**{k: v for k, v in d.items() if k in names})


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
    return AttackedModel(folder, spec, model.to(dev).eval(), attack, data, metrics)


def evaluate_attacked(loaded: AttackedModel, fast: bool = False) -> dict[str, Any]:
    """Report-half metrics at top level and validation-half metrics under "val"."""
    val_set = build_eval_set(loaded.data.val_x, loaded.data.val_y, loaded.attack)
    report_set = build_eval_set(loaded.data.report_x, loaded.data.report_y, loaded.attack)
    return _metrics(loaded.model, report_set, val_set, fast)


# --- one defense trial ---------------------------------------------------------------------------


@dataclass
class DefenseSpec:
    """A defense run on an attacked-model folder."""

    defense: str
    params: dict[str, Any] = field(default_factory=dict)  # override the preset, which overrides the defaults
    preset: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    checkpoint_every_s: float = 600.0


@dataclass
class DefenseResult:
    model: nn.Module
    metrics: dict[str, Any]
    spec: dict[str, Any]  # fully resolved


def resolve_defense(spec: DefenseSpec) -> Defense:
    """The defense with preset and overrides applied; every name and value checked."""
    from trials.presets import load_preset

    DEFENSES.get(spec.defense)
    params = {**(load_preset(spec.defense, spec.preset) if spec.preset else {}), **spec.params}
    return make_defense(spec.defense, params)


def defense_data(defense: Defense, attacked: AttackedModel, seed: int) -> DefenseData:
    """Exactly the data the defense declares: held-out images (unlabeled or labeled, a seeded subset
    of the requested size) or the poisoned training set; never the test split."""
    data, kind = attacked.data, defense.data_kind
    common = {"num_classes": data.num_classes, "image_shape": data.image_shape, "flip": data.flip}
    if kind == "none":  # no images; the shapes only (a data-free generator needs the image size)
        return DefenseData(kind, None, None, "none", **common)
    if kind == "poisoned_train":
        images, labels = attacked.poisoned_train()
        return DefenseData(kind, images, labels, "the attacker's poisoned training set", **common)
    count = defense.data_amount(data.train_split_size)
    available = len(data.heldout_y)
    if count is None or count > available:
        field_name = "data_count" if defense.params.data_count is not None else "data_fraction"
        raise InvalidValue(
            f"defense {defense.name}: param '{field_name}'",
            getattr(defense.params, field_name),
            f"at most {available} images (the held-out part of the training split; raise the dataset's "
            f"heldout_fraction at attack time for more)",
        )
    picker = torch.Generator().manual_seed(derive_seed(seed, "defense-data"))
    pick = torch.randperm(available, generator=picker)[:count].sort().values
    pick = pick.to(data.heldout_x.device)
    labels = data.heldout_y[pick] if kind == "clean_labeled" else None
    return DefenseData(kind, data.heldout_x[pick], labels, "held-out part of the training split", **common)


def run_defense(
    spec: DefenseSpec,
    attacked: AttackedModel,
    progress: Progress | None = None,
    checkpoint_dir: Path | None = None,
) -> DefenseResult:
    started = time.perf_counter()
    defense = resolve_defense(spec)
    device = attacked.data.device
    fast = use_fast_path(device, spec.amp)
    # the defense's streams are derived from (seed, defense): independent of the attack's (same seed)
    trial_seed = derive_seed(spec.seed, "defense", spec.defense)
    seed_everything(trial_seed)
    data = defense_data(defense, attacked, spec.seed)
    val_set = build_eval_set(attacked.data.val_x, attacked.data.val_y, attacked.attack)
    report_set = build_eval_set(attacked.data.report_x, attacked.data.report_y, attacked.attack)
    before = _metrics(attacked.model, report_set, val_set, fast)

    def monitor(m: nn.Module) -> dict[str, float]:
        scores = evaluate(m, val_set, fast)
        return {"val_acc": scores["acc"], "val_asr": scores["asr"]}

    ctx = DefenseContext(
        device=device,
        seed=trial_seed,
        generator=make_generator(device, trial_seed),
        fast=fast,
        progress=progress,
        monitor=monitor,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_s=spec.checkpoint_every_s,
        tag=spec.defense,
    )
    model = prepare_model(copy.deepcopy(attacked.model), device, fast)
    defended = defense.run(model, data, ctx).eval()
    _check_same_architecture(attacked.model, defended, spec.defense)
    _check_finite(defended, spec.defense)
    metrics = _metrics(defended, report_set, val_set, fast)
    metrics["before"] = before
    if ctx.findings:
        metrics["findings"] = ctx.findings
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    resolved = {
        "kind": "defense",
        "defense": {"name": spec.defense, "preset": spec.preset, "params": as_dict(defense.params)},
        "data": data.describe(),
        "attacked": {
            "folder": str(attacked.folder.resolve()),
            "dataset": attacked.spec["dataset"]["name"],
            "model": attacked.spec["model"],
            "attack": attacked.spec["attack"],
            "seed": attacked.spec["seed"],
        },
        "seed": spec.seed,
        "device": provenance.hardware(device),
        "amp": fast,
        "versions": provenance.package_versions(),
        "git": provenance.git_revision(),
    }
    return DefenseResult(defended, metrics, resolved)


def _check_same_architecture(before: nn.Module, after: nn.Module, name: str) -> None:
    a, b = before.state_dict(), after.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise RuntimeError(f"defense {name} returned a model of another architecture")


def _check_finite(model: nn.Module, name: str) -> None:
    """A diverged defense fails loudly: NaN weights still give finite ACC/ASR (argmax of NaN is 0)."""
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FloatingPointError(f"defense {name} produced non-finite weights ({key})")


def save_defense_result(result: DefenseResult, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    files.save_weights(state, out / "model.safetensors", metadata={"defense": result.spec["defense"]["name"]})
    files.write_yaml(result.spec, out / "spec.yaml")
    files.write_json(result.metrics, out / "metrics.json")
    return out
