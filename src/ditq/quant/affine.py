"""Scale/zero point from a range, and the fake-quantization kernel x -> (Q(x/s + z) - z) * s.

Conventions (all scales and zero points are float32; z is in grid units):
  symmetric            s = max(absmax, eps) / max_value, no z
  asymmetric int       s = max(hi - lo, eps) / (2^b - 1), z = clamp(round(-lo / s), 0, 2^b - 1)   (Q-DiT)
                       x_hat = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s
  asymmetric ufp       s = max(hi - lo, eps) / max_value,  z = Q(clamp(-lo / s, 0, max_value)), a grid
                       value, so x = 0 stays exactly 0;  x_hat = (Q(x / s + z) - z) * s
"""
from __future__ import annotations

from typing import Optional

import torch

from .formats import Format, IntFormat

__all__ = ["scale_from_range", "fake_quant", "local_step"]


def scale_from_range(
    fmt: Format, lo: Optional[torch.Tensor], hi: torch.Tensor, eps: float, includes_zero: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(scale, zero_point) for ranges [lo, hi]; `lo` None means symmetric with `hi` = absmax."""
    if lo is None:
        return hi.to(torch.float32).clamp_min(eps) / fmt.max_value, None
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    if includes_zero:
        lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
    scale = (hi - lo).clamp_min_(eps) / fmt.max_value
    z = (-lo / scale).clamp_(0.0, fmt.max_value)
    if isinstance(fmt, IntFormat):
        zp = z.round_().clamp_(fmt.lo, fmt.hi)  # clamp(round(-lo/s)) == clamp of the rounded value
    else:
        zp = fmt.quantize_(z)
    return scale, zp


def fake_quant(
    x: torch.Tensor,
    fmt: Format,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor] = None,
    return_mask: bool = False,
    out: Optional[torch.Tensor] = None,
):
    """Dequantized x on the grid given by scale/zero point (broadcast against x), in x's dtype.

    With `return_mask`, also the mask of elements that did not saturate (STE support): those within
    half a grid step of the grid's ends. `out` (float32, x's shape) receives the result when given.
    """
    u = torch.div(x.to(torch.float32), scale, out=out)
    mask = None
    if zero_point is None:
        if return_mask:
            mask = (u >= fmt.clip_low) & (u <= fmt.clip_high)
        fmt.quantize_(u)
    elif isinstance(fmt, IntFormat):
        if return_mask:
            mask = (u >= fmt.clip_low - zero_point) & (u <= fmt.clip_high - zero_point)
        u.round_().add_(zero_point).clamp_(fmt.lo, fmt.hi).sub_(zero_point)
    else:
        u.add_(zero_point)
        if return_mask:
            mask = (u >= fmt.clip_low) & (u <= fmt.clip_high)
        fmt.quantize_(u).sub_(zero_point)
    out = u.mul_(scale).to(x.dtype)
    return (out, mask) if return_mask else out


def local_step(x: torch.Tensor, fmt: Format, scale: torch.Tensor, zero_point: Optional[torch.Tensor] = None):
    """Step of the grid around each element of x, in x's units (float32)."""
    u = torch.div(x.to(torch.float32), scale)
    if zero_point is not None and not isinstance(fmt, IntFormat):
        u.add_(zero_point)
    return fmt.step(u).mul_(scale)
