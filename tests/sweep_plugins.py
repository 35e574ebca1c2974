"""A defense and a metric for the sweep tests, registered by a sweep's `plugins:` list in every Ray
worker (and in the driver).

`faulty` is data-free and cheap: `mode: ok` scales the classifier by `scale` (a real, measurable
change), `raise` fails with an exception, `nan` returns non-finite weights. With `fail_once` set
to a file path, the first `ok` trial to run creates that file and fails (a transient failure: its
retry completes).

`clean_errors` is a metric added through its one definition (`trials.metrics.register_metric`): the
sweep test finds it in MLflow, the Parquet table and the summary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from trials.defenses import DEFENSES, Defense, register_defense
from trials.metrics import METRICS, Predictions, register_metric
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


if "clean_errors" not in METRICS:

    @register_metric("clean_errors")
    def clean_errors(p: Predictions) -> float:
        """How many clean images the model gets wrong (a count, so it cannot be confused with acc)."""
        return float((p.clean != p.y).sum())
