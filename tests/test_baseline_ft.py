"""FT (fine-tuning): the protocol's shared loop as a defense, on digits BadNets."""

from __future__ import annotations

import dataclasses

from trials.defenses import make_defense
from trials.defenses.finetuning import FinetuneParams
from trials.presets import load_preset
from trials.run import DefenseSpec, run_defense


def test_ft_defaults_are_the_dhbe_protocol():
    ft = make_defense("ft", {}).params
    assert dataclasses.asdict(ft) == dataclasses.asdict(FinetuneParams())
    assert (ft.data_fraction, ft.lr, ft.batch_size, ft.epochs, ft.milestones, ft.min_epoch_size) == (
        0.04,
        0.01,
        64,
        20,
        [10, 15],
        2000,
    )


def test_ft_at_five_times_the_learning_rate_erases_badnets(digits_badnets):
    # /work/bd_badnets2 (same recipe), 57 clean images: the full cpu preset at lr 0.05 gives
    # ACC 0.939, ASR 0.006 (84 s); three epochs at lr 0.05 already ACC 0.933, ASR 0.000 (14 s).
    params = {**load_preset("ft", "cpu"), "lr": 0.05, "epochs": 3, "milestones": []}
    m = run_defense(DefenseSpec("ft", params, preset="cpu"), digits_badnets).metrics
    assert m["before"]["asr"] >= 0.95
    assert m["asr"] <= 0.2 and m["val"]["asr"] <= 0.2, m
    assert m["acc"] >= m["before"]["acc"] - 0.1, m
    assert m["findings"] == {"clean_images": 57, "samples_per_epoch": 2052}
