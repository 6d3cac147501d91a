"""scikit-learn's bundled handwritten digits (1797 images, 8x8, 17 grey levels, 10 classes).

The embedded models train and are scored on these; nothing is downloaded.
Pixel conventions used across ditq:
  - model space: float in [-1, 1]  (digit value v in 0..16 maps to v / 8 - 1);
  - image space: uint8 in [0, 255], NCHW (what samplers return and metrics take).
"""
from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SIZE = 8


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (images float32 [N,1,8,8] in [-1,1], labels int64 [N])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    labels = torch.from_numpy(d.target.astype(np.int64))
    return images, labels


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> uint8 [0, 255] (round to nearest, clamped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> model space float32 [-1, 1]."""
    return x.float() / 127.5 - 1.0


def real_digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """The real digits in image space (uint8 NCHW) with their labels: the FID reference set."""
    images, labels = load_digits_tensors()
    return to_uint8(images), labels


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train/test split of range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]
