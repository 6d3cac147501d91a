"""Frechet distance between two Gaussians (FID, sFID, FID-to-FP), in float64.

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

Two ways to get tr((S1 S2)^(1/2)), chosen by `method`:
  "sqrtm"  the ADM evaluator's algorithm (guided-diffusion `FIDStatistics.frechet_distance`,
           itself TTUR's): scipy's `sqrtm` of S1 S2; if that is not finite, add eps*I to both
           covariances and take it again; an imaginary part on the diagonal above 1e-3 is an
           error, a smaller one is dropped. This reproduces ADM's numbers, and is the default.
  "eigh"   the symmetric route: the eigenvalues of S1 S2 equal those of A S2 A with A = S1^(1/2)
           (symmetric PSD), so tr((S1 S2)^(1/2)) = sum sqrt(eigvalsh(A S2 A)), negative
           round-off clipped to 0. Two symmetric eigendecompositions: ~6x faster at 2048-d and
           stable for singular covariances, where sqrtm's answer is dominated by round-off.
           When the sample features are at hand and fewer than the dimension (e.g. a quick
           1k-sample FID in 2048-d), the same number comes from small matrices instead:
           `frechet_distance_from_features` (both sets as features, n1 + n2 <= D) and
           `frechet_distance_to_features` (a Gaussian and a feature set, n < D).
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from ditq.metrics.errors import MetricInputError

METHODS = ("sqrtm", "eigh")
DEFAULT_EPS = 1e-6  # ADM's regulariser, added only when sqrtm(S1 S2) is not finite


def _as_moments(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricInputError(f"{name}: mean of shape {mu.shape} and covariance of shape {sigma.shape} do not fit")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricInputError(f"{name}: statistics contain NaN or inf")
    return mu, sigma


def _sqrtm(m: np.ndarray) -> np.ndarray:
    # scipy >= 1.14 deprecates `disp` (the default then returns only the matrix); the result is
    # the same Schur-based square root ADM's `sqrtm(..., disp=False)` computed.
    out = linalg.sqrtm(m)
    return out[0] if isinstance(out, tuple) else out


def trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = DEFAULT_EPS) -> float:
    """tr((S1 S2)^(1/2)) exactly as the ADM evaluator computes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sqrtm warns on singular input; handled below
        covmean = _sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"Frechet distance: S1 S2 is singular; adding {eps} to the diagonals (as ADM does)",
                          stacklevel=3)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.max(np.abs(covmean.imag))
            raise ValueError(f"Frechet distance: sqrtm has an imaginary component of {largest:.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2 through two symmetric eigendecompositions."""
    a = _psd_sqrt(sigma1)
    m = a @ sigma2 @ a
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = "sqrtm", eps: float = DEFAULT_EPS) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    if method not in METHODS:
        raise MetricInputError(f"unknown Frechet method {method!r}; choose one of {METHODS}")
    mu1, sigma1 = _as_moments(mu1, sigma1, "first statistics")
    mu2, sigma2 = _as_moments(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise MetricInputError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]} "
                               "(statistics from different feature networks or layers?)")
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        tr_covmean = trace_sqrt_product_eigh(sigma1, sigma2)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_from_features(x, y) -> float:
    """The Frechet distance between the Gaussians fitted (ddof=1) to feature sets x [n1, D], y [n2, D],
    without forming D x D matrices.

    With centred A = x - mean(x), B = y - mean(y): S1 = A^T A / (n1-1), S2 = B^T B / (n2-1). The
    non-zero eigenvalues of S1 S2 are those of (A B^T)(A B^T)^T / ((n1-1)(n2-1)), so
    tr((S1 S2)^(1/2)) = ||A B^T||_* / sqrt((n1-1)(n2-1)) (nuclear norm: sum of singular values),
    and tr(S1) = ||A||_F^2 / (n1-1). Exact, in float64, O(n1 n2 D).
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise MetricInputError(f"feature sets must be [n, D] with the same D, got {a.shape} and {b.shape}")
    n1, n2 = a.shape[0], b.shape[0]
    if n1 < 2 or n2 < 2:
        raise MetricInputError(f"a covariance needs at least 2 samples per set, got {n1} and {n2}")
    mu1, mu2 = a.mean(0), b.mean(0)
    ac, bc = a - mu1, b - mu2
    nuclear = np.linalg.svd(ac @ bc.T, compute_uv=False).sum()
    diff = mu1 - mu2
    tr1 = float((ac * ac).sum()) / (n1 - 1)
    tr2 = float((bc * bc).sum()) / (n2 - 1)
    return float(diff.dot(diff) + tr1 + tr2 - 2 * nuclear / np.sqrt((n1 - 1) * (n2 - 1)))


def frechet_distance_to_features(mu1, sigma1, y) -> float:
    """The Frechet distance between N(mu1, sigma1) and the Gaussian fitted (ddof=1) to y [n, D],
    through an n x n matrix: with centred B, S2 = B^T B / (n-1), and the non-zero eigenvalues of
    S1 S2 are those of the symmetric PSD B S1 B^T / (n-1). Exact, float64, O(n D^2)."""
    mu1, sigma1 = _as_moments(mu1, sigma1, "first statistics")
    b = np.asarray(y, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != mu1.shape[0]:
        raise MetricInputError(f"features must be [n, {mu1.shape[0]}], got {b.shape}")
    n = b.shape[0]
    if n < 2:
        raise MetricInputError(f"a covariance needs at least 2 samples, got {n}")
    mu2 = b.mean(0)
    bc = b - mu2
    m = bc @ sigma1 @ bc.T / (n - 1)
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + float((bc * bc).sum()) / (n - 1)
                 - 2 * np.sqrt(np.clip(ev, 0, None)).sum())
