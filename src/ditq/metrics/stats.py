"""Streaming mean and covariance of feature vectors, accumulated in float64.

`FeatureStats.update(batch)` folds a batch in with Chan et al.'s pairwise update: the batch's
own mean and centred scatter are computed in float64 and merged, so neither the float32
features nor a large running count cause the cancellation that `E[xx^T] - mu mu^T` suffers.
The covariance is unbiased (ddof=1), as `np.cov` in the ADM evaluator and clean-fid.

`Gaussian` is the finished product (mu, sigma, n) that Frechet distances take; it also holds
statistics read from a file (an ADM reference batch), where the count may be unknown.
Both serialise to plain dicts of tensors for `DiskCache`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ditq.metrics.errors import MetricInputError
from ditq.metrics.frechet import frechet_distance


@dataclass(frozen=True)
class Gaussian:
    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    n: int | None = None  # samples behind the estimate, None when read from a file that does not say

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def frechet_distance(self, other: Gaussian, **kwargs) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, **kwargs)

    def to_dict(self) -> dict:
        return {"mu": torch.from_numpy(np.ascontiguousarray(self.mu)),
                "sigma": torch.from_numpy(np.ascontiguousarray(self.sigma)),
                "n": -1 if self.n is None else int(self.n)}

    @classmethod
    def from_dict(cls, d: dict) -> Gaussian:
        n = int(d["n"])
        return cls(np.asarray(d["mu"].numpy(), dtype=np.float64), np.asarray(d["sigma"].numpy(), dtype=np.float64),
                   None if n < 0 else n)


class FeatureStats:
    """Running count, mean and centred scatter matrix of D-dimensional features (float64)."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.n = 0
        self.mean = torch.zeros(self.dim, dtype=torch.float64)
        self.m2 = torch.zeros(self.dim, self.dim, dtype=torch.float64)  # sum of (x - mean)(x - mean)^T

    def update(self, features: torch.Tensor) -> FeatureStats:
        x = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise MetricInputError(f"features must be [N, {self.dim}], got {tuple(x.shape)}")
        nb = x.shape[0]
        if nb == 0:
            return self
        if not torch.isfinite(x).all():
            raise MetricInputError("features contain NaN or inf (broken feature network or weights?)")
        mean_b = x.mean(0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        n = self.n + nb
        delta = mean_b - self.mean
        self.m2 += m2_b + torch.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise MetricInputError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        if other.n == 0:
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        self.m2 += other.m2 + torch.outer(delta, delta) * (self.n * other.n / n)
        self.mean += delta * (other.n / n)
        self.n = n
        return self

    def cov(self) -> torch.Tensor:
        if self.n < 2:
            raise MetricInputError(f"a covariance needs at least 2 samples, got {self.n}")
        return self.m2 / (self.n - 1)

    def gaussian(self) -> Gaussian:
        return Gaussian(self.mean.numpy().copy(), self.cov().numpy().copy(), self.n)

    def to_dict(self) -> dict:
        return {"dim": self.dim, "n": self.n, "mean": self.mean.clone(), "m2": self.m2.clone()}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureStats:
        s = cls(int(d["dim"]))
        s.n = int(d["n"])
        s.mean = d["mean"].to(torch.float64).clone()
        s.m2 = d["m2"].to(torch.float64).clone()
        return s

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStats:
        return cls(features.shape[1]).update(features)
