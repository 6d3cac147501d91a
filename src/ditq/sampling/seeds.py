"""Per-seed randomness: initial noise, class labels and step noise come from each sample's own
generator, so that sample i is the same whatever the batch size or the other seeds."""
from __future__ import annotations

import numpy as np
import torch

_LABEL_STREAM = 0x1ABE1  # separates the label stream from the noise stream of the same seed
_STEP_STREAM = 0x57E9


def noise_for_seeds(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise [N, *shape], row i drawn from torch.Generator seeded with seeds[i]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def labels_for_seeds(seeds: list[int], num_classes: int, mode: str) -> torch.Tensor:
    """Class labels: `balanced` cycles through the classes by seed (seed % num_classes);
    `random` draws each label from its seed's own stream."""
    if mode == "balanced":
        return torch.tensor([int(s) % num_classes for s in seeds], dtype=torch.long)
    if mode == "random":
        return torch.tensor(
            [int(np.random.default_rng([int(s), _LABEL_STREAM]).integers(num_classes)) for s in seeds],
            dtype=torch.long,
        )
    raise ValueError(f"label mode {mode!r} is not valid; choose one of: balanced, random")


def step_generators(seeds: list[int]) -> list[torch.Generator]:
    """One generator per sample for stochastic samplers (DDPM, DDIM with eta > 0)."""
    return [torch.Generator().manual_seed(int(np.random.default_rng([int(s), _STEP_STREAM]).integers(2**62))) for s in seeds]
