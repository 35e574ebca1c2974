"""A defense for the sweep tests, registered by a sweep's `plugins:` list in every Ray worker.

`faulty` is data-free and cheap: `mode: ok` scales the classifier by `scale` (a real, measurable
change), `raise` fails with an exception, `nan` returns non-finite weights. With `fail_once` set
to a file path, the first `ok` trial to run creates that file and fails (a transient failure: its
retry completes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from trials.defenses import DEFENSES, Defense, register_defense
from trials.params import param


@dataclass(frozen=True)
class FaultyParams:
    mode: str = param("ok", "ok, raise or nan", choices=("ok", "raise", "nan"))
    scale: float = param(1.0, "factor on the classifier's weights", low=0.0)
    fail_once: str = param("", "marker file: the first `ok` trial to create it fails")


if "faulty" not in DEFENSES:

    @register_defense("faulty")
    class Faulty(Defense):
        Params = FaultyParams
        data_kind = "none"

        def run(self, model: nn.Module, data, ctx) -> nn.Module:
            ctx.report({"step": 1, "mode": self.params.mode}, model)
            if self.params.mode == "raise":
                raise RuntimeError("faulty defense asked to fail")
            if self.params.mode == "ok" and self.params.fail_once:
                try:
                    os.close(os.open(self.params.fail_once, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    pass
                else:
                    raise RuntimeError("faulty defense fails its first attempt")
            with torch.no_grad():
                if self.params.mode == "nan":
                    model.head.weight.fill_(float("nan"))
                else:
                    model.head.weight.mul_(self.params.scale)
            return model
