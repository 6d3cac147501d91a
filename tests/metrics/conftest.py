"""Shared fixtures of the metrics tests: random-weight networks written to files, fixture paths."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "metrics"


@pytest.fixture(scope="session")
def oracle_meta() -> dict:
    return json.loads((FIXTURES / "oracle_meta.json").read_text())


@pytest.fixture(scope="session")
def inception_fixture() -> dict:
    with np.load(FIXTURES / "inception_parity.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def lpips_fixture() -> dict:
    with np.load(FIXTURES / "lpips_parity.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def random_state() -> dict:
    """Deterministic random weights in pytorch-fid's layout (do not mutate: copy first)."""
    from ditq.metrics.inception import random_inception_state_dict

    return random_inception_state_dict(7)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory, random_state) -> Path:
    """A pytorch-fid-format state dict file with deterministic random weights."""
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(random_state, path)
    return path


@pytest.fixture(scope="session")
def inception_net(inception_weights):
    from ditq.metrics.inception import load_inception

    return load_inception(inception_weights)


@pytest.fixture(scope="session")
def digits():
    from ditq.data.digits import real_digits_uint8

    return real_digits_uint8()


@pytest.fixture(scope="session")
def make_images():
    """make_images(n, size=32, seed=0, channels=3) -> uint8 images with some spatial structure."""
    return smooth_images


def smooth_images(n: int, size: int = 32, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """Small uint8 test images with some spatial structure."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g) * 255
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = x + torch.randn(x.shape, generator=g) * 10
    return x.clamp(0, 255).round().to(torch.uint8)
