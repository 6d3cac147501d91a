"""Options of each method step (torch-free dataclasses, validated with the config)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RTNOptions:
    """Round-to-nearest: weight ranges from the weights, static activation ranges from calibration."""
