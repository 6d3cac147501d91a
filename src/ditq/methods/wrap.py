"""Replace the chosen layers of a model with quantized ones, quantizers built from config."""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn

from ditq.config.schema import quantizer_config


def layer_formats(run, role: str) -> tuple[str | None, str | None]:
    """(weight format, act format) of a layer role: `bits` with its per-role overrides."""
    ov = run.bits.overrides.get(role, {}) if run.bits.overrides else {}
    return ov.get("weight", run.bits.weight), ov.get("act", run.bits.act)


def wrap_layers(adapter, run) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Swap every layer whose role is in `method.layers` for a QuantLinear/QuantConv2d.

    Returns ({name: quantized module}, {name: role}). Layers whose formats are both null stay as they are.
    """
    from ditq.quant.modules import QuantConv2d, QuantLinear
    from ditq.quant.quantizer import build_quantizer

    wanted = set(run.method.layers)
    qlayers, roles = {}, {}
    for info in adapter.layers():
        if info.role not in wanted:
            continue
        wfmt, afmt = layer_formats(run, info.role)
        if wfmt is None and afmt is None:
            continue
        module = adapter.denoiser.get_submodule(info.name)
        wq = build_quantizer(quantizer_config(run.method.weight, wfmt, "weight", "method.weight"), "weight") if wfmt else None
        aq = build_quantizer(quantizer_config(run.method.act, afmt, "act", "method.act"), "act") if afmt else None
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        qmod = cls(module, wq, aq, name=info.name)
        adapter.denoiser.set_submodule(info.name, qmod)
        qlayers[info.name] = qmod
        roles[info.name] = info.role
    return qlayers, roles


@contextmanager
def full_precision(qlayers: dict[str, nn.Module]):
    """Run the wrapped model as the FP model inside the block (quantizers bypassed)."""
    previous = {n: q.quant_enabled for n, q in qlayers.items()}
    for q in qlayers.values():
        q.quant_enabled = False
    try:
        yield
    finally:
        for n, q in qlayers.items():
            q.quant_enabled = previous[n]
