"""Streaming float64 mean/covariance: equal to numpy in one shot, any batching, serialisable."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditq.metrics import FeatureStats, Gaussian, MetricInputError


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 60), dim=st.integers(1, 8), cuts=st.lists(st.integers(1, 59), max_size=5),
       seed=st.integers(0, 10_000))
def test_any_batching_equals_numpy(n, dim, cuts, seed):
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32) * 3 + 1)
    bounds = sorted({0, n, *[c for c in cuts if c < n]})
    s = FeatureStats(dim)
    for a, b in zip(bounds[:-1], bounds[1:]):
        s.update(x[a:b])
    ref = x.double().numpy()
    assert s.n == n
    np.testing.assert_allclose(s.mean.numpy(), ref.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.cov().numpy(), np.atleast_2d(np.cov(ref, rowvar=False)), rtol=1e-10, atol=1e-12)


def test_merge_equals_single_pass():
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    a, b = FeatureStats.of(x[:37]), FeatureStats.of(x[37:])
    whole = FeatureStats.of(x)
    merged = a.merge(b)
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-12, atol=1e-12)


def test_float64_accumulation_survives_a_large_offset():
    """Features with a large common offset and small spread: float32 E[xx^T] - mu mu^T loses the
    variance entirely; the float64 streaming update keeps it."""
    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(4000, 3, generator=g)).float()
    exact = np.cov(x.double().numpy(), rowvar=False)
    s = FeatureStats(3)
    for chunk in x.split(250):
        s.update(chunk)
    np.testing.assert_allclose(s.cov().numpy(), exact, rtol=1e-9, atol=1e-9)
    naive = (x.T @ x) / x.shape[0] - torch.outer(x.mean(0), x.mean(0))  # float32 one-pass formula
    assert float((naive.double() - torch.from_numpy(exact)).abs().max()) > 1.0


def test_serialisation_round_trip():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    s = FeatureStats.of(x)
    back = FeatureStats.from_dict(s.to_dict())
    assert back.n == s.n and torch.equal(back.mean, s.mean) and torch.equal(back.m2, s.m2)
    g = s.gaussian()
    g2 = Gaussian.from_dict(g.to_dict())
    assert g2.n == 50 and np.array_equal(g2.mu, g.mu) and np.array_equal(g2.sigma, g.sigma)
    assert Gaussian.from_dict(Gaussian(g.mu, g.sigma, None).to_dict()).n is None


def test_bad_features_are_refused():
    s = FeatureStats(3)
    with pytest.raises(MetricInputError, match=r"\[N, 3\]"):
        s.update(torch.zeros(4, 2))
    with pytest.raises(MetricInputError, match="NaN"):
        s.update(torch.tensor([[0.0, float("nan"), 1.0]]))
    s.update(torch.zeros(1, 3))
    with pytest.raises(MetricInputError, match="at least 2"):
        s.cov()
    with pytest.raises(MetricInputError, match="dimension"):
        s.merge(FeatureStats(4))
