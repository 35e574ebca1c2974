"""CLP: Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022), data-free (docs/defenses/clp.md).

For each (conv, BN) pair the model declares (never guessed from module order: PreAct-ResNet breaks
the "conv followed by its BN" guess of the official code; docs/defenses/clp.md, "Differences from
the official code"), the upper bound of each output channel's Lipschitz constant is

    UCLC_c = ||W_c||_2 * |gamma_c| / sqrt(var_c)

with W_c the kernel of channel c reshaped to C_in x k^2 and ||.||_2 its largest singular value (the
code's proxy for the channel's operator norm). Channels with UCLC_c > mean + u * std (per layer,
unbiased std) are pruned by zeroing gamma_c and beta_c: the channel's BN output becomes 0. No
fine-tuning follows. For PreAct models only the (conv1, bn2) pairs of each block exist, so convs
whose output goes straight into a residual sum are not pruned (documented in the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from trials.defenses.base import Defense, DefenseContext, DefenseData
from trials.defenses.registry import register_defense
from trials.params import param


@dataclass(frozen=True)
class CLPParams:
    u: float = param(3.0, "threshold: prune channels above mean + u * std of their layer", low=0.0)
    bn_eps: bool = param(False, "use sqrt(var + eps) as the BN forward does (code: sqrt(var), no eps)")


def channel_lipschitz_upper_bounds(conv: nn.Conv2d, bn: nn.BatchNorm2d, bn_eps: bool = False) -> torch.Tensor:
    """UCLC of every output channel of `conv` followed by `bn` (batched spectral norms)."""
    kernels = conv.weight.detach().flatten(2).float()  # C_out x C_in x k^2
    spectral = torch.linalg.matrix_norm(kernels, ord=2)
    var = bn.running_var.detach().float() + (bn.eps if bn_eps else 0.0)
    return spectral * bn.weight.detach().float().abs() / var.sqrt()


def outlier_channels(uclc: torch.Tensor, u: float) -> torch.Tensor:
    """Boolean mask of the channels above mean + u * std of the layer."""
    return uclc > uclc.mean() + u * uclc.std()


@register_defense("clp")
class CLP(Defense):
    Params = CLPParams
    data_kind = "none"
    precision = "fp32"  # no forward pass in training: the weights alone decide

    @torch.no_grad()
    def run(self, model: nn.Module, data: DefenseData, ctx: DefenseContext) -> nn.Module:
        pruned_total, channels_total = 0, 0
        for index, (conv, bn) in enumerate(model.conv_bn_pairs()):
            prune = outlier_channels(
                channel_lipschitz_upper_bounds(conv, bn, self.params.bn_eps), self.params.u
            )
            bn.weight[prune] = 0
            bn.bias[prune] = 0
            pruned_total += int(prune.sum())
            channels_total += len(prune)
            if prune.any():
                ctx.report({"layer": index, "pruned": int(prune.sum()), "channels": len(prune)})
        ctx.report({"step": "done", "pruned": pruned_total, "channels": channels_total}, model)
        return model
