"""One defense trial: `run_defense(spec, attacked) -> DefenseResult`, with exactly the data the
defense declares (`defense_data`), evaluated by the runner with the attack's trigger after the
defense returns (a defense never sees the attack).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from trials import provenance
from trials.defenses import DEFENSES, Defense, DefenseContext, DefenseData, make_defense
from trials.device import (
    allow_tf32,
    derive_seed,
    make_generator,
    precision_name,
    prepare_model,
    seed_everything,
    use_amp,
)
from trials.errors import InvalidValue
from trials.metrics import (
    EvalSet,
    build_eval_set,
    compare_halves,
    evaluate,
    evaluate_halves,
    with_backdoored,
)
from trials.params import as_dict
from trials.run.folder import AttackedModel
from trials.training import Progress

# --- one defense trial ---------------------------------------------------------------------------


@dataclass
class DefenseSpec:
    """A defense run on an attacked-model folder."""

    defense: str
    params: dict[str, Any] = field(default_factory=dict)  # override the preset, which overrides the defaults
    preset: str | None = None
    seed: int = 0
    device: str = "auto"
    # the seed of the held-out subset the defense gets; None: derived from `seed` (a study draws
    # its subsets independently of the defense seed, docs/spec.md "Studies")
    data_seed: int | None = None
    # training under bf16 autocast (CUDA only): None = the defense's declared `precision`, True / False
    # force it on / off (e.g. the bf16-vs-fp32 comparison of a defense that declares fp32)
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


def defense_data(
    defense: Defense, attacked: AttackedModel, seed: int, data_seed: int | None = None
) -> DefenseData:
    """Exactly the data the defense declares: held-out images (unlabeled or labeled, a seeded subset
    of the requested size) or the poisoned training set; never the test split. The subset is drawn
    with `data_seed` when given, else with a stream derived from the defense seed `seed`."""
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
    picker = torch.Generator().manual_seed(
        derive_seed(seed, "defense-data") if data_seed is None else data_seed
    )
    pick = torch.randperm(available, generator=picker)[:count].sort().values
    pick = pick.to(data.heldout_x.device)
    labels = data.heldout_y[pick] if kind == "clean_labeled" else None
    return DefenseData(kind, data.heldout_x[pick], labels, "held-out part of the training split", **common)


def training_amp(defense: Defense, device: torch.device, amp: bool | None) -> bool:
    """Whether the defense trains under bf16 autocast: on CUDA only, as the trial asks (`amp`) or,
    when it does not, as the defense declares (`precision`: DHBE, BCU and PBE declare fp32)."""
    return use_amp(device, amp, default=defense.precision == "amp")


def evaluation_baseline(attacked: AttackedModel) -> tuple[EvalSet, EvalSet, dict[str, Any]]:
    """The report and validation halves, each carrying the backdoored model's clean predictions
    (asr_paper conditions on them), and the backdoored model's metrics on them ("before"). They are
    the same for every trial on this model, so they are computed once per loaded folder: a sweep's
    worker keeps the folder between trials (on CIFAR-10 on a CPU, this evaluation is a minute)."""
    if attacked.evaluation is None:
        held = attacked.data
        val_set = with_backdoored(build_eval_set(held.val_x, held.val_y, attacked.attack), attacked.model)
        report_set = with_backdoored(
            build_eval_set(held.report_x, held.report_y, attacked.attack), attacked.model
        )
        attacked.evaluation = (report_set, val_set, evaluate_halves(attacked.model, report_set, val_set))
    report_set, val_set, before = attacked.evaluation
    return report_set, val_set, copy.deepcopy(before)


def run_defense(
    spec: DefenseSpec,
    attacked: AttackedModel,
    progress: Progress | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_saved: Callable[[Path], None] | None = None,
) -> DefenseResult:
    started = time.perf_counter()
    defense = resolve_defense(spec)
    device = attacked.data.device
    amp = training_amp(defense, device, spec.amp)
    allow_tf32(device)  # fp32 training may use TF32 on CUDA; evaluation never does (exact_fp32)
    # the defense's streams are derived from (seed, defense): independent of the attack's (same seed)
    trial_seed = derive_seed(spec.seed, "defense", spec.defense)
    seed_everything(trial_seed)
    data = defense_data(defense, attacked, spec.seed, spec.data_seed)
    report_set, val_set, before = evaluation_baseline(attacked)

    monitor = ValidationMonitor(val_set)
    ctx = DefenseContext(
        device=device,
        seed=trial_seed,
        generator=make_generator(device, trial_seed),
        amp=amp,
        progress=progress,
        monitor=monitor,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_s=spec.checkpoint_every_s,
        checkpoint_saved=checkpoint_saved,
        tag=spec.defense,
    )
    model = prepare_model(copy.deepcopy(attacked.model), device, amp)
    defended = defense.run(model, data, ctx).eval()
    _check_same_architecture(attacked.model, defended, spec.defense)
    _check_finite(defended, spec.defense)
    # the defended model's metrics, with the defense-only ones (der) against the backdoored model's
    metrics = compare_halves(before, evaluate_halves(defended, report_set, val_set))
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
        **({"data_seed": spec.data_seed} if spec.data_seed is not None else {}),
        "device": provenance.hardware(device),
        "precision": {"training": precision_name(device, amp), "evaluation": "fp32"},
        "versions": provenance.package_versions(),
        "git": provenance.git_revision(),
    }
    return DefenseResult(defended, metrics, resolved)


# Validation monitoring (the val ACC/ASR beside a defense's progress lines, and Tune's view of a
# running trial) may take at most this share of a run's time: on CIFAR-10 on a CPU one look at the
# validation half costs as much as an epoch of BCU, and a look per epoch doubled the run.
MONITOR_SHARE = 0.1


class ValidationMonitor:
    """The defense context's monitor: validation-half ACC and ASR of a model, skipped (an empty
    record) while the time spent looking exceeds MONITOR_SHARE of the time since the run began.
    The first look always happens. Looking never changes the model or a random stream, so the
    result of a run is the same whichever looks were skipped; only its progress history thins."""

    def __init__(self, val_set: Any, share: float = MONITOR_SHARE, clock: Any = time.perf_counter) -> None:
        # ACC and ASR need the clean and the triggered images only, not the amplified layouts
        self.val_set = dataclasses.replace(val_set, amplified={})
        self.share, self.clock = share, clock
        self.began = clock()
        self.spent = 0.0
        self.looks = 0

    def __call__(self, model: nn.Module) -> dict[str, float]:
        if self.looks and self.spent > self.share * (self.clock() - self.began):
            return {}
        start = self.clock()
        scores = evaluate(model, self.val_set)
        self.spent += self.clock() - start
        self.looks += 1
        return {"val_acc": scores["acc"], "val_asr": scores["asr"]}


def _check_same_architecture(before: nn.Module, after: nn.Module, name: str) -> None:
    a, b = before.state_dict(), after.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise RuntimeError(f"defense {name} returned a model of another architecture")


def _check_finite(model: nn.Module, name: str) -> None:
    """A diverged defense fails loudly: NaN weights still give finite ACC/ASR (argmax of NaN is 0)."""
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FloatingPointError(f"defense {name} produced non-finite weights ({key})")
