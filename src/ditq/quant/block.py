"""Scale rules of the block formats: MX (E8M0 per 32) and NVFP4 (E4M3 per 16 + fp32 tensor scale).

MX (OCP Microscaling spec v1.0, section 6.3): for a block with absmax A, the shared scale is
X = 2^(floor(log2 A) - emax_elem), emax_elem = exponent of the element's largest normal
(E4M3: 8, E5M2: 15, E2M3: 2, E3M2: 4, E2M1: 2, INT8: 0), clamped below at E8M0's 2^-127
(a zero block gets 2^-127). A block holding NaN or Inf gets an Inf scale and dequantizes to all
NaN, as the spec's NaN scale does. Elements are V / X rounded to the element grid, ties to even,
saturating at its max (so a block whose A/X exceeds the element max clamps, e.g. 7.5 -> 6 in MXFP4).

NVFP4 (NVIDIA's recipe, as in ModelOpt / torchao): tensor scale s_t = amax_tensor / (6 * 448)
(1 if the tensor is all zero); block scale s_b = E4M3((amax_block / 6) / s_t), the quotient first
clamped to [2^-9, 448] (E4M3's smallest subnormal and largest value); elements are
E2M1(x / (s_b * s_t)) and dequantize as q * (s_b * s_t).
"""
from __future__ import annotations

import torch

from .formats import Format, get_format

__all__ = ["mx_block_scale", "nvfp4_tensor_scale", "nvfp4_block_scale", "E8M0_MIN"]

E8M0_MIN = 2.0**-127
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9


def mx_block_scale(amax: torch.Tensor, element: Format) -> torch.Tensor:
    """E8M0 shared scale 2^(floor(log2 amax) - element.emax) per block, as float32 (exact)."""
    a = amax.to(torch.float32)
    pow2 = torch.bitwise_and(a.view(torch.int32), 0x7F800000).view(torch.float32)  # 2^floor(log2 a); 0 if a < 2^-126
    # finite amax never exceeds E8M0's 2^127; NaN/Inf amax gives an Inf scale, so the block dequantizes to NaN
    return pow2.mul_(2.0 ** -element.emax).clamp_min_(E8M0_MIN)


def nvfp4_tensor_scale(amax_tensor: torch.Tensor) -> torch.Tensor:
    """Second-level fp32 scale amax / (6 * 448); 1 where amax is 0."""
    a = amax_tensor.to(torch.float32)
    return torch.where(a > 0, a / (E2M1_MAX * E4M3_MAX), torch.ones_like(a))


def nvfp4_block_scale(amax_block: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """Per-block E4M3 scale (as float32 values on the E4M3 grid) for blocks with absmax `amax_block`."""
    s = (amax_block.to(torch.float32) / E2M1_MAX) / tensor_scale
    s.clamp_(E4M3_MIN_SUBNORMAL, E4M3_MAX)
    return get_format("ocp_e4m3").quantize_(s)
