"""What a step sees (`QuantContext`) and what it implements (`Step`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class QuantContext:
    adapter: Any  # ditq.models.ModelAdapter, its denoiser already holding QuantLinear layers
    run: Any  # the validated run config
    qlayers: dict[str, Any]  # layer name -> QuantLinear / QuantConv2d
    roles: dict[str, str]  # layer name -> role
    layer_inputs: Callable[[], dict[str, torch.Tensor]]  # FP layer inputs on calibration data (cached)
    diagnostics: dict[str, Any] = field(default_factory=dict)


class Step:
    """One algorithm applied to the quantized model in place."""

    name: str = "step"

    def __init__(self, options):
        self.options = options

    def needs_layer_inputs(self, ctx: QuantContext) -> bool:
        return False

    def apply(self, ctx: QuantContext) -> None:
        raise NotImplementedError(f"{type(self).__name__}.apply")
