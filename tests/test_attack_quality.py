"""Real backdoors on the bundled digits with mini_resnet and the CPU recipe (tests/quality.py holds
the cases and the script that measures their spread over seeds and CPU capabilities)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.quality

# Attacks that implant on digits with their defaults (README, "Attacks on digits"), and the lowest
# ASR they may show. sig and label_consistent do not implant on these easy images (ASR 0.00 / 0.00,
# reasons in the README); WaNet's default sub-pixel warp does not either (below: a visible one).
# Measured on seeds 0 and 1, native (AVX2) and ATEN_CPU_CAPABILITY=default: blended 1.000 on all
# four, trojannn 0.864-0.944: one seed runs, with the bound under the lowest.
MIN_ASR = {"blended": 0.8, "trojannn": 0.8}

# started at the session's start (tests/conftest.py), trained while the other tests run
QUALITY_RUNS = [("trojannn", 0), ("blended", 0), ("wanet_s4_no_noise", 0)]


def test_clean_model_accuracy(digits_badnets):
    clean = digits_badnets.metrics["clean_reference"]
    assert clean["acc"] >= 0.95
    assert clean["asr"] <= 0.05  # the trigger alone does not fool a clean model


def test_badnets_implants_with_little_accuracy_cost(digits_badnets):
    m = digits_badnets.metrics
    assert m["asr"] >= 0.95 and m["val"]["asr"] >= 0.95
    assert m["acc"] >= m["clean_reference"]["acc"] - 0.02
    assert m["asr_x9"] >= 0.95


@pytest.mark.parametrize("case", sorted(MIN_ASR))
def test_every_attack_implants_with_defaults(case, quality_runs):
    m = quality_runs.metrics(case)
    assert m["asr"] >= MIN_ASR[case], m
    assert m["acc"] >= 0.9, m


def test_wanet_implants_a_visible_warp(quality_runs):
    # s = 4 moves pixels by about 2 px, visible at digits' resolution (the default 0.5 is a quarter
    # of a pixel). Without noise mode, it implants on every seed and CPU measured (ASR 0.944-1.000,
    # seeds 0 / 1, native and default). With noise mode (the default), the 30-epoch digits recipe is
    # bimodal: the warp is learned or not (ASR 0.160, 0.241 native; 0.864, 0.272 default), so that
    # case is reported (README), not asserted. That the warp is stamped after the random crop (the
    # official code warps first: docs/attacks/wanet.md), is tested on the batch hook (tests/test_attacks_extra.py): without noise
    # mode, a warp stamped before the crop implants as well (ASR 0.994), so this test cannot tell.
    m = quality_runs.metrics("wanet_s4_no_noise")
    assert m["asr"] >= 0.7, m
    assert m["acc"] >= 0.9, m
