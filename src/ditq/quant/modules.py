"""QuantLinear / QuantConv2d: a layer with a weight quantizer and an input-activation quantizer.

The full-precision `weight` and `bias` stay parameters and stay the FP model's values, so
`quant_enabled = False` is always the FP layer. An algorithm that computes the values to round
(GPTQ's error-updated weights, hardened AdaRound) hands them over with `set_weight_source(w)`: the
weight quantizer then rounds that persistent buffer instead of `weight`. The fake-quantized weight
is cached by `refresh()` and reused at every forward. The weight grid is explicit: the first time a weight is quantized (first forward or
`refresh()`) a weight quantizer without stored parameters is fitted on it and keeps them, so an
edited weight is re-rounded on that same grid; `refresh(refit=True)` deliberately fits a new grid
(refused with FrozenParamsError when a step froze the parameters). Construction quantizes nothing.
A quantizer of None keeps that side in full precision; `quant_enabled = False` makes the whole
layer full precision (e.g. while recording FP calibration inputs). Set `cache_weight = False` to
re-quantize the weight at every forward instead (gradients then reach `weight` straight through).
In CPU inference (grad disabled, no hooks on the activation quantizer) the quantized input is
written into a reused per-thread buffer, saving a large allocation per call; `reuse_act_buffer =
False` turns that off.

Input transform. `input_transform` (None, or a module acting on the channel dim, e.g. a Hadamard
`ditq.quant.hadamard.Rotation`) is applied to the input before the activation quantizer, whether
or not the layer is quantized: a rotation x -> x R whose inverse was folded into `weight` (W R) is
part of the FP model's function. `layer_input(module, x)` is what the layer's weight actually
multiplies (the transformed input); calibration hooks record and accumulate that.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import Quantizer

__all__ = ["QuantLinear", "QuantConv2d", "layer_input"]


def _scratch_is_safe(quantizer: Quantizer, x: torch.Tensor) -> bool:
    """The quantized input may live in a reused buffer only if nothing can keep a reference to it:
    no autograd (it would save the input for backward), no hooks that could store the quantizer's
    output, float32 CPU tensors (elsewhere allocation is cheap)."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not quantizer._forward_hooks
        and not quantizer._forward_pre_hooks
        and not getattr(nn.modules.module, "_global_forward_hooks", None)
        and not getattr(nn.modules.module, "_global_forward_pre_hooks", None)
    )


def layer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input `module`'s weight multiplies: x through the layer's `input_transform` if it has one
    (QuantLinear / QuantConv2d), else x itself (calibration hooks receive the raw module input)."""
    transform = getattr(module, "transform_input", None)
    return x if transform is None else transform(x)


def _refresh_after_load(module: "_QuantLayer", _incompatible_keys) -> None:
    module.w_hat = None  # loading replaces weight / quantizer buffers: re-quantize at the next use


class _QuantLayer(nn.Module):
    """Shared weight caching, bit accounting and display."""

    def _init_quant(self, layer: nn.Module, weight_quantizer, act_quantizer, name: str) -> None:
        self.weight = layer.weight
        if layer.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = layer.bias
        self.weight_quantizer: Optional[Quantizer] = weight_quantizer
        self.act_quantizer: Optional[Quantizer] = act_quantizer
        self.name = name
        for side, q in (("weight_quantizer", weight_quantizer), ("act_quantizer", act_quantizer)):
            if q is not None and name and not q.name:
                q.name = f"{name}.{side}"  # named in errors (e.g. FrozenParamsError)
        self.quant_enabled = True  # False: forward is the full-precision layer (e.g. to record FP inputs)
        self.cache_weight = True
        self.reuse_act_buffer = True  # CPU inference: quantized input in a reused buffer (see _scratch_is_safe)
        self.register_buffer("w_hat", None, persistent=False)  # filled at first use (lazy: no fit here)
        self.register_buffer("weight_source", None)  # values to round instead of `weight` (set_weight_source)
        self.input_transform: Optional[nn.Module] = None  # channel transform of the input (module doc)
        # output branch (e.g. ditq.quant.lora.LoRABranch): while quantized, forward adds branch(x, x_q), x the
        # transformed input, x_q the same after the activation quantizer; None: no branch
        self.register_module("branch", None)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @torch.no_grad()
    def refresh(self, refit: bool = False) -> None:
        """Recompute the cached fake-quantized weight from `weight` (call after changing either), on
        the weight quantizer's stored grid; one without stored parameters is fitted first and keeps
        them. refit=True fits a new grid on the current weight (FrozenParamsError if frozen)."""
        wq = self.weight_quantizer
        if wq is None:
            self.w_hat = None
            return
        self._ensure_weight_grid(refit)
        self.w_hat = wq(self.weight_to_quantize().detach())

    def weight_to_quantize(self) -> torch.Tensor:
        """What the weight quantizer rounds: the weight source if one was set, else `weight`."""
        return self.weight if self.weight_source is None else self.weight_source

    @torch.no_grad()
    def set_weight_source(self, w: Optional[torch.Tensor]) -> None:
        """Round `w` (same shape as `weight`) instead of `weight` from now on, keeping `weight` the FP
        value (None goes back to rounding `weight`); refreshes the cached weight."""
        if w is not None and tuple(w.shape) != tuple(self.weight.shape):
            raise ValueError(f"{self.name or type(self).__name__}: weight source of shape {tuple(w.shape)} "
                             f"for a weight of shape {tuple(self.weight.shape)}")
        self.weight_source = None if w is None else w.detach().to(self.weight.dtype).clone()
        self.refresh()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight_source"
        if key in state_dict and self.weight_source is None:
            self.weight_source = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _ensure_weight_grid(self, refit: bool = False) -> None:
        wq = self.weight_quantizer
        if refit or not wq.is_fitted:
            wq.fit(self.weight_to_quantize().detach())

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses: cached, freshly quantized (cache_weight False), or FP."""
        if self.weight_quantizer is None or not self.quant_enabled:
            return self.weight
        if self.cache_weight:
            if self.w_hat is None or self.w_hat.shape != self.weight.shape:
                self.refresh()
            return self.w_hat
        self._ensure_weight_grid()
        return self.weight_quantizer(self.weight_to_quantize())

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x through `input_transform` along the channel dim (always applied, FP or quantized)."""
        if self.input_transform is None:
            return x
        return self.input_transform(x)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        aq = self.act_quantizer
        if aq is None or not self.quant_enabled:
            return x
        if self.reuse_act_buffer and _scratch_is_safe(aq, x):
            return aq.forward_into_scratch(x)  # consumed by this layer's matmul before anyone else runs
        return aq(x)

    def bits_per_weight(self) -> float:
        """Element bits plus scale / zero-point overhead per weight (FP dtype bits when unquantized)."""
        if self.weight_quantizer is None:
            return float(self.weight.element_size() * 8)
        return self.weight_quantizer.bits_per_weight(tuple(self.weight.shape))

    def _quant_repr(self) -> str:
        w = "fp" if self.weight_quantizer is None else self.weight_quantizer.describe()
        a = "fp" if self.act_quantizer is None else self.act_quantizer.describe()
        name = f"name={self.name!r}, " if self.name else ""
        return f"{name}w=[{w}], a=[{a}]"


class QuantLinear(_QuantLayer):
    """nn.Linear with fake-quantized input and cached fake-quantized weight."""

    wraps = nn.Linear  # the layer type it stands in for (e.g. how calibration lays out its inputs)

    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: Optional[Quantizer] = None,
        act_quantizer: Optional[Quantizer] = None,
        name: str = "",
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_quant(linear, weight_quantizer, act_quantizer, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform_input(x)
        x_q = self.quantize_input(x)
        out = F.linear(x_q, self.quantized_weight(), self.bias)
        return out if self.branch is None or not self.quant_enabled else out + self.branch(x, x_q)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._quant_repr()}"
        )


class QuantConv2d(_QuantLayer):
    """nn.Conv2d with the same interface: weights quantized as [out, in*kh*kw], the activation
    quantizer applied with channels moved last ([B, H, W, C])."""

    wraps = nn.Conv2d  # the layer type it stands in for: NCHW inputs

    def __init__(
        self,
        conv: nn.Conv2d,
        weight_quantizer: Optional[Quantizer] = None,
        act_quantizer: Optional[Quantizer] = None,
        name: str = "",
    ):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"QuantConv2d supports padding_mode='zeros', got {conv.padding_mode!r}; "
                "pad the input explicitly and use padding=0"
            )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._init_quant(conv, weight_quantizer, act_quantizer, name)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is None:
            return x
        return self.input_transform(x.movedim(1, -1)).movedim(-1, 1)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizer is None or not self.quant_enabled:
            return x
        return self.act_quantizer(x.movedim(1, -1)).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform_input(x)
        x_q = self.quantize_input(x)
        out = F.conv2d(x_q, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        return out if self.branch is None or not self.quant_enabled else out + self.branch(x, x_q)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, {self._quant_repr()}"
        )


@contextmanager
def full_precision(qlayers):
    """The given quantized layers ({name: layer} or an iterable of layers) run as their FP layers
    inside the block (quantizers bypassed); each layer's previous state is restored afterwards."""
    modules = list(qlayers.values()) if isinstance(qlayers, dict) else list(qlayers)
    prev = [m.quant_enabled for m in modules]
    for m in modules:
        m.quant_enabled = False
    try:
        yield
    finally:
        for m, p in zip(modules, prev):
            m.quant_enabled = p
