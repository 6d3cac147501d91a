"""Frechet distance against a scipy sqrtm reference and closed forms, well and badly conditioned."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from ditq.metrics import MetricInputError, frechet_distance
from ditq.metrics.frechet import frechet_distance_from_features, frechet_distance_to_features


def scipy_reference(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's sqrtm, written independently of ditq."""
    root = scipy.linalg.sqrtm(s1 @ s2)
    root = root[0] if isinstance(root, tuple) else root
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def random_stats(rng, dim, n):
    x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * 0.5 + rng.standard_normal(dim)
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("dim", [2, 16, 64, 200])
@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_matches_scipy_reference_on_random_statistics(dim, method):
    rng = np.random.default_rng(dim)
    mu1, s1 = random_stats(rng, dim, 5 * dim + 10)
    mu2, s2 = random_stats(rng, dim, 5 * dim + 10)
    expected = scipy_reference(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2, method=method)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def commuting_pair(rng, a, b):
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: then tr sqrt(S1 S2) = sum sqrt(a b) exactly."""
    q, _ = np.linalg.qr(rng.standard_normal((len(a), len(a))))
    return (q * a) @ q.T, (q * b) @ q.T


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_nearly_singular_covariances_against_closed_form(method):
    rng = np.random.default_rng(0)
    dim = 48
    a = np.concatenate([rng.uniform(0.5, 2.0, 40), np.full(8, 1e-13)])  # 8 directions nearly singular
    b = np.concatenate([rng.uniform(0.5, 2.0, 36), np.full(12, 1e-14)])
    s1, s2 = commuting_pair(rng, a, b)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    exact = float(np.sum((mu1 - mu2) ** 2) + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = frechet_distance(mu1, s1, mu2, s2, method=method)
        ref = scipy_reference(mu1, s1, mu2, s2)
    assert got == pytest.approx(exact, abs=1e-5)
    assert got == pytest.approx(ref, abs=1e-5)


def test_rank_deficient_sample_covariances_methods_agree():
    """Fewer samples than dimensions (the small-sample FID case): both methods, same answer."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 80))
    y = rng.standard_normal((25, 80)) + 0.3
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = frechet_distance(*args, method="sqrtm")
        ref = scipy_reference(*args)
    b = frechet_distance(*args, method="eigh")
    assert a == pytest.approx(ref, rel=1e-6)
    assert b == pytest.approx(ref, rel=1e-6)


def test_zero_covariance():
    """A zero covariance: d = |mu1 - mu2|^2 + tr(S2)."""
    s2 = np.diag([1.0, 2.0, 3.0])
    for method in ("sqrtm", "eigh"):
        assert frechet_distance(np.zeros(3), np.zeros((3, 3)), np.ones(3), s2, method=method) == pytest.approx(9.0)


def test_non_finite_sqrtm_triggers_adm_eps_fallback():
    """sqrtm of a nilpotent product is infinite; ADM then adds eps*I to both matrices and retries.
    (S2 here is not a covariance: it only exercises the fallback path.)"""
    s1, s2 = np.eye(2), np.array([[0.0, 1.0], [0.0, 0.0]])
    eps = 1e-6
    with pytest.warns(UserWarning, match="adding 1e-06"):
        got = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, method="sqrtm", eps=eps)
    # sqrt((1+eps) [[eps, 1], [0, eps]]) has trace 2 sqrt((1+eps) eps)
    assert got == pytest.approx(2.0 - 2 * 2 * np.sqrt((1 + eps) * eps), rel=1e-9)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(2)
    mu, s = random_stats(rng, 32, 200)
    for method in ("sqrtm", "eigh"):
        assert abs(frechet_distance(mu, s, mu, s, method=method)) < 1e-8


def test_mean_shift_only():
    s = np.eye(5)
    assert frechet_distance(np.zeros(5), s, np.full(5, 2.0), s) == pytest.approx(20.0, abs=1e-10)


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_symmetric_and_non_negative(dim, seed):
    rng = np.random.default_rng(seed)
    mu1, s1 = random_stats(rng, dim, 3 * dim + 5)
    mu2, s2 = random_stats(rng, dim, 3 * dim + 5)
    d12 = frechet_distance(mu1, s1, mu2, s2, method="eigh")
    d21 = frechet_distance(mu2, s2, mu1, s1, method="eigh")
    assert d12 == pytest.approx(d21, rel=1e-7, abs=1e-9)
    assert d12 >= -1e-9


def test_bad_input_is_reported():
    with pytest.raises(MetricInputError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(MetricInputError, match="do not fit"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(MetricInputError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(MetricInputError, match="unknown Frechet method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


@pytest.mark.parametrize("n1, n2, dim", [(12, 10, 64), (30, 40, 20), (5, 3, 300)])
def test_low_rank_route_from_features_is_exact(n1, n2, dim):
    """Cross-Gram nuclear norm = tr sqrt(S1 S2), whether or not n < D."""
    rng = np.random.default_rng(n1 * n2)
    x = rng.standard_normal((n1, dim)) + 0.5
    y = rng.standard_normal((n2, dim)) * 1.5
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = scipy_reference(*args)
    got = frechet_distance_from_features(x, y)
    # the D x D routes take square roots of round-off-level eigenvalues in the D - n null
    # directions (sqrt(1e-14) each): ~1e-8 relative; the low-rank route avoids them
    rel = 1e-7 if n1 + n2 < dim else 1e-11
    assert got == pytest.approx(frechet_distance(*args, method="eigh"), rel=rel)
    assert got == pytest.approx(ref, rel=1e-6)
    with pytest.raises(MetricInputError, match="at least 2"):
        frechet_distance_from_features(x[:1], y)


@pytest.mark.parametrize("n, dim", [(6, 50), (40, 30)])
def test_gaussian_to_features_route_is_exact(n, dim):
    rng = np.random.default_rng(n + dim)
    mu1, s1 = random_stats(rng, dim, 3 * dim)
    y = rng.standard_normal((n, dim)) * 0.7 + 0.2
    expected = frechet_distance(mu1, s1, y.mean(0), np.cov(y, rowvar=False), method="eigh")
    assert frechet_distance_to_features(mu1, s1, y) == pytest.approx(expected, rel=1e-7)
    with pytest.raises(MetricInputError, match="features must be"):
        frechet_distance_to_features(mu1, s1, y[:, :3])
