"""Deterministic random weights keyed by parameter name and seed.

The same (name, seed, shape) gives the same tensor in any process and any environment with the
same torch version, whatever order the parameters are visited in: each tensor draws from its own
CPU generator, seeded by a hash of "seed:name". Tests and benchmarks use this to build the same
"random" feature networks here and in an isolated environment that has the reference
implementations (pytorch-fid, torch-fidelity, lpips), whose real weights cannot be downloaded.
"""
from __future__ import annotations

import hashlib
import math

import torch


def generator_for(name: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def randn(name: str, seed: int, shape, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator_for(name, seed), dtype=torch.float32) * std + mean


def uniform(name: str, seed: int, shape, low: float, high: float) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator_for(name, seed), dtype=torch.float32) * (high - low) + low


def he_normal(name: str, seed: int, shape) -> torch.Tensor:
    """Kaiming-normal for a conv / linear weight [out, in, ...]: keeps ReLU activations O(1) in depth."""
    fan_in = math.prod(shape[1:])
    return randn(name, seed, shape, std=math.sqrt(2.0 / fan_in))


def state_dict_checksum(state: dict) -> float:
    """A float64 fingerprint of a state dict (sum of |w| * position weights), to check two environments
    built the same tensors before comparing outputs."""
    total = 0.0
    for i, key in enumerate(sorted(state)):
        t = state[key].detach().to(torch.float64).reshape(-1)
        if t.numel() == 0:
            continue
        ramp = torch.linspace(1.0, 2.0, t.numel(), dtype=torch.float64)
        total += (i + 1) * float((t.abs() * ramp).sum())
    return total
