"""Study cells (issue 15): the `study:` key of a defense entry, the designs (bdlab.designs) and the
held-out subsets of study trials. No training except the subset draws on the tiny attacked model.
"""

from __future__ import annotations

import math

import optuna
import pytest
import torch
from bdlab.designs import configuration_count, configurations, grid_levels, study_points, subset_seed
from bdlab.spaces import ChoiceDist, FloatDist, IntDist
from bdlab.spec import StudyDesign, parse_sweep
from bdlab.studies import DEFAULT_ATTR, PARAMS_ATTR, POINT_ATTR, CellSearcher

from trials.defenses import make_defense
from trials.device import derive_seed
from trials.errors import InvalidValue
from trials.run import defense_data

optuna.logging.set_verbosity(optuna.logging.WARNING)


def spec_with(*defenses, defaults=None) -> dict:
    out = {
        "name": "t",
        "datasets": ["digits"],
        "models": ["mini_resnet"],
        "attacks": ["badnets"],
        "defenses": list(defenses),
    }
    if defaults is not None:
        out["defaults"] = defaults
    return out


SPACE = {
    "lr": FloatDist(1e-4, 1e-1, log=True),
    "momentum": FloatDist(0.0, 0.9, step=0.1),
    "epochs": IntDist(1, 10),
    "width": IntDist(8, 512, log=True, step=8),
    "mode": ChoiceDist(("a", "b", "c")),
    "betas": ChoiceDist(((1, 2), (3, 4))),
}


# --- the spec ------------------------------------------------------------------------------------


def test_a_study_entry_is_typed_and_counts_its_points():
    spec = parse_sweep(
        spec_with(
            {
                "name": "ft",
                "preset": "smoke",
                "study": {"configurations": 3, "seeds": [0, 1], "budgets": [0.04, 0.01], "subsets": 5},
            },
            {"name": "clp", "trials": 2},
        )
    )
    ft, clp = spec.defenses
    assert ft.study == StudyDesign("sobol", 3, [0, 1], [0.04, 0.01], 5)
    assert ft.trials == 3 * 2 * 2 * 5
    assert clp.study is None and clp.trials == 2
    assert spec.trial_count == 60 + 2


def test_study_defaults_and_defaults_entry():
    spec = parse_sweep(
        spec_with({"name": "ft", "preset": "smoke"}, {"name": "clp", "trials": 2}, defaults={"study": {}})
    )
    ft, clp = spec.defenses
    assert ft.study == StudyDesign() and ft.trials == 8  # 8 configurations x seed 0 x 1 x 1
    assert clp.study is None and clp.trials == 2  # the entry's own `trials` makes it a search


def test_a_grid_study_counts_its_grid():
    spec = parse_sweep(
        spec_with({"name": "ft", "preset": "smoke", "study": {"design": "grid", "configurations": 8}})
    )
    ft = spec.defenses[0]
    # ft's default space: lr (float, log) and batch_size (3 choices): levels 3 x 2 <= 7, plus the default
    assert ft.trials == 1 + 6 == configuration_count(ft.space, ft.study)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"name": "ft", "trials": 3, "study": {}},
            "<inline>: defenses[0].study: {} is not allowed; a defense entry is a search (trials) or a study, not both",
        ),
        (
            {"name": "ft", "study": {"design": "lhs"}},
            "<inline>: defenses[0].study.design: 'lhs' is not allowed; allowed: sobol, grid",
        ),
        (
            {"name": "ft", "study": {"configurations": 0}},
            "<inline>: defenses[0].study.configurations: 0 is not allowed; must be >= 1",
        ),
        (
            {"name": "ft", "study": {"budgets": [0.04, 1.5]}},
            "<inline>: defenses[0].study.budgets: [0.04, 1.5] is not allowed; allowed range (0.0, 1.0]",
        ),
        (
            {"name": "ft", "study": {"budgets": [0.0]}},
            "<inline>: defenses[0].study.budgets: [0.0] is not allowed; allowed range (0.0, 1.0]",
        ),
        (
            {"name": "clp", "study": {"budgets": [0.04]}},
            "<inline>: defenses[0].study.budgets: [0.04] is not allowed; defense clp takes no held-out data "
            "(none): budgets apply to defenses that do",
        ),
        (
            {"name": "ft", "study": {"budgets": [0.04]}, "space": {"data_fraction": {"float": [0.01, 0.1]}}},
            "<inline>: defenses[0].study.budgets: [0.04] is not allowed; data_fraction is searched by the "
            "space: drop one",
        ),
        (
            {"name": "ft", "study": {"seeds": [1, 1]}},
            "<inline>: defenses[0].study.seeds[1]: 1 is not allowed; each value may appear once",
        ),
        (
            {"name": "ft", "study": {"seeds": []}},
            "<inline>: defenses[0].study.seeds: [] is not allowed; at least one defense seed",
        ),
        (
            {"name": "ft", "study": {"subsets": 0}},
            "<inline>: defenses[0].study.subsets: 0 is not allowed; must be >= 1",
        ),
        (
            {"name": "ft", "study": {"size": 3}},
            "<inline>: defenses[0].study: 'size' is not allowed; valid keys: design, configurations, seeds, "
            "budgets, subsets",
        ),
        (
            {"name": "ft", "space": "none", "study": {"configurations": 4}},
            "<inline>: defenses[0].study.configurations: 4 is not allowed; an empty space has only the "
            "default configuration: 1",
        ),
    ],
)
def test_study_errors_are_one_line(entry, message):
    with pytest.raises(InvalidValue) as err:
        parse_sweep(spec_with(entry))
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_defaults_may_not_hold_trials_and_study():
    with pytest.raises(
        InvalidValue, match=r"^<inline>: defaults: 'study' is not allowed; trials \(a search\) or study"
    ):
        parse_sweep(spec_with("ft", defaults={"trials": 3, "study": {}}))


# --- the designs ----------------------------------------------------------------------------------


def test_sobol_configurations_lie_in_the_space_default_first_and_are_deterministic():
    design = StudyDesign("sobol", 64)
    configs = configurations(SPACE, design, 0, "cell")
    assert configs[0] is None and len(configs) == 64
    for c in configs[1:]:
        for name, dist in SPACE.items():
            value = tuple(c[name]) if isinstance(c[name], list) else c[name]
            assert dist.contains(value), (name, c[name])
    assert configs == configurations(SPACE, design, 0, "cell")
    assert configs != configurations(SPACE, design, 1, "cell")
    assert configs != configurations(SPACE, design, 0, "other cell")
    # every choice and both halves of every range are visited by 63 quasi-random points
    assert {c["mode"] for c in configs[1:]} == {"a", "b", "c"}
    assert {tuple(c["betas"]) for c in configs[1:]} == {(1, 2), (3, 4)}


def test_sobol_honours_log_spacing():
    space = {"lr": FloatDist(1e-4, 1.0, log=True)}
    values = [c["lr"] for c in configurations(space, StudyDesign("sobol", 129), 3, "c")[1:]]
    decades = [math.floor(math.log10(v)) for v in values]
    # on a log scale each of the 4 decades gets about a quarter of the points (linear: 90 % in the last)
    for decade in (-4, -3, -2, -1):
        assert 24 <= decades.count(decade) <= 40, decade


def test_grid_levels_and_product():
    space = {"lr": FloatDist(1e-3, 1e-1, log=True), "mode": ChoiceDist(("a", "b", "c"))}
    assert grid_levels(space, 7) == [3, 2]
    assert grid_levels(space, 9) == [3, 3]
    assert grid_levels(space, 30) == [10, 3]  # a choice never gets more levels than its choices
    configs = configurations(space, StudyDesign("grid", 10), 0, "c")
    assert configs[0] is None and len(configs) == 1 + 9 == configuration_count(space, StudyDesign("grid", 10))
    lrs = sorted({c["lr"] for c in configs[1:]})
    assert lrs == pytest.approx([1e-3 * 100 ** (1 / 6), 1e-2, 1e-3 * 100 ** (5 / 6)])  # cell centres, log
    assert {c["mode"] for c in configs[1:]} == {"a", "b", "c"}
    assert len({tuple(sorted(c.items())) for c in configs[1:]}) == 9


def test_points_cross_configurations_seeds_budgets_subsets():
    design = StudyDesign("sobol", 2, [0, 1], [0.04, 0.01], 5)
    points = study_points({"lr": FloatDist(0.001, 0.1)}, design, 0, "c")
    assert len(points) == 2 * 2 * 2 * 5
    assert [p.configuration for p in points[:20]] == [0] * 20
    assert {(p.seed, p.budget, p.subset) for p in points[:20]} == {
        (s, b, k) for s in (0, 1) for b in (0.04, 0.01) for k in range(5)
    }
    assert all(p.values is None for p in points[:20]) and all(p.values for p in points[20:])


def test_searcher_enqueues_the_points_and_resumes_after_them():
    """The cell's study holds the design's points as trials (params recorded in Optuna), and a new
    searcher on the same study asks only the points left."""
    spec = parse_sweep(
        spec_with(
            {
                "name": "ft",
                "preset": "smoke",
                "study": {"configurations": 3, "seeds": [0, 1], "budgets": [0.04], "subsets": 2},
            }
        )
    )
    cell = spec.defense_cells()[0]
    study = optuna.create_study(directions=["maximize", "minimize"])
    handed = []
    searcher = CellSearcher(spec, [cell], [study], lambda i, p: handed.append(p) or {"n": p.number})
    assert searcher.remaining() == 12
    for k in range(5):
        searcher.suggest(f"t{k}")
        searcher.on_trial_complete(f"t{k}", {"done": 1, "val_acc": 0.5, "val_asr": 0.1})
    points = study_points(cell.defense.space, cell.defense.study, 0, cell.label)
    for p, pending in zip(points, handed, strict=False):
        assert pending.point["configuration"] == p.configuration
        assert pending.point["defense_seed"] == p.seed and pending.point["data_subset"] == p.subset
        assert pending.params["data_fraction"] == 0.04
        assert pending.default == (p.configuration == 0)
    trials = study.get_trials()
    assert trials[0].user_attrs[DEFAULT_ATTR] and POINT_ATTR in trials[0].user_attrs
    # configuration 1's trial records the design's values as its Optuna params
    fifth = trials[4]
    assert points[4].configuration == 1
    assert fifth.params == {k: v for k, v in points[4].values.items()}
    assert '"data_fraction": 0.04' in fifth.user_attrs[PARAMS_ATTR]
    again = CellSearcher(spec, [cell], [study], lambda i, p: handed.append(p) or {})
    assert again.remaining() == 7
    again.suggest("t5")
    assert handed[-1].number == 5 and handed[-1].point["configuration"] == points[5].configuration


# --- the held-out subsets ---------------------------------------------------------------------------


def _pick(tiny_attacked, seed, data_seed=None, fraction=0.05):
    defense = make_defense("ft", {"data_fraction": fraction})
    data = defense_data(defense, tiny_attacked, seed, data_seed)
    return data.images


def test_subsets_differ_repeat_and_search_cells_are_unchanged(tiny_attacked):
    first, second = _pick(tiny_attacked, 0, subset_seed(0, 0)), _pick(tiny_attacked, 0, subset_seed(0, 1))
    assert not torch.equal(first, second)  # two subsets differ
    assert torch.equal(first, _pick(tiny_attacked, 0, subset_seed(0, 0)))
    assert torch.equal(first, _pick(tiny_attacked, 7, subset_seed(0, 0)))  # whatever the defense seed
    # a search trial (no data seed) draws from the defense seed's stream, as before studies existed
    held = tiny_attacked.data
    count = make_defense("ft", {"data_fraction": 0.05}).data_amount(held.train_split_size)
    picker = torch.Generator().manual_seed(derive_seed(3, "defense-data"))
    today = torch.randperm(len(held.heldout_y), generator=picker)[:count].sort().values
    assert torch.equal(_pick(tiny_attacked, 3), held.heldout_x[today])
