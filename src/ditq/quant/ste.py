"""Straight-through estimators: rounding with an identity gradient, and a masked pass-through."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["round_ste", "straight_through"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) (ties to even) in the forward pass, identity gradient."""
    return x + (torch.round(x) - x).detach()


class _PassThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_hat, mask):
        ctx.save_for_backward(mask)
        return x_hat

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        if mask is None:
            return grad, None, None
        return grad * mask.to(grad.dtype), None, None


def straight_through(x: torch.Tensor, x_hat: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Value `x_hat`, gradient w.r.t. x equal to the incoming gradient (times `mask` where given)."""
    return _PassThrough.apply(x, x_hat.detach(), mask)
