"""The digits classifier: the embedded stand-in for Inception.

A small CNN trained in this repo (`python -m ditq.train.digits_classifier`) on scikit-learn's
digits; its 64-d penultimate features play the role of Inception's pool_3 for FID, its
logits give classification accuracy of class-conditional samples (and IS).
Input: float images in [-1, 1], shape [N, 1, 8, 8].
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditq.paths import ASSETS_DIR

DEFAULT_WEIGHTS = ASSETS_DIR / "digits_classifier.pt"
FEATURE_DIM = 64
SPATIAL_CHANNELS = 7  # as ADM's sFID keeps 7 channels of Inception's mixed_6/conv


class DigitsClassifier(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """64-d features (the FID space)."""
        return self.features_and_spatial(x)[0]

    def features_and_spatial(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(64-d features, spatial features): the spatial ones are the first 7 channels of the second
        conv's 8x8 map (448-d), the embedded analogue of sFID's Inception mixed_6/conv[..., :7]."""
        h = F.gelu(self.conv1(x))
        mid = F.gelu(self.conv2(h))
        h = F.gelu(self.conv3(F.max_pool2d(mid, 2)))
        return F.gelu(self.fc(h.flatten(1))), mid[:, :SPATIAL_CHANNELS].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(
            f"digits classifier weights not found at {path}. They ship with ditq; "
            "rebuild them with `python -m ditq.train.digits_classifier`."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsClassifier(**state["config"])
    model.load_state_dict(state["state_dict"])
    return model.eval().requires_grad_(False)
