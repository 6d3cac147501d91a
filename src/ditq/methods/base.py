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
    # FP layer inputs on calibration data, {name: {"rows" [T, C], "min" [C], "max" [C]}} (cached; a
    # ditq.calibration.lazy.Lazy the pipeline releases before sampling)
    layer_inputs: Callable[[], dict[str, dict[str, torch.Tensor]]]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    # denoiser inputs {x, t, y} recorded along FP trajectories of the calibration seeds (cached)
    calib_records: Callable[[], dict[str, torch.Tensor]] | None = None
    timesteps: list[int] = field(default_factory=list)  # the sampler's timesteps (condition grids)
    scratch_dir: str | None = None  # where steps may spill large temporary data (block I/O)
    progress: bool = True
    plan: Any = None  # the QuantPlan the layers were built from; a step that changes it (a search) replaces it
    output_dir: str | None = None  # the run's directory (steps write their artifacts there)
    services: Any = None  # ditq.methods.services.RunServices: generate, FP images, score


class Step:
    """One algorithm applied to the quantized model in place."""

    name: str = "step"
    # True: the step transforms the model (e.g. rotations folded into weights) and fits nothing; such
    # steps lead method.steps, and the pipeline records the layer inputs after them, keyed by transform_spec()
    transforms_model: bool = False

    def __init__(self, options):
        self.options = options

    def check_plan(self, run, adapter, plan) -> None:
        """Raise on settings that cannot work with this model and plan; called right after the plan
        is built, before any sampling (no data, no quantizers)."""

    def transform_spec(self) -> dict:
        """What a model-transforming step did, as JSON-able data (part of later cache keys)."""
        raise NotImplementedError(f"{type(self).__name__} does not transform the model")

    def needs_layer_inputs(self, ctx: QuantContext) -> bool:
        return False

    def apply(self, ctx: QuantContext) -> None:
        raise NotImplementedError(f"{type(self).__name__}.apply")
