"""LoRA's lean layer: the same math as `methods.lora.LoraLayer`, with a dropout that keeps only its mask for
backward and outputs marked for recomputation. `lean.make_lean` swaps it in by class, as it does the others.

A training LoRA layer with dropout computes scaling * B A dropout(x). Plain autograd keeps x's dropped-out
copy (full size) for A's gradient; `DroppedLowRank` keeps x (usually alive anyway; q and v share it) and the
mask, and drops x again in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.accel.lean import keep_mask, masked_scale, recomputable_sum
from peftlab.accel.recompute import is_recomputable, recomputable
from peftlab.methods.lora import LoraLayer


def _dropped_down(x: torch.Tensor, keep: torch.Tensor, weight_A: torch.Tensor, p: float) -> torch.Tensor:
    return masked_scale(x, keep, 1 / (1 - p)) @ weight_A.T


def dropped_low_rank(x, keep, weight_A, weight_B, p: float, scaling: float) -> torch.Tensor:
    """scaling * B A dropout(x) for a given keep mask, as `DroppedLowRank` computes it (bit for bit)."""
    return _dropped_down(x, keep, weight_A, p) @ weight_B.T * scaling


def low_rank(x, weight_A, weight_B, scaling: float) -> torch.Tensor:
    """scaling * B A x, as `lora_B(lora_A(x)) * scaling` computes it."""
    return F.linear(F.linear(x, weight_A), weight_B) * scaling


class DroppedLowRank(torch.autograd.Function):
    """scaling * B A dropout(x) for a keep mask (`lean.keep_mask`), saving x and the mask rather than the
    dropped-out copy of x."""

    @staticmethod
    def forward(ctx, x, keep, weight_A, weight_B, p: float, scaling: float):
        down = _dropped_down(x, keep, weight_A, p)
        ctx.save_for_backward(x, keep, weight_A, weight_B, down)
        ctx.p, ctx.scaling = p, scaling
        return down @ weight_B.T * scaling

    @staticmethod
    def backward(ctx, grad):
        x, keep, weight_A, weight_B, down = ctx.saved_tensors
        grad = grad * ctx.scaling
        grad_down = grad @ weight_B
        grad_B = grad.reshape(-1, grad.shape[-1]).T @ down.reshape(-1, down.shape[-1])
        dropped = masked_scale(x, keep, 1 / (1 - ctx.p))  # regenerated for this step only
        grad_A = grad_down.reshape(-1, grad_down.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])
        grad_x = masked_scale(grad_down @ weight_A, keep, 1 / (1 - ctx.p)) if ctx.needs_input_grad[0] else None
        return grad_x, None, grad_A, grad_B, None, None


class LeanLoraLayer(LoraLayer):
    """`LoraLayer` whose training dropout keeps only its mask, and whose outputs are marked `recomputable` where
    its input is (what a recomputed q or v is rebuilt from, `run.recompute_linear`)."""

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        dropout = self.lora_dropout[name]
        A, B, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        x = x.to(A.dtype)
        marked = torch.is_grad_enabled() and is_recomputable(x)
        if isinstance(dropout, nn.Dropout) and dropout.training and torch.is_grad_enabled():
            keep = keep_mask(x.shape, dropout.p, x.device)
            delta = DroppedLowRank.apply(x, keep, A, B, dropout.p, scaling)
            return recomputable(delta, dropped_low_rank, (x, keep, A, B), dropout.p, scaling) if marked else delta
        delta = low_rank(dropout(x), A, B, scaling)  # dropout: a no-op where `marked`
        return recomputable(delta, low_rank, (x, A, B), scaling) if marked else delta

    add = staticmethod(recomputable_sum)
