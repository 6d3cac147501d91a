"""The value grids of 4-bit formats (FP4DiT Fig. 1) and their quantization error on model-like data.

Grids come from `ditq.quant.get_format(name).grid()` (the element grid of a block format: nvfp4 and
mxfp4 both hold E2M1 elements). Errors come from ditq's own `Quantizer` with the MSE range rule (a
search over `points` clip ratios of the max in [min_ratio, 1]), per tensor; block formats use their
own per-block scales (no search)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

FOUR_BIT = ("int4", "fp4_e1m2", "fp4_e2m1", "fp4_e3m0", "ufp4_e2m2", "nvfp4", "mxfp4")
DISTRIBUTIONS = ("gaussian", "laplace", "gelu")


def format_grid_table(names: Sequence[str] = FOUR_BIT, normalize: bool = True) -> list[dict[str, Any]]:
    """One entry per format: name, kind (int/fp/block element), values (sorted; divided by the
    grid's largest |value| when `normalize`, as FP4DiT's Fig. 1 compares shapes), n (distinct
    values), max (unnormalised largest value), signed, and the share of values within 1/4 of the max."""
    from ditq.quant import get_format, parse_format

    out = []
    for name in names:
        spec = parse_format(name)  # a FormatError names the unknown format and the valid ones
        fmt = get_format(spec)
        vals = fmt.grid().double().numpy()
        top = float(np.abs(vals).max())
        scaled = vals / top if normalize else vals
        kind = f"block element ({spec.element})" if spec.is_block else spec.family
        out.append({"name": name, "kind": kind, "values": scaled.tolist(), "n": int(len(vals)), "max": top,
                    "signed": bool(vals.min() < 0),
                    "near_zero_share": float(np.mean(np.abs(vals) <= top / 4))})
    return out


def sample(distribution: str, n: int, seed: int = 0, cols: int = 64) -> torch.Tensor:
    """[n // cols, cols] float32 samples, unit variance before any transform: gaussian, laplace
    (heavy tails, like weights), or gelu (GELU of a gaussian: the asymmetric post-GELU input of fc2)."""
    if n < cols or n % cols:
        raise ValueError(f"n={n} must be a positive multiple of cols={cols} (the block formats need whole rows)")
    g = torch.Generator().manual_seed(seed)
    if distribution == "gaussian":
        x = torch.randn(n, generator=g, dtype=torch.float64)
    elif distribution == "laplace":
        u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2.0)  # Laplace(0, 1/sqrt 2): variance 1
    elif distribution == "gelu":
        x = torch.nn.functional.gelu(torch.randn(n, generator=g, dtype=torch.float64))
    else:
        raise ValueError(f"distribution={distribution!r}; choose one of {DISTRIBUTIONS}")
    return x.float().reshape(-1, cols)


def quantizer_for(name: str, points: int = 100, min_ratio: float = 0.05):
    """ditq's per-tensor weight quantizer of format `name` with the MSE range rule (block formats:
    their own per-block scales, as `config.schema.format_implied` dictates)."""
    from ditq.config.schema import format_implied
    from ditq.quant import QuantizerConfig, build_quantizer, parse_format

    settings = {"granularity": "per_tensor", "range": "mse", "clip_search_points": int(points),
                "clip_min_ratio": float(min_ratio), "symmetric": parse_format(name).signed}
    settings.update(format_implied(name, "weight"))
    return build_quantizer(QuantizerConfig(format=name, **settings), "weight")


def quant_error(name: str, x: torch.Tensor, points: int = 100, min_ratio: float = 0.05) -> dict[str, float]:
    """MSE and SQNR (dB) of `x` quantized with `quantizer_for(name)` fitted on `x` itself."""
    q = quantizer_for(name, points, min_ratio)
    q.fit(x)
    with torch.no_grad():
        err = (q(x).double() - x.double()).pow(2).mean().item()
    power = x.double().pow(2).mean().item()
    return {"mse": err, "sqnr_db": 10 * math.log10(power / err) if err > 0 else float("inf")}


def format_mse_table(names: Sequence[str] = FOUR_BIT, distributions: Sequence[str] = DISTRIBUTIONS,
                     n: int = 65536, seed: int = 0, points: int = 100) -> list[dict[str, Any]]:
    """One row per (format, distribution): format, distribution, mse, sqnr_db (same samples for every format)."""
    data = {d: sample(d, n, seed) for d in distributions}
    return [{"format": f, "distribution": d, **quant_error(f, data[d], points)} for f in names for d in distributions]
