"""Inception Score as the ADM evaluator computes it.

    IS = mean over splits of exp( mean_i KL(p(y|x_i) || p(y)) ),  p(y) = mean of p(y|x_i) in the split

Splits are consecutive chunks of `split_size` samples in the given order (ADM: 5000; a last,
shorter chunk is its own split, as in ADM), not random ones (torchmetrics shuffles). The softmax
is taken in float64 through log_softmax, so a probability that underflows to 0 contributes 0
(ADM's float32 `p * log p` would give NaN there). For the Inception port, the logits are
`pool_3 @ W` without the bias (1008 classes), as ADM's softmax graph.
"""
from __future__ import annotations

import math

import torch

from ditq.metrics.errors import MetricInputError

DEFAULT_SPLIT_SIZE = 5000


def split_scores(logits: torch.Tensor, split_size: int = DEFAULT_SPLIT_SIZE) -> list[float]:
    """exp(mean KL) of each consecutive split of `logits` [N, K]."""
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise MetricInputError(f"Inception Score takes logits [N, K] with N >= 1, got {tuple(logits.shape)}")
    if split_size < 1:
        raise MetricInputError(f"is_splits_size must be >= 1, got {split_size}")
    log_p = torch.log_softmax(logits.to(torch.float64), dim=1)
    scores = []
    for start in range(0, log_p.shape[0], split_size):
        part = log_p[start:start + split_size]
        p = part.exp()
        log_marginal = torch.log(p.mean(0, keepdim=True))
        kl = (p * (part - log_marginal)).sum(1).mean()
        scores.append(math.exp(float(kl)))
    return scores


def inception_score(logits: torch.Tensor, split_size: int = DEFAULT_SPLIT_SIZE) -> float:
    """The mean over splits (ADM's reported number)."""
    scores = split_scores(logits, split_size)
    return float(sum(scores) / len(scores))
