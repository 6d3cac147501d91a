"""Range estimation per row of a 2-D tensor [rows, elements]: minmax, percentile, MSE/Lp clip search.

Every function returns (lo, hi), each of shape [rows]; symmetric ranges return lo = None and
hi = absmax. Granularity is the caller's business: it lays the data out so that one row is one
reduction unit (a tensor, an output channel, a group, a token).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional

import torch

from .affine import fake_quant, scale_from_range
from .formats import Format
from .runtime import scratch

__all__ = ["absmax_rows", "minmax_range", "percentile_range", "mse_search"]

Range = tuple[Optional[torch.Tensor], torch.Tensor]
_CHUNK = 1 << 24  # elements per slice of the search's error accumulation (bounds memory on huge calibration sets)


def absmax_rows(rows: torch.Tensor) -> torch.Tensor:
    """max |x| of every row (NaN propagates). Rows of <= 16 elements (NVFP4 blocks) use a tree of
    elementwise maxima: torch's reductions over such short inner dims are several times slower."""
    n = rows.shape[1]
    if n > 16 or n < 2 or n & (n - 1):
        return torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_()).float()
    a = torch.abs(rows, out=scratch(rows.shape, rows.dtype, rows.device))
    while a.shape[1] > 1:
        half = a.shape[1] // 2
        a = torch.maximum(a[:, :half], a[:, half:])
    return a.reshape(-1).float()


def minmax_range(rows: torch.Tensor, symmetric: bool) -> Range:
    """Row min and max (NaN propagates); symmetric: absmax."""
    if symmetric:
        return None, absmax_rows(rows)
    return rows.amin(dim=1).float(), rows.amax(dim=1).float()


def _kth(rows: torch.Tensor, k: int) -> torch.Tensor:
    return rows.kthvalue(k, dim=1).values.float()


def percentile_range(rows: torch.Tensor, percentile: float, symmetric: bool) -> Range:
    """Nearest-rank percentile: the value of rank ceil(p/100 * n) (1-based) of |x| (symmetric), or
    of x for hi and the mirrored rank n + 1 - that for lo (asymmetric)."""
    n = rows.shape[1]
    k = min(max(math.ceil(Fraction(repr(float(percentile))) * n / 100), 1), n)  # exact decimal: 99.9% of 20000 is 19980
    if symmetric:
        return None, _kth(rows.abs(), k)
    return _kth(rows, n + 1 - k), _kth(rows, k)


def mse_search(
    rows: torch.Tensor,
    fmt: Format,
    lo: Optional[torch.Tensor],
    hi: torch.Tensor,
    points: int,
    min_ratio: float,
    norm: float,
    eps: float,
    includes_zero: bool = False,
) -> Range:
    """Shrink [lo, hi] by ratios linspace(1, min_ratio, points) and keep, per row, the ratio with the
    smallest sum |x - Q(x)|^norm (ties keep the larger ratio, so the result never loses to minmax)."""
    best_err = torch.full_like(hi, math.inf)
    best_lo = None if lo is None else lo.clone()
    best_hi = hi.clone()
    width = max(1, _CHUNK // max(1, rows.shape[0]))
    for r in torch.linspace(1.0, min_ratio, points).tolist():
        c_lo = None if lo is None else lo * r
        c_hi = hi * r
        scale, zp = scale_from_range(fmt, c_lo, c_hi, eps, includes_zero)
        scale = scale.unsqueeze(1)
        zp = None if zp is None else zp.unsqueeze(1)
        err = torch.zeros_like(hi)
        for start in range(0, rows.shape[1], width):
            part = rows[:, start : start + width]
            q = fake_quant(part, fmt, scale, zp).float()
            err += q.sub_(part).abs_().pow_(norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_hi = torch.where(better, c_hi, best_hi)
        if lo is not None:
            best_lo = torch.where(better, c_lo, best_lo)
    return best_lo, best_hi
