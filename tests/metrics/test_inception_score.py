"""Inception Score on hand-made logits: hand-computed values, ADM's consecutive splits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ditq.metrics import MetricInputError, inception_score
from ditq.metrics.inception_score import split_scores


def test_hand_computed_two_class_example():
    # p1 = (1/4, 3/4), p2 = (3/4, 1/4); marginal (1/2, 1/2)
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]], dtype=torch.float64)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # same for both images
    assert inception_score(logits) == pytest.approx(math.exp(kl), rel=1e-12)


def test_confident_and_balanced_gives_number_of_classes():
    k = 7
    logits = torch.full((4 * k, k), -60.0)
    logits[torch.arange(4 * k), torch.arange(4 * k) % k] = 60.0
    assert inception_score(logits) == pytest.approx(k, rel=1e-9)


def test_identical_predictions_give_one():
    logits = torch.randn(1, 10).repeat(20, 1)
    assert inception_score(logits) == pytest.approx(1.0, abs=1e-12)


def test_splits_are_consecutive_not_shuffled():
    """First split: all class 0 (IS 1); second split: classes 0/1 half each (IS 2)."""
    confident = torch.tensor([[30.0, -30.0], [-30.0, 30.0]])
    first = confident[[0, 0, 0, 0]]
    second = confident[[0, 1, 0, 1]]
    scores = split_scores(torch.cat([first, second]), split_size=4)
    assert scores == pytest.approx([1.0, 2.0], rel=1e-9)
    assert inception_score(torch.cat([first, second]), split_size=4) == pytest.approx(1.5, rel=1e-9)
    # one split of all 8: six confident class-0 and two class-1 predictions
    assert inception_score(torch.cat([first, second]), split_size=8) == pytest.approx(math.exp(_kl_mix()), rel=1e-9)


def _kl_mix() -> float:
    # marginal (3/4, 1/4): KL of a confident class-0 prediction is log(4/3), of class 1 log 4
    return 6 / 8 * math.log(1 / 0.75) + 2 / 8 * math.log(1 / 0.25)


def test_last_partial_split_is_its_own_split():
    logits = torch.randn(11, 5, generator=torch.Generator().manual_seed(0))
    assert len(split_scores(logits, split_size=5)) == 3
    assert split_scores(logits, split_size=5)[-1] == pytest.approx(1.0)  # one sample: KL = 0


def test_matches_adm_numpy_formula_on_random_logits():
    logits = torch.randn(300, 1008, generator=torch.Generator().manual_seed(1)) * 3
    p = torch.softmax(logits.double(), 1).numpy()
    scores = []
    for i in range(0, len(p), 100):  # ADM's loop, float64
        part = p[i:i + 100]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert inception_score(logits, split_size=100) == pytest.approx(float(np.mean(scores)), rel=1e-10)


def test_bad_input():
    with pytest.raises(MetricInputError):
        inception_score(torch.zeros(5))
    with pytest.raises(MetricInputError):
        inception_score(torch.zeros(0, 3))
    with pytest.raises(MetricInputError):
        inception_score(torch.zeros(4, 3), split_size=0)
