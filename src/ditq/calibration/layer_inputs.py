"""Inputs of chosen layers, recorded by forward hooks while the model sees calibration inputs.

Per layer the result is a plain dict of tensors (loadable with torch.load(weights_only=True)):
  "rows" [T, C]  a seeded random subsample of at most `max_tokens` of the layer's input rows
                 (C = input features; conv inputs are moved to channels last): an unbiased sample
                 for percentile / MSE ranges;
  "min", "max" [C]  the exact channel-wise minimum and maximum over *all* rows, kept apart so that
                 MinMax ranges equal the ranges over the full calibration set without biasing the
                 sample. Fit with `quantizer.fit(d["rows"], data_range=(d["min"], d["max"]))`.
Whether a layer's input is NCHW is decided by the layer's type (nn.Conv2d, or a wrapper whose class
declares `wraps = nn.Conv2d`, like QuantConv2d), never by the input's shape.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ditq.quant.modules import layer_input


# Bump when the payload's layout changes (part of the layer-inputs cache spec).
# 2: {"rows", "min", "max"} per layer (1: a [T + 2, C] tensor with the min/max rows appended).
LAYER_INPUTS_VERSION = 2


def _is_conv(module: nn.Module) -> bool:
    wrapped = getattr(type(module), "wraps", None)
    return isinstance(module, nn.Conv2d) or (isinstance(wrapped, type) and issubclass(wrapped, nn.Conv2d))


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if _is_conv(module):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect_layer_inputs(adapter, calib: dict[str, torch.Tensor], layer_names: list[str], max_tokens: int,
                         include_uncond: bool, batch_size: int = 256, seed: int = 0,
                         progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Run the denoiser on the calibration records (and their unconditional twins) and keep the
    inputs of `layer_names` as {name: {"rows", "min", "max"}} (module doc). The model is not
    modified; the caller decides whether it runs quantized (record FP inputs under full precision)."""
    modules = dict(adapter.denoiser.named_modules())
    x_all, t_all, y_all = calib["x"], calib["t"], calib["y"]
    if include_uncond:
        x_all = torch.cat([x_all, x_all])
        t_all = torch.cat([t_all, t_all])
        y_all = torch.cat([y_all, adapter.conditions.null_like(y_all)])
    n_batches = math.ceil(len(x_all) / batch_size)
    per_batch = math.ceil(max_tokens / n_batches)
    gen = torch.Generator().manual_seed(seed)
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in layer_names}
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args):
            rows = _rows(module, layer_input(module, args[0])).float()  # after an input transform (rotation)
            if not torch.isfinite(rows).all():
                raise FloatingPointError(
                    f"the input of layer {name} holds NaN/Inf on calibration data: the FP model itself "
                    "produces non-finite activations; check the checkpoint and the inference dtype "
                    "(fp16 overflow? try dtype_inference=float32)"
                )
            mn, mx = rows.amin(0), rows.amax(0)
            lo[name] = mn if name not in lo else torch.minimum(lo[name], mn)
            hi[name] = mx if name not in hi else torch.maximum(hi[name], mx)
            take = torch.randperm(rows.shape[0], generator=gen)[:per_batch]
            kept[name].append(rows[take].cpu())

        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in layer_names]
    try:
        for b in tqdm(range(0, len(x_all), batch_size), desc="layer inputs", disable=not progress,
                      dynamic_ncols=True, mininterval=2.0):
            dev = adapter.device
            adapter.denoise(x_all[b : b + batch_size].to(dev), t_all[b : b + batch_size].to(dev),
                            y_all[b : b + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
    return {n: {"rows": torch.cat(kept[n])[:max_tokens], "min": lo[n].cpu(), "max": hi[n].cpu()}
            for n in layer_names}
