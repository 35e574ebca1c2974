"""Contract every registered defense passes on a tiny CPU problem in seconds, and the runner's data
routing: a defense gets exactly the data it declares."""

from __future__ import annotations

import pytest
import torch

from trials.defenses import DATA_KINDS, DEFENSES, DefenseContext, make_defense
from trials.errors import InvalidValue
from trials.presets import available_presets, load_preset
from trials.run import DefenseSpec, defense_data, run_defense


# A defense's `smoke` preset (if any) shortens its schedule to a step or two, on top of `cpu`: the
# contract checks that it runs, keeps its architecture, reports progress and uses its data, not its
# strength (test_defense_quality.py).
def smoke_params(name: str) -> dict:
    params = load_preset(name, "cpu")
    if "smoke" in available_presets(name):
        params.update(load_preset(name, "smoke"))
    return params


@pytest.fixture(params=DEFENSES.names())
def defense_name(request):
    return request.param


def test_every_defense_ships_a_cpu_preset(defense_name):
    assert "cpu" in available_presets(defense_name)
    make_defense(defense_name, load_preset(defense_name, "cpu"))  # every preset value is valid


def test_defense_runs_keeps_architecture_and_reports(defense_name, tiny_attacked):
    records = []
    params = smoke_params(defense_name)
    if DEFENSES.get(defense_name).data_kind in ("unlabeled", "clean_labeled"):
        params["data_count"] = 12
    original = {k: v.clone() for k, v in tiny_attacked.model.state_dict().items()}
    result = run_defense(DefenseSpec(defense_name, params), tiny_attacked, progress=records.append)
    after = result.model.state_dict()
    assert after.keys() == original.keys()
    assert all(after[k].shape == original[k].shape for k in after)
    changed = any(not torch.equal(after[k], original[k]) for k in after)
    assert changed == DEFENSES.get(defense_name).changes_model, "the defense changed nothing"
    assert all(torch.equal(v, original[k]) for k, v in tiny_attacked.model.state_dict().items()), (
        "input model mutated"
    )
    assert records and all(r["phase"] == defense_name for r in records)
    assert any("val_acc" in r and "val_asr" in r for r in records)  # the runner monitors the validation half
    m = result.metrics
    for key in ("acc", "asr", "asr_cond", "ra", "asr_x4", "asr_x5", "asr_x9"):
        assert key in m and key in m["val"] and key in m["before"]
    assert result.spec["defense"]["params"] == {**result.spec["defense"]["params"], **params}
    assert result.spec["data"]["kind"] == DEFENSES.get(defense_name).data_kind


def test_defense_declares_a_known_data_kind(defense_name):
    assert DEFENSES.get(defense_name).data_kind in DATA_KINDS


def test_data_routing_gives_exactly_the_declared_data(defense_name, tiny_attacked):
    defense = make_defense(defense_name, {"data_count": 10} if "data_count" in _fields(defense_name) else {})
    data = defense_data(defense, tiny_attacked, seed=0)
    kind = defense.data_kind
    held = tiny_attacked.data
    assert data.kind == kind and data.image_shape == held.image_shape and data.num_classes == held.num_classes
    if kind == "none":
        assert data.images is None and data.labels is None and len(data) == 0
        return
    if kind in ("unlabeled", "clean_labeled"):
        assert len(data) == 10
        rows = {bytes(x.flatten().tolist()) for x in held.heldout_x}
        assert all(bytes(x.flatten().tolist()) in rows for x in data.images)  # from the held-out part only
        assert (data.labels is None) == (kind == "unlabeled")
    if kind == "poisoned_train":
        images, labels = tiny_attacked.poisoned_train()
        assert torch.equal(data.images, images) and torch.equal(data.labels, labels)
        assert not torch.equal(images, held.train_x)  # the stored poisoned rows, not the clean ones


def _fields(name):
    import dataclasses

    return {f.name for f in dataclasses.fields(DEFENSES.get(name).Params)}


def test_poisoned_training_set_is_rebuilt_from_the_folder(tiny_attacked):
    images, labels = tiny_attacked.poisoned_train()
    import json

    record = json.loads((tiny_attacked.folder / "poison.json").read_text())
    index = torch.tensor(record["index"])
    assert torch.all(labels[index] == 0)  # BadNets target
    corner = images[index][:, :, -3:, -3:]
    assert not torch.equal(corner, tiny_attacked.data.train_x[index][:, :, -3:, -3:])  # the stamped patch
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[index] = False
    assert torch.equal(images[keep], tiny_attacked.data.train_x[keep])


def test_asking_for_more_data_than_held_out_is_an_error(tiny_attacked):
    available = len(tiny_attacked.data.heldout_y)
    defense = make_defense("bcu", {"data_count": available + 1})
    with pytest.raises(InvalidValue, match=f"data_count.*{available + 1}.*at most {available}"):
        defense_data(defense, tiny_attacked, seed=0)


def test_context_report_adds_monitoring_and_keeps_mode():
    model = torch.nn.Linear(2, 2).train()
    seen = []
    ctx = DefenseContext(
        torch.device("cpu"),
        0,
        torch.Generator(),
        progress=seen.append,
        monitor=lambda m: {"val_acc": 0.5, "mode": m.eval().training},
    )
    ctx.report({"step": 1}, model)
    assert seen == [{"phase": "defense", "step": 1, "val_acc": 0.5, "mode": False}]
    assert model.training
