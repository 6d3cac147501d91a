"""Which elements share a scale: grouping along the last dim, and applying per-group parameters.

Groups are `g` consecutive elements of the last dim (input channels); when the width K is not a
multiple of g, the last group holds the remaining K % g elements. A group size >= K gives one group
spanning the row (the same as per-channel / per-token).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["num_groups", "grouped_stats", "apply_params"]


def num_groups(width: int, group_size: int) -> int:
    """Number of groups of `group_size` along a last dim of `width` (the last may be shorter)."""
    return math.ceil(width / min(group_size, width))


def _cat(parts: list) -> Optional[torch.Tensor]:
    if parts[0] is None:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def grouped_stats(m: torch.Tensor, group_size: int, fn: Callable) -> tuple:
    """Apply the row reducer `fn` (rows [R, L] -> tuple of [R] tensors or None) to every group of
    `group_size` columns of `m` [N, K]; returns the tuple with each entry reshaped to [N, G]."""
    n, k = m.shape
    g = min(group_size, k)
    full, rest = divmod(k, g)
    pieces = []
    if full:
        main = m[:, : full * g].reshape(n * full, g)
        pieces.append(tuple(None if t is None else t.reshape(n, full) for t in fn(main)))
    if rest:
        pieces.append(tuple(None if t is None else t.reshape(n, 1) for t in fn(m[:, full * g :])))
    return tuple(_cat([p[i] for p in pieces]) for i in range(len(pieces[0])))


def _expand(t: Optional[torch.Tensor], g: int, k: int) -> Optional[torch.Tensor]:
    return None if t is None else t.repeat_interleave(g, dim=-1)[..., :k]


def apply_params(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    group_size: Optional[int],
    fn: Callable,
):
    """fn(x_view, scale, zero_point) with the parameters broadcast against x.

    Parameters whose last dim is 1 (or that carry no group size) broadcast as they are; per-group
    parameters [..., G] are applied to groups of `group_size` along x's last dim. `fn` returns a
    tensor or a tuple of tensors of x_view's shape; they come back in x's shape.
    """
    if group_size is None or scale.ndim == 0 or scale.shape[-1] == 1:
        return fn(x, scale, zero_point)
    k, groups = x.shape[-1], scale.shape[-1]
    g = min(group_size, k)
    if groups != math.ceil(k / g):
        raise ValueError(
            f"parameters hold {groups} groups of {group_size} but the tensor's last dim is {k} "
            f"({math.ceil(k / g)} groups): compute the parameters on a tensor of the same width"
        )
    if k % g == 0:
        xv = x.reshape(*x.shape[:-1], groups, g)
        z = None if zero_point is None else zero_point.unsqueeze(-1)
        out = fn(xv, scale.unsqueeze(-1), z)
        if isinstance(out, tuple):
            return tuple(o.reshape(x.shape) for o in out)
        return out.reshape(x.shape)
    return fn(x, _expand(scale, g, k), _expand(zero_point, g, k))
