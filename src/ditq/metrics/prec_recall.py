"""Improved Precision and Recall (Kynkaanniemi et al. 2019) as the ADM evaluator computes them.

Each set's manifold is the union of balls around its points, the radius of a point being the
distance to its k-th nearest neighbour in its own set (k=3; the point itself is the 0-th).
  precision = fraction of samples inside the reference manifold
  recall    = fraction of reference points inside the sample manifold
"Inside" is `d <= radius`, comparing squared Euclidean distances from the expansion
|u|^2 - 2 u.v + |v|^2 clipped at 0, in float32 (ADM's fallback path; its first choice is
float16, which only moves points within float16 round-off of a ball's edge). No radius clamping.
Distances are computed in row blocks, so memory stays O(block x N).
"""
from __future__ import annotations

import torch

from ditq.metrics.errors import MetricInputError

DEFAULT_K = 3


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1)


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, v_norms: torch.Tensor | None = None) -> torch.Tensor:
    vn = _sq_norms(v) if v_norms is None else v_norms
    d = _sq_norms(u)[:, None] - 2 * (u @ v.T) + vn[None, :]
    return d.clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = DEFAULT_K, block: int = 2048) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set."""
    x = _as_features(features, "features")
    if x.shape[0] <= k:
        raise MetricInputError(f"k={k} nearest neighbours need more than {k} points, got {x.shape[0]}")
    norms = _sq_norms(x)
    radii = torch.empty(x.shape[0], dtype=torch.float32)
    for start in range(0, x.shape[0], block):
        d = pairwise_sq_distances(x[start:start + block], x, norms)
        radii[start:start + block] = d.kthvalue(k + 1, dim=1).values
    return radii


def inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                    block: int = 2048) -> torch.Tensor:
    """Bool per point: within some centre's ball (squared distance <= squared radius)."""
    centre_norms = _sq_norms(centres)
    out = torch.empty(points.shape[0], dtype=torch.bool)
    for start in range(0, points.shape[0], block):
        d = pairwise_sq_distances(points[start:start + block], centres, centre_norms)
        out[start:start + block] = (d <= radii[None, :]).any(1)
    return out


def _as_features(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[0] == 0:
        raise MetricInputError(f"{name} must be [N, D] with N >= 1, got {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float32)


def precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int = DEFAULT_K,
                     block: int = 2048) -> tuple[float, float]:
    """(precision, recall) of `samples` against `reference`, both [N, D] features."""
    ref = _as_features(reference, "reference features")
    smp = _as_features(samples, "sample features")
    if ref.shape[1] != smp.shape[1]:
        raise MetricInputError(f"feature dimensions differ: reference {ref.shape[1]}, samples {smp.shape[1]}")
    if k < 1:
        raise MetricInputError(f"pr_k must be >= 1, got {k}")
    ref_radii = manifold_radii(ref, k, block)
    smp_radii = manifold_radii(smp, k, block)
    precision = inside_manifold(smp, ref, ref_radii, block).double().mean().item()
    recall = inside_manifold(ref, smp, smp_radii, block).double().mean().item()
    return float(precision), float(recall)
