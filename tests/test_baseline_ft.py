"""FT (fine-tuning): the protocol's shared loop as a defense, on digits BadNets."""

from __future__ import annotations

import dataclasses

import pytest
import quality as q

from trials.defenses import make_defense
from trials.defenses.finetuning import FinetuneParams

# started at the session's start (tests/conftest.py), trained while the other tests run
QUALITY_RUNS = [("ft_lr5x", 0), ("ft_lr5x", 1)]  # a majority's first two seeds


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


@pytest.mark.quality
def test_ft_at_five_times_the_learning_rate_erases_badnets(quality_runs):
    # three epochs at lr 0.05 on 57 clean images: ASR <= 0.080 on seeds 0-2 native, 0-1 default, at
    # an ACC cost of 0.078-0.183 (the full cpu preset at lr 0.05: ACC 0.939, ASR 0.006), so the bar
    # on the cost is 20 points (tests/quality.py ERASURES), asserted for a majority of seeds
    held, seen = quality_runs.majority("ft_lr5x", q.erases("ft_lr5x"))
    assert held, seen
    findings = quality_runs.metrics("ft_lr5x", 0)["findings"]
    assert findings == {"clean_images": 57, "samples_per_epoch": 2052}  # the data it used
