"""No defense: the backdoored model as it is.

The reference row of a sweep (what every defense is compared with, measured by the same trial code
on the same halves), and the one registered defense that declares `changes_model = False` (the
defense contract checks that every other one changes the weights). See docs/defenses/identity.md.
"""

from __future__ import annotations

import torch.nn as nn

from trials.defenses.base import Defense, DefenseContext, DefenseData
from trials.defenses.registry import register_defense
from trials.params import NoParams


@register_defense("identity")
class Identity(Defense):
    Params = NoParams
    data_kind = "none"
    precision = "fp32"  # nothing is trained
    changes_model = False

    def run(self, model: nn.Module, data: DefenseData, ctx: DefenseContext) -> nn.Module:
        ctx.report({"step": 1}, model)
        return model
