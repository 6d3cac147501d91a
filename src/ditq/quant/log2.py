"""A log quantizer for values in [0, scale] (attention probabilities: RepQ-ViT's post-softmax grid).

Base 2 (`sqrt2=False`):
    k     = clamp(round(-log2(x / scale)), 0, 2^b - 1)
    x_hat = scale * 2^-k,   and 0 where round(-log2(x / scale)) > 2^b - 1 ("below the last level")
Base sqrt(2) (`sqrt2=True`, RepQ-ViT's `LogSqrt2Quantizer`): the same with k = round(-2 log2(x / scale))
and x_hat = scale * 2^(-k/2), half the log step. RepQ-ViT calibrates with base sqrt(2) and then
"reparameterises" it to base 2 for hardware: 2^(-k/2) = 2^(-ceil(k/2)) * (sqrt(2) if k is odd else 1),
a shift plus a fixed scale of the odd codes, so the values it computes with stay on the sqrt(2) grid.
The levels are scale * {1, ..., 2^-(2^b - 1)} (base 2) plus an exact zero, rounded in the log
domain; RepQ-ViT's code keeps the zero beside the 2^b levels (at b = 8, base 2, the last levels lie
below float32's range anyway). Values <= 0 (and NaN) become 0; values above `scale` saturate at
`scale`. For softmax outputs the scale is fixed to 1 (probabilities never exceed 1; RepQ-ViT picks
it among high percentiles of the calibration probabilities), so no calibration is needed.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Log2Quantizer", "log2_quantize"]


def log2_quantize(x: torch.Tensor, bits: int, scale: float = 1.0, sqrt2: bool = False) -> torch.Tensor:
    """x fake-quantized on the log grid of the module doc (float32 math, x's dtype out)."""
    levels = 2 ** int(bits)
    per_octave = 2.0 if sqrt2 else 1.0
    u = x.to(torch.float32) / scale
    k = torch.log2(u).mul_(-per_octave).round_()  # +inf at 0, NaN below 0
    zero = ~(k < levels)  # beyond the last level, x == 0, x < 0 (NaN)
    out = k.clamp_(0, levels - 1).div_(-per_octave).exp2_().mul_(scale)
    return out.masked_fill_(zero, 0.0).to(x.dtype)


class Log2Quantizer(nn.Module):
    """`log2_quantize` with fixed `bits`, `scale` (1 for softmax probabilities) and base (module doc)."""

    def __init__(self, bits: int, scale: float = 1.0, sqrt2: bool = False):
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
            raise ValueError(f"Log2Quantizer: bits={bits!r} must be an integer in 1..16 (2^bits levels)")
        if not float(scale) > 0:
            raise ValueError(f"Log2Quantizer: scale={scale!r} must be > 0 (the largest level)")
        self.bits, self.scale, self.sqrt2 = bits, float(scale), bool(sqrt2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log2_quantize(x, self.bits, self.scale, self.sqrt2)

    def levels(self) -> torch.Tensor:
        """The nonzero levels, largest first: scale * 2^(-k / (2 if sqrt2 else 1)), k = 0 .. 2^bits - 1 (float64)."""
        k = torch.arange(2 ** self.bits, dtype=torch.float64)
        return self.scale * torch.exp2(-k / (2.0 if self.sqrt2 else 1.0))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale:g}, base={'sqrt2' if self.sqrt2 else '2'}"
