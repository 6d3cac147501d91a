"""Precision/Recall (k-NN manifolds) against a brute-force implementation on small sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from ditq.metrics import MetricInputError, precision_recall
from ditq.metrics.prec_recall import manifold_radii


def brute_force(ref: np.ndarray, smp: np.ndarray, k: int) -> tuple[float, float]:
    """Loops over points with exact float64 distances, no shortcuts."""
    def radii(x):
        d = cdist(x, x)
        return np.array([np.sort(row)[k] for row in d])  # index 0 is the point itself

    r_ref, r_smp = radii(ref), radii(smp)
    prec = np.mean([any(np.linalg.norm(s - ref[j]) <= r_ref[j] for j in range(len(ref))) for s in smp])
    rec = np.mean([any(np.linalg.norm(r - smp[j]) <= r_smp[j] for j in range(len(smp))) for r in ref])
    return float(prec), float(rec)


@settings(max_examples=30, deadline=None)
@given(n_ref=st.integers(5, 40), n_smp=st.integers(5, 40), dim=st.integers(1, 6), k=st.integers(1, 4),
       shift=st.floats(0.0, 3.0), seed=st.integers(0, 10_000))
def test_matches_brute_force(n_ref, n_smp, dim, k, shift, seed):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((n_ref, dim))
    smp = rng.standard_normal((n_smp, dim)) * 1.3 + shift
    expected = brute_force(ref, smp, k)
    got = precision_recall(torch.from_numpy(ref), torch.from_numpy(smp), k=k, block=7)
    assert got == pytest.approx(expected, abs=1e-12)


def test_radii_are_kth_neighbour_squared_distances():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # sorted distances from 3: 0,2,3,3,7 -> k=1: 2, k=2: 3; from 6: 0,3,4,5,6 -> 3, 4
    assert manifold_radii(x, k=1).tolist() == [1.0, 1.0, 4.0, 9.0, 16.0]
    assert manifold_radii(x, k=2).tolist() == [9.0, 4.0, 9.0, 16.0, 49.0]


def test_same_set_and_far_sets():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_mode_collapse_lowers_recall_not_precision():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(400, 2, generator=g)
    collapsed = torch.randn(400, 2, generator=g) * 0.2  # samples only near the centre
    p, r = precision_recall(ref, collapsed)
    assert p > 0.95 and r < 0.5


def test_bad_input():
    with pytest.raises(MetricInputError, match="more than 3"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2))
    with pytest.raises(MetricInputError, match="dimensions differ"):
        precision_recall(torch.zeros(10, 2), torch.zeros(10, 3))
    with pytest.raises(MetricInputError):
        precision_recall(torch.zeros(10), torch.zeros(10, 3))
