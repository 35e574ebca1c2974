"""Sweep specs (`bdlab.spec`) and search spaces (`bdlab.spaces`): loading, grids, errors, Optuna.

No training: everything here runs in a few seconds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from bdlab import spaces
from bdlab.spaces import (
    ChoiceDist,
    FloatDist,
    IntDist,
    decode,
    encode,
    load_space,
    parse_space,
    suggest,
    to_optuna,
)
from bdlab.spec import (
    AttackCell,
    FailurePolicy,
    Resources,
    SamplerSettings,
    TrialResources,
    expand_grid,
    load_sweep,
    parse_sweep,
)

from trials.defenses import DEFENSES
from trials.errors import InvalidValue
from trials.params import param
from trials.presets import available_presets
from trials.run import AttackSpec, DefenseSpec, resolve_defense

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
BUDGET_PARAMS = {"data_fraction", "data_count"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def base_spec() -> dict:
    return {
        "name": "t",
        "datasets": ["digits"],
        "models": ["mini_resnet"],
        "attacks": ["badnets"],
        "defenses": ["clp"],
    }


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- the shipped files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sweep", "trials_per_cell", "total"),
    [
        # 8 configurations x 3 seeds; CLP: 11 grid levels of u + the default, 1 seed
        ("digits.yaml", "digits-robustness", {"ft": 24, "fp": 24, "bcu": 24, "clp": 12}, 168),
        # 8 configurations x 2 budgets x 5 subsets; CLP as above; BCU 8 x 3 seeds
        (
            "cifar10_gpu.yaml",
            "cifar10-robustness",
            {"ft": 80, "fp": 80, "nad": 80, "clp": 12, "bcu": 24},
            552,
        ),
        # the default configuration x 3 defense seeds on 3 attack seeds; CLP (deterministic) 1 seed
        (
            "digits_seeds.yaml",
            "digits-seeds",
            {"bcu": 3, "clp": 1, "aft": 3, "pbe": 3, "nc": 3, "ibau": 3},
            48,
        ),
        # the slower baselines, the same design: 6 defenses x 3 defense seeds x 3 attack seeds
        (
            "digits_seeds_baselines.yaml",
            "digits-seeds-baselines",
            {"ft": 3, "fp": 3, "nad": 3, "gdm": 3, "anp": 3, "mcr": 3},
            54,
        ),
    ],
)
def test_shipped_studies_load_with_the_sizes_their_readme_gives(name, sweep, trials_per_cell, total):
    from bdlab.designs import configuration_count

    spec = load_sweep(ROOT / "search_spaces" / "studies" / name)
    assert spec.name == sweep
    sizes = {}
    for d in spec.defenses:
        assert d.study is not None, f"{d.name} is a search, not a study"
        design = d.study
        sizes[d.name] = (
            configuration_count(d.space, design)
            * len(design.seeds)
            * max(1, len(design.budgets))
            * design.subsets
        )
    assert sizes == trials_per_cell
    assert len(spec.attack_cells) * sum(sizes.values()) == total


def test_quickstart_loads():
    spec = load_sweep(QUICKSTART)
    assert spec.name == "quickstart"
    assert spec.source == "search_spaces/quickstart.yaml"
    assert [c.label for c in spec.attack_cells] == [
        "digits/mini_resnet/badnets/s0",
        "digits/mini_resnet/blended/s0",
    ]
    assert [(d.name, d.preset, d.trials, d.space_source) for d in spec.defenses] == [
        ("clp", "cpu", 3, "default"),
        ("bcu", "cpu", 3, "default"),
        ("ft", "cpu", 3, "default"),
        ("dhbe", "cpu", 1, "default"),  # its default configuration alone: it collapses on digits
    ]
    assert spec.trial_count == 20
    cells = spec.defense_cells()
    assert len(cells) == 8
    assert cells[1].label == "digits/mini_resnet/badnets/s0 :: bcu"
    assert cells[4].label == "digits/mini_resnet/blended/s0 :: clp"
    assert cells[7].label == "digits/mini_resnet/blended/s0 :: dhbe"
    assert spec.objectives == {"acc": "max", "asr": "min"}
    assert spec.sampler == SamplerSettings(name="tpe", seed=0)
    assert spec.resources == Resources(TrialResources(cpu=1, gpu=0), TrialResources(cpu=1, gpu=0))
    assert spec.failure == FailurePolicy(max_retries=1)
    assert spec.device == "auto"
    # DHBE stays CPU-sized on top of the cpu preset: no width, batch or schedule is searched.
    dhbe = spec.defenses[3]
    assert not {"generator_width", "patch_generator_width", "batch_size", "epochs", "iters_per_epoch"} & set(
        dhbe.space
    )
    assert dhbe.default_params()["generator_width"] == 16


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_every_default_space_loads(defense):
    path = spaces.space_path(defense)
    assert path.read_text().startswith("#"), (
        f"{path.name} must start with a comment on where its ranges come from"
    )
    space = load_space(defense)
    assert not BUDGET_PARAMS & set(space), "a default space must not search the data budget"
    if DEFENSES.get(defense).Params.__dataclass_fields__:
        assert space, f"{defense} has parameters but an empty default space"


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_default_configs_lie_in_the_default_space(defense):
    """The paper defaults and every preset but `smoke` are points of the default space, so a study's
    default trial is recorded with all its searched values."""
    space = load_space(defense)
    for preset in [None, *[p for p in available_presets(defense) if p != "smoke"]]:
        entry = parse_sweep({**base_spec(), "defenses": [{"name": defense, "preset": preset}]}).defenses[0]
        assert entry.preset == preset and entry.space == space
        default = as_resolved(defense, entry.default_params())
        outside = {k: default[k] for k, dist in space.items() if not dist.contains(default[k])}
        assert not outside, f"preset {preset}: {outside}"


def test_a_default_config_outside_an_inline_space_loads():
    """The defender's configuration need not be a point of the space (the study records what fits)."""
    entry = parse_sweep({**base_spec(), "defenses": [{"name": "clp", "space": {"u": {"float": [4.0, 6.0]}}}]})
    assert not entry.defenses[0].space["u"].contains(3.0)


# --- grids and cells --------------------------------------------------------------------------------


def test_grid_expansion_counts_and_order():
    data = {
        **base_spec(),
        "attacks": [{"name": "badnets", "params": {"ratio": [0.05, 0.1], "size": 3}}, "blended"],
        "seeds": [0, 1],
    }
    cells = parse_sweep(data).attack_cells
    assert [c.label for c in cells] == [
        "digits/mini_resnet/badnets(ratio=0.05,size=3)/s0",
        "digits/mini_resnet/badnets(ratio=0.05,size=3)/s1",
        "digits/mini_resnet/badnets(ratio=0.1,size=3)/s0",
        "digits/mini_resnet/badnets(ratio=0.1,size=3)/s1",
        "digits/mini_resnet/blended/s0",
        "digits/mini_resnet/blended/s1",
    ]
    assert cells[0].attack_params == {"ratio": 0.05, "size": 3}


def test_dataset_and_model_axes():
    data = {
        **base_spec(),
        "datasets": [{"name": "digits", "params": {"heldout_fraction": [0.1, 0.2]}}],
        "models": ["mini_resnet", "resnet18"],
    }
    spec = parse_sweep(data)
    assert len(spec.attack_cells) == 4
    assert spec.attack_cells[0].label == "digits(heldout_fraction=0.1)/mini_resnet/badnets/s0"
    assert spec.attack_cells[2].model == "mini_resnet" and spec.attack_cells[2].dataset_params == {
        "heldout_fraction": 0.2
    }
    assert len(spec.defense_cells()) == 4


@dataclass(frozen=True)
class ListParams:
    sizes: list[int] = param([1, 2], "a list-typed param", low=1)
    ratio: float = param(0.1, "a scalar", low=0.0, high=1.0)


def test_list_typed_params_grid_only_over_lists_of_lists():
    one = expand_grid([ListParams], {"sizes": [3, 4]}, "f.yaml: attacks[0].params", "attack x")
    assert one == [{"sizes": [3, 4]}]
    grid = expand_grid([ListParams], {"sizes": [[3], [4, 5]], "ratio": [0.1, 0.2]}, "f: p", "attack x")
    assert grid == [
        {"sizes": [3], "ratio": 0.1},
        {"sizes": [3], "ratio": 0.2},
        {"sizes": [4, 5], "ratio": 0.1},
        {"sizes": [4, 5], "ratio": 0.2},
    ]
    with pytest.raises(InvalidValue, match=r"f: p\.sizes: \[0\] is not allowed; must be >= 1"):
        expand_grid([ListParams], {"sizes": [[1], [0]]}, "f: p", "attack x")


def test_identity_is_explicit_and_attack_spec_carries_training():
    data = {**base_spec(), "attack_training": {"epochs": 5, "lr": 0.01}}
    cell = parse_sweep(data).attack_cells[0]
    identity = cell.identity()
    assert identity["attack"] == {"name": "badnets", "params": identity["attack"]["params"]}
    assert identity["attack"]["params"]["ratio"] == 0.1 and identity["attack"]["params"]["size"] == 3
    assert identity["recipe"]["epochs"] == 5 and identity["recipe"]["lr"] == 0.01
    assert identity["recipe"]["batch_size"] == 128  # the digits recipe fills the rest
    assert identity["dataset"]["params"]["heldout_fraction"] == 0.1
    assert list(identity) == sorted(identity)
    # the same model written with its default spelled out has the same identity
    explicit = AttackCell(
        "digits", {}, None, "mini_resnet", "badnets", {"ratio": 0.1}, 0, {"epochs": 5, "lr": 0.01}
    )
    assert explicit.identity() == identity
    spec = cell.attack_spec("cpu")
    assert isinstance(spec, AttackSpec)
    assert (spec.epochs, spec.recipe, spec.device, spec.seed) == (5, {"lr": 0.01}, "cpu", 0)
    assert parse_sweep({**base_spec(), "attack_training": {"epochs": None}}).attack_cells[0].training == {}


def test_duplicate_attacked_models_are_an_error():
    data = {**base_spec(), "attacks": ["badnets", {"name": "badnets", "params": {"ratio": 0.1}}]}
    with pytest.raises(
        InvalidValue, match=r"<inline>: attacks: 'digits/mini_resnet/badnets\(ratio=0.1\)/s0'"
    ):
        parse_sweep(data)


# --- defenses ---------------------------------------------------------------------------------------


def test_defaults_preset_fixed_and_trials():
    data = {
        **base_spec(),
        "defaults": {"preset": "cpu", "trials": 3},
        "defenses": [
            {"name": "bcu", "fixed": {"epochs": 30}, "space": {"lr": {"float": [0.01, 0.2], "log": True}}},
            {"name": "clp", "preset": None, "space": "none"},
            {"name": "ft", "trials": 5},
        ],
    }
    bcu, clp, ft = parse_sweep(data).defenses
    assert bcu.preset == "cpu" and bcu.trials == 3 and bcu.space_source == "inline"
    assert bcu.space == {"lr": FloatDist(0.01, 0.2, log=True)}
    assert bcu.default_params()["epochs"] == 30 and bcu.default_params()["ratio_layer4"] == 0.54
    assert (clp.preset, clp.trials, clp.space, clp.default_params()) == (None, 1, {}, {})
    assert ft.trials == 5 and ft.space == load_space("ft")


def test_fixed_params_leave_the_default_space():
    entry = parse_sweep({**base_spec(), "defenses": [{"name": "ft", "fixed": {"lr": 0.05}}]}).defenses[0]
    assert entry.space_source == "default"
    assert set(entry.space) == set(load_space("ft")) - {"lr"}
    assert entry.default_params() == {"lr": 0.05}


def test_fixed_values_are_typed():
    spec = parse_sweep(
        {**base_spec(), "defenses": [{"name": "pbe", "fixed": {"eps": "8/255", "epochs_per_step": "5"}}]}
    )
    assert spec.defenses[0].fixed == {"eps": 8 / 255, "epochs_per_step": 5}


def test_resources_fractional_and_whole_gpus():
    data = {**base_spec(), "resources": {"attack": {"gpu": 2}, "defense": {"cpu": 2, "gpu": 0.25}}}
    assert parse_sweep(data).resources == Resources(
        TrialResources(cpu=1, gpu=2), TrialResources(cpu=2, gpu=0.25)
    )


# --- errors: one line naming the file, the path inside it, the value and what is allowed -----------


def _with(**changes):
    def apply(data: dict) -> dict:
        data = copy.deepcopy(data)
        data.update(changes)
        return data

    return apply


ERRORS = [
    (
        "unknown defense",
        _with(defenses=["clp", "nope"]),
        ["defenses[1].name: 'nope'", "registered defenses:", "bcu, clp"],
    ),
    (
        "unknown searched param",
        _with(defenses=[{"name": "bcu", "space": {"nope": {"float": [0, 1]}}}]),
        ["defenses[0].space: 'nope'", "defense bcu has the parameters:", "ratio_head"],
    ),
    (
        "bound outside the field's range",
        _with(defenses=[{"name": "bcu", "space": {"ratio_head": {"float": [0.0, 1.5]}}}]),
        ["defenses[0].space.ratio_head: 1.5", "bcu.ratio_head: allowed range [0.0, 1.0]"],
    ),
    (
        "bound at an exclusive low",
        _with(defenses=[{"name": "ft", "space": {"lr": {"float": [0.0, 0.1]}}}]),
        ["defenses[0].space.lr: 0.0", "ft.lr: must be > 0.0"],
    ),
    (
        "float distribution on an int field",
        _with(defenses=[{"name": "ft", "space": {"batch_size": {"float": [16, 128]}}}]),
        [
            "defenses[0].space.batch_size: {'float': [16, 128]}",
            "ft.batch_size has type int, searched with: int or choice",
        ],
    ),
    (
        "int distribution on a str field",
        _with(defenses=[{"name": "anp", "space": {"threshold_rule": {"int": [0, 1]}}}]),
        ["defenses[0].space.threshold_rule", "searched with: choice"],
    ),
    (
        "a choice outside the field's choices",
        _with(defenses=[{"name": "anp", "space": {"threshold_rule": {"choice": ["fixed", "oracle"]}}}]),
        ["defenses[0].space.threshold_rule.choice[1]: 'oracle'", "allowed: fixed, clean_acc"],
    ),
    (
        "a scalar choice for a list field",
        _with(defenses=[{"name": "nad", "space": {"betas": {"choice": [[1, 2, 3, 4], 5]}}}]),
        ["defenses[0].space.betas.choice[1]: 5", "each choice must be a list"],
    ),
    (
        "unknown distribution key",
        _with(defenses=[{"name": "clp", "space": {"u": {"float": [1, 4], "log_scale": True}}}]),
        ["defenses[0].space.u: 'log_scale'", "a float distribution takes the keys: float, log, step"],
    ),
    (
        "log from zero",
        _with(defenses=[{"name": "bcu", "space": {"ratio_head": {"float": [0.0, 0.5], "log": True}}}]),
        ["defenses[0].space.ratio_head.float: 0.0", "needs low > 0"],
    ),
    (
        "step that does not divide the range",
        _with(defenses=[{"name": "ft", "space": {"epochs": {"int": [10, 35], "step": 10}}}]),
        ["defenses[0].space.epochs.step: 10", "multiple of step"],
    ),
    (
        "searched and fixed at once",
        _with(defenses=[{"name": "clp", "fixed": {"u": 2.0}, "space": {"u": {"float": [1.0, 4.0]}}}]),
        ["defenses[0].fixed: 'u'", "searched by the space (inline) and fixed at once"],
    ),
    (
        "fixed value out of range",
        _with(defenses=[{"name": "bcu", "fixed": {"ratio_head": 2}}]),
        ["defenses[0].fixed.ratio_head: 2", "allowed range [0.0, 1.0]"],
    ),
    (
        "unknown fixed param",
        _with(defenses=[{"name": "bcu", "fixed": {"ratio": 0.1}}]),
        ["defenses[0].fixed: 'ratio'", "defense bcu has the parameters:", "ratio_layer4"],
    ),
    (
        "preset that does not exist",
        _with(defenses=[{"name": "bcu", "preset": "gpu"}]),
        ["defenses[0].preset: 'gpu'", "presets of bcu: cpu, smoke"],
    ),
    (
        "preset from defaults that does not exist",
        _with(defaults={"preset": "gpu"}),
        ["defaults.preset (for defenses[0]): 'gpu'", "presets of clp: cpu"],
    ),
    (
        "trials below one",
        _with(defenses=[{"name": "clp", "trials": 0}]),
        ["defenses[0].trials: 0", "integer >= 1"],
    ),
    (
        "trials on an empty space",
        _with(defenses=[{"name": "clp", "space": "none", "trials": 3}]),
        ["defenses[0].trials: 3", "only the default configuration"],
    ),
    (
        "bad space value",
        _with(defenses=[{"name": "clp", "space": "big"}]),
        ["defenses[0].space: 'big'", "default, none, or a mapping"],
    ),
    (
        "duplicate defense",
        _with(defenses=["clp", {"name": "clp", "preset": "cpu"}]),
        ["defenses[1].name: 'clp'", "may appear once"],
    ),
    (
        "bad objective",
        _with(objectives={"acc": "max", "loss": "min"}),
        ["objectives: 'loss'", "metrics: acc, asr, asr_cond"],
    ),
    ("bad direction", _with(objectives={"acc": "up"}), ["objectives.acc: 'up'", "max or min"]),
    (
        "gpu 1.5",
        _with(resources={"defense": {"gpu": 1.5}}),
        ["resources.defense.gpu: 1.5", "a fraction below 1 (a shared GPU), or a whole number"],
    ),
    ("cpu 0", _with(resources={"attack": {"cpu": 0}}), ["resources.attack.cpu: 0", "must be > 0"]),
    ("negative gpu", _with(resources={"attack": {"gpu": -1}}), ["resources.attack.gpu: -1", "whole number"]),
    (
        "unknown resource key",
        _with(resources={"defense": {"mem": 4}}),
        ["resources.defense: 'mem'", "valid keys: cpu, gpu"],
    ),
    (
        "unknown top-level key",
        _with(defences=["clp"]),
        ["sweep.yaml: 'defences'", "valid keys: name, datasets"],
    ),
    (
        "unknown defense entry key",
        _with(defenses=[{"name": "clp", "trails": 3}]),
        ["defenses[0]: 'trails'", "valid keys: name, preset, fixed, space, trials"],
    ),
    ("bad sampler", _with(sampler={"name": "cmaes"}), ["sampler.name: 'cmaes'", "tpe, random, gp, nsga2"]),
    ("bad retries", _with(failure={"max_retries": -1}), ["failure.max_retries: -1", "must be >= 0"]),
    ("bad device", _with(device="gpu"), ["device: 'gpu'", "auto, cpu, cuda or cuda:N"]),
    ("bad name", _with(name="my sweep"), ["name: 'my sweep'", "letters, digits"]),
    (
        "unknown dataset",
        _with(datasets=["mnist"]),
        ["datasets[0].name: 'mnist'", "registered datasets:", "digits"],
    ),
    (
        "unknown model",
        _with(models=["resnet50"]),
        ["models[0]: 'resnet50'", "registered models:", "resnet18"],
    ),
    (
        "unknown attack",
        _with(attacks=["badnet"]),
        ["attacks[0].name: 'badnet'", "registered attacks:", "badnets"],
    ),
    (
        "attack param out of range",
        _with(attacks=[{"name": "badnets", "params": {"ratio": [0.05, 1.5]}}]),
        ["attacks[0].params.ratio: 1.5", "allowed range [0.0, 1.0]"],
    ),
    (
        "unknown attack param",
        _with(attacks=[{"name": "blended", "params": {"size": 3}}]),
        ["attacks[0].params: 'size'", "attack blended has the parameters:", "alpha"],
    ),
    (
        "unknown dataset param",
        _with(datasets=[{"name": "digits", "params": {"heldout": 0.2}}]),
        ["datasets[0].params: 'heldout'", "heldout_fraction"],
    ),
    (
        "unknown training field",
        _with(attack_training={"epoch": 3}),
        ["attack_training: 'epoch'", "valid keys: epochs, batch_size"],
    ),
    ("duplicate seed", _with(seeds=[0, 0]), ["seeds[1]: 0", "may appear once"]),
    (
        "missing key",
        lambda d: {k: v for k, v in d.items() if k != "models"},
        ["sweep.yaml: '(no models)'", "required keys"],
    ),
]


@pytest.mark.parametrize("change, needles", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_file_path_value_and_allowed(tmp_path, change, needles):
    path = write(tmp_path, change(base_spec()))
    with pytest.raises(InvalidValue) as err:
        load_sweep(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path) + ":"), message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_errors_in_a_default_space_file_name_that_file(tmp_path, monkeypatch):
    monkeypatch.setattr(spaces, "SPACE_DIR", tmp_path)
    (tmp_path / "bcu.yaml").write_text("# comment\nratio_head: {float: [0.0, 1.5]}\n")
    with pytest.raises(InvalidValue) as err:
        load_space("bcu")
    assert str(err.value).startswith(f"{tmp_path / 'bcu.yaml'}: ratio_head: 1.5 is not allowed;")
    (tmp_path / "bcu.yaml").write_text("ratio_head: {float: [0.0, 0.5]\n")
    with pytest.raises(InvalidValue, match="not valid YAML") as err:
        load_space("bcu")
    assert "\n" not in str(err.value)
    with pytest.raises(InvalidValue, match="the file does not exist"):
        load_space("clp")


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A module that registers a defense; the registry is restored afterwards."""
    import sys

    (tmp_path / "spec_plugin.py").write_text(
        "from dataclasses import dataclass\n"
        "from trials.defenses import Defense, register_defense\n"
        "from trials.params import param\n\n"
        "@dataclass(frozen=True)\n"
        "class P:\n"
        "    strength: float = param(0.5, 'strength', low=0.0, high=1.0)\n\n"
        "@register_defense('plugged')\n"
        "class Plugged(Defense):\n"
        "    Params = P\n"
        "    data_kind = 'none'\n"
        "    def run(self, model, data, ctx):\n"
        "        return model\n"
    )
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with DEFENSES.scope():
        yield tmp_path
    for name in ("spec_plugin", "broken_plugin"):
        sys.modules.pop(name, None)


def test_plugins_register_components_before_validation(plugin_dir):
    data = {
        **base_spec(),
        "plugins": ["spec_plugin"],
        "defenses": [{"name": "plugged", "space": {"strength": {"float": [0.1, 0.9]}}, "trials": 2}],
    }
    spec = parse_sweep(data)
    assert spec.plugins == ["spec_plugin"]
    assert spec.defenses[0].space == {"strength": FloatDist(0.1, 0.9)}
    with pytest.raises(InvalidValue) as err:
        parse_sweep({**data, "plugins": ["spec_plugin", "broken_plugin"]})
    assert str(err.value) == (
        "<inline>: plugins[1]: 'broken_plugin' is not allowed; cannot be imported (RuntimeError: boom second line)"
    )
    with pytest.raises(InvalidValue, match=r"plugins\[0\]: 'no_such_module_xyz'.*ModuleNotFoundError"):
        parse_sweep({**data, "plugins": ["no_such_module_xyz"]})


def test_missing_sweep_file(tmp_path):
    with pytest.raises(InvalidValue, match="no such file"):
        load_sweep(tmp_path / "nope.yaml")


# --- Optuna --------------------------------------------------------------------------------------


def _study(seed: int = 0) -> optuna.Study:
    return optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed)
    )


def test_suggest_stays_in_bounds_and_decodes_lists():
    space = parse_space(
        "nad",
        {
            "lr": {"float": [0.002, 0.1], "log": True},
            "epochs": {"int": [10, 30], "step": 10},
            "betas": {"choice": [[1, 2, 3, 4], [5, 6, 7, 8]]},
            "power": {"choice": [1, 2.5]},
        },
        "inline.yaml: space",
    )
    assert space["epochs"] == IntDist(10, 30, step=10)
    assert space["betas"] == ChoiceDist(((1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)))
    study = _study()
    seen_betas = set()
    for _ in range(20):
        trial = study.ask()
        values = suggest(trial, space)
        assert 0.002 <= values["lr"] <= 0.1
        assert values["epochs"] in (10, 20, 30)
        assert values["betas"] in ([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0])
        assert isinstance(values["betas"], list)
        assert values["power"] in (1.0, 2.5)
        assert isinstance(trial.params["betas"], str)  # what Optuna stores: a JSON string
        assert decode(space, trial.params) == values
        study.tell(trial, [0.9, 0.1])
        seen_betas.add(tuple(values["betas"]))
    assert len(seen_betas) == 2
    # the same decoding from the stored trials
    for frozen in study.trials:
        decoded = decode(space, frozen.params)
        assert isinstance(decoded["betas"], list)
        assert decoded["betas"][0] in (1.0, 5.0)


def test_to_optuna_and_enqueued_default_round_trip():
    spec = parse_sweep({**base_spec(), "defenses": [{"name": "pbe", "preset": "cpu"}]})
    entry = spec.defenses[0]
    dists = to_optuna(entry.space)
    assert set(dists) == set(entry.space)
    assert isinstance(dists["lr"], optuna.distributions.FloatDistribution) and dists["lr"].log
    assert isinstance(dists["pool_schedule"], optuna.distributions.CategoricalDistribution)
    assert dists["pool_schedule"].choices == ("[0.14, 0.35, 0.49]", "[0.2, 0.5, 0.7]", "[0.24, 0.6, 0.84]")
    default = as_resolved(entry.name, entry.default_params())
    study = _study()
    study.enqueue_trial(encode(entry.space, default))
    trial = study.ask(dists)  # the default trial, as the driver would enqueue it
    assert decode(entry.space, trial.params) == {k: default[k] for k in entry.space}
    assert decode(entry.space, trial.params)["pool_schedule"] == [0.2, 0.5, 0.7]
    assert trial.params["initial_pool"] == 0.1  # the cpu preset's, not the paper's 0.05


def as_resolved(defense: str, overrides: dict) -> dict:
    from trials.params import as_dict

    return as_dict(resolve_defense(DefenseSpec(defense=defense, params=overrides)).params)


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_sampled_configs_of_every_default_space_resolve(defense):
    space = load_space(defense)
    entries = [
        parse_sweep({**base_spec(), "defenses": [{"name": defense, "preset": preset}]}).defenses[0]
        for preset in (None, "cpu")
    ]
    study = _study(seed=1)
    for _ in range(5):
        trial = study.ask()
        sampled = suggest(trial, space)
        for entry in entries:
            params = resolve_defense(
                DefenseSpec(defense=defense, params={**entry.default_params(), **sampled})
            ).params
            for name, value in sampled.items():
                resolved = getattr(params, name)
                assert (list(resolved) if isinstance(resolved, tuple) else resolved) == value
        study.tell(trial, [0.5, 0.5])
