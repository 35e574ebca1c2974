"""One attack trial: `run_attack(spec) -> AttackResult`.

The runner knows no attack by name: everything an attack does differently (train a reference
model, start from another model, train some layers only, transform batches) goes through the
`Attack` interface.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from trials import provenance
from trials.attacks import ATTACKS, Attack, AttackContext, PoisonedSet, make_attack
from trials.data import DATASETS, ImageData, make_dataset
from trials.device import allow_tf32, make_generator, pick_device, precision_name, seed_everything, use_amp
from trials.metrics import build_eval_set, evaluate, evaluate_halves, with_backdoored
from trials.models import MODELS
from trials.params import as_dict, resolve_params
from trials.presets import load_recipe_preset
from trials.training import Progress, TrainRecipe, train_classifier


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
    recipe_preset: str | None = None  # trials/recipe_presets.yaml: recipe and dataset parameters by name
    device: str = "auto"
    amp: bool | None = None  # training under bf16 autocast + channels_last; None = on for CUDA, never on CPU
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


def default_recipe(dataset: str) -> TrainRecipe:
    """The dataset's own CPU-sized recipe (declared beside its class), else the paper's."""
    return TrainRecipe(**DATASETS.get(dataset).recipe)


def _preset(spec: AttackSpec) -> dict[str, Any]:
    if spec.recipe_preset is None:
        return {"recipe": {}, "dataset_params": {}}
    return load_recipe_preset(spec.recipe_preset, spec.dataset)


def dataset_params(spec: AttackSpec) -> dict[str, Any]:
    """The dataset parameters the attack runs with: the recipe preset's, then the spec's own."""
    return {**_preset(spec)["dataset_params"], **spec.dataset_params}


def resolve_recipe(spec: AttackSpec) -> TrainRecipe:
    """The dataset's recipe, then the recipe preset's fields, then the spec's own (epochs last)."""
    base = default_recipe(spec.dataset)
    overrides = {**_preset(spec)["recipe"], **spec.recipe}
    if spec.epochs is not None:
        overrides["epochs"] = spec.epochs
    merged = {**as_dict(base), **overrides}
    return resolve_params(TrainRecipe, merged, owner="recipe")


def validate(spec: AttackSpec) -> tuple[Any, TrainRecipe]:
    """Check every name and parameter before any data is read; returns (attack params, recipe)."""
    make_dataset(spec.dataset, dataset_params(spec), spec.data_root)
    MODELS.get(spec.model)
    attack_cls = ATTACKS.get(spec.attack)
    attack_params = resolve_params(attack_cls.Params, spec.attack_params, owner=f"attack {spec.attack}")
    return attack_params, resolve_recipe(spec)


def run_attack(spec: AttackSpec, progress: Progress | None = None) -> AttackResult:
    started = time.perf_counter()
    attack_params, recipe = validate(spec)
    device = pick_device(spec.device)
    amp = use_amp(device, spec.amp)
    allow_tf32(device)  # fp32 work in training may use TF32 on CUDA; evaluation never does
    seed_everything(spec.seed)
    generator = make_generator(device, spec.seed)

    dataset = make_dataset(spec.dataset, dataset_params(spec), spec.data_root)
    data = dataset.load(device)
    attack = make_attack(spec.attack, as_dict(attack_params), data.num_classes, data.image_shape, spec.seed)
    ctx = AttackContext(data, spec.model, recipe, generator, amp, progress)
    attack.setup(ctx)
    val_set = build_eval_set(data.val_x, data.val_y, attack)
    report_set = build_eval_set(data.report_x, data.report_y, attack)

    poisoned = attack.poison(data.train_x, data.train_y, ctx)
    model = attack.initial_model(ctx)
    if model is None:
        model = ctx.new_model()

    def on_validation(m: nn.Module) -> dict[str, float]:
        scores = evaluate(m, val_set)
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
        amp=amp,
        batch_hook=attack.batch_hook if attack.has_batch_hook else None,
        poisoned_mask=poisoned_mask,
        parameters=attack.trainable_parameters(model),
        evaluate=on_validation,
        progress=progress,
        tag="attack",
    )
    metrics = evaluate_halves(model, report_set, val_set)
    clean_model = None
    if spec.clean_reference or ctx.has_clean_model:
        clean_model = ctx.clean_model()
        # asr_paper of the clean model conditions on the backdoored model's clean predictions
        metrics["clean_reference"] = evaluate_halves(
            clean_model, with_backdoored(report_set, model), with_backdoored(val_set, model)
        )
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
        "recipe_preset": spec.recipe_preset,
        "clean_reference": clean_model is not None,
        "device": provenance.hardware(device),
        "precision": {"training": precision_name(device, amp), "evaluation": "fp32"},
        "poisoned": int(len(poisoned.index)),
        "versions": provenance.package_versions(),
        "git": provenance.git_revision(),
    }
    return AttackResult(model, attack, poisoned, data, metrics, resolved, clean_model)


