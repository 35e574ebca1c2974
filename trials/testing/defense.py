"""The contract of a defense: it runs from its presets on a tiny attacked model, keeps the
architecture, leaves its input untouched, reports progress, and gets exactly the data it declares."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from trials.defenses import DATA_KINDS, DEFENSES, PRECISIONS, make_defense
from trials.presets import available_presets, load_preset
from trials.run import DefenseSpec, defense_data, run_defense


def smoke_params(name: str) -> dict[str, Any]:
    """The `cpu` preset with the `smoke` one on top (a step or two of the schedule): the contract
    checks that a defense runs and uses its data, not its strength."""
    params = load_preset(name, "cpu")
    if "smoke" in available_presets(name):
        params.update(load_preset(name, "smoke"))
    return params


class DefenseContract:
    """Give `defense_name`; needs the `tiny_attacked` fixture (trials.testing.fixtures)."""

    @pytest.fixture
    def defense_name(self) -> str:
        raise NotImplementedError("a subclass names the registered defense under test")

    def test_ships_a_cpu_preset(self, defense_name: str) -> None:
        assert "cpu" in available_presets(defense_name)
        make_defense(defense_name, load_preset(defense_name, "cpu"))  # every preset value is valid

    def test_declares_a_known_data_kind(self, defense_name: str) -> None:
        assert DEFENSES.get(defense_name).data_kind in DATA_KINDS

    def test_declares_a_known_precision(self, defense_name: str) -> None:
        assert DEFENSES.get(defense_name).precision in PRECISIONS

    def test_runs_keeps_architecture_and_reports(self, defense_name: str, tiny_attacked: Any) -> None:
        from trials.metrics import DEFENSE_METRICS, metric_keys

        records: list[dict[str, Any]] = []
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
        for key in metric_keys():
            assert key in m and key in m["val"] and key in m["before"]
        for key in DEFENSE_METRICS:  # der: the defended model against the backdoored one, each half
            assert key in m and key in m["val"] and key not in m["before"]
        assert result.spec["defense"]["params"] == {**result.spec["defense"]["params"], **params}
        assert result.spec["data"]["kind"] == DEFENSES.get(defense_name).data_kind
        # the CPU trains and evaluates in float32 whatever the defense declares (CUDA: bf16 autocast
        # for "amp" defenses); the precision used is part of the resolved spec
        assert result.spec["precision"] == {"training": "fp32", "evaluation": "fp32"}

    def test_data_routing_gives_exactly_the_declared_data(self, defense_name: str, tiny_attacked: Any) -> None:
        fields = {f.name for f in dataclasses.fields(DEFENSES.get(defense_name).Params)}
        defense = make_defense(defense_name, {"data_count": 10} if "data_count" in fields else {})
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
