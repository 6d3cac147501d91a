"""The cost of a quantization plan: per-layer MACs, BitOps and weight storage, and the constraints
a group-size search is held to.

Per layer of a `QuantPlan` (`ditq.methods.plan`), for ONE sample and ONE denoiser forward:

    macs         = tokens x out x in       (a Conv2d: output positions x out x in*kh*kw;
                                            for a patch embedding the output positions are the tokens)
    segments     = input groups that share one (weight scale, activation scale) pair along a dot
                   product: ceil(in / min(weight group, activation group)); an ungrouped side's group
                   is the full width (per-channel weights with per-token activations: 1 segment)
    rescale_ops  = tokens x out x segments when both sides are quantized (each segment's integer
                   partial sum is scaled by s_w * s_a, zero-point terms folded, and accumulated: one
                   RESCALE_BITS x RESCALE_BITS multiply-add), else 0
    bitops       = macs x weight bits x activation bits + rescale_ops x RESCALE_BITS^2
                   (a full-precision side counts FP_BITS); smaller groups cost BitOps as well as storage
    storage_bits = out x in * Quantizer.bits_per_weight   (element bits plus the scale / zero point
                   of every (row, group), as the pipeline's size_mb counts it; FP weights FP_BITS each)

A layer in `copies` (a duplicate of another layer's weights: diffusers keeps one timestep embedder
per block where DiT has one, shared; `shared_copies(adapter)` finds them) costs nothing: it counts
once, as the pipeline's size_mb counts it.

`tokens` is the number of input vectors a layer sees per sample: the patch count for the layers in
the blocks (16 for the embedded model, 256 for DiT-XL/2 at 256 px) and 1 for the layers that see
only the condition (adaLN, timestep embedder, the final adaLN projection); `layer_tokens(adapter)`
builds that map. Only the plan's linear / conv layers count: attention's two matmuls, softmax,
norms and biases are outside every plan and the same for all plans of a model.

Constraints (`check_constraints`): `max_bitops` (the paper's BitOps budget), `max_storage_bits`,
and `min_mean_group_size`, the public code's constraint "mean group size >= 128": the unweighted
mean over the weight-quantized layers of their weight group size (a layer without groups counts
its full input width: one group per row). This module imports no torch (storage bits build a
`Quantizer` lazily, to reuse its `bits_per_weight`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from ditq.methods.plan import LayerPlan, PlanError, QuantPlan, weight_width

FP_BITS = 32  # bits of a full-precision weight / activation (the pipeline's size_mb counts 32 too)
RESCALE_BITS = 16  # a group partial sum is rescaled in FP16 (scales are stored in 16 bits too)


@dataclass(frozen=True)
class LayerCost:
    name: str
    role: str
    shape: tuple[int, ...]
    tokens: int  # input vectors per sample (conv: output positions)
    macs: int
    weight_bits: int  # element bits (FP_BITS for a full-precision side)
    act_bits: int
    bitops: int  # macs x weight bits x act bits + rescale_bitops
    storage_bits: float  # weight elements + scales / zero points
    group_size: int | None  # the weight's group size (None: not quantized); ungrouped: its width
    rescale_bitops: int = 0  # tokens x out x segments x RESCALE_BITS^2 (see the module docstring)
    copy: bool = False  # a duplicate of another layer's weights: no MACs, no storage, not in the mean


def _element_bits(cfg) -> int:
    if cfg is None:
        return FP_BITS
    from ditq.quant.spec import parse_format

    return int(parse_format(cfg.format).bits)


def _bits_per_weight(cfg, shape: tuple[int, ...]) -> float:
    """Quantizer.bits_per_weight of the layer's weight quantizer (FP_BITS when not quantized)."""
    if cfg is None:
        return float(FP_BITS)
    from ditq.quant.quantizer import build_quantizer

    return float(build_quantizer(cfg, "weight").bits_per_weight(shape))


def weight_group_size(lp: LayerPlan) -> int | None:
    """The weight's effective group size: its group size, a block format's block, or the full
    input width when there are no groups (per_channel / per_tensor); None for an FP weight."""
    if lp.weight is None:
        return None
    from ditq.quant.spec import parse_format

    spec = parse_format(lp.weight.format)
    width = weight_width(lp.shape)
    if spec.is_block:
        return min(int(spec.block_size), width)
    if lp.weight.granularity == "per_group" and lp.weight.group_size:
        return min(int(lp.weight.group_size), width)
    return width


def _side_group(cfg, width: int) -> int:
    """The group along the input a side's scales cover (its width when it has no groups)."""
    if cfg.granularity in ("per_group", "per_token_group", "per_block") and cfg.group_size:
        return min(int(cfg.group_size), width)
    from ditq.quant.spec import parse_format

    spec = parse_format(cfg.format)
    return min(int(spec.block_size), width) if spec.is_block else width


def rescale_segments(lp: LayerPlan, width: int) -> int:
    """Input segments sharing one (weight scale, act scale) pair; 0 when a side is full precision."""
    if lp.weight is None or lp.act is None:
        return 0
    return math.ceil(width / min(_side_group(lp.weight, width), _side_group(lp.act, width)))


def _tokens_of(name: str, tokens: int | Mapping[str, int]) -> int:
    if isinstance(tokens, Mapping):
        if name not in tokens:
            raise PlanError(f"cost: no token count for layer {name}; give tokens as an int or a mapping "
                            "with every plan layer (layer_tokens(adapter) builds it)")
        n = tokens[name]
    else:
        n = tokens
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise PlanError(f"cost: tokens for layer {name} must be a positive int, got {n!r}")
    return n


def layer_costs(plan: QuantPlan, tokens: int | Mapping[str, int], copies: Iterable[str] = ()) -> list[LayerCost]:
    """One LayerCost per plan layer (every layer, quantized or not), in plan order. `tokens`: one
    count for all layers or {layer name: count} (see `layer_tokens`); `copies`: layers that
    duplicate another one's weights (see `shared_copies`), counted as zero."""
    copies = set(copies)
    unknown = sorted(copies - set(plan.layers))
    if unknown:
        raise PlanError(f"cost: copies names layers the plan does not have: {unknown[:5]}")
    rows = []
    for name, lp in plan.layers.items():
        if lp.shape is None:
            raise PlanError(f"cost: layer {name} has no weight shape in the plan; build the plan from the "
                            "model (QuantPlan.from_run / plan_for_run) so every layer has one")
        shape = tuple(int(d) for d in lp.shape)
        n = _tokens_of(name, tokens)
        width = weight_width(shape)
        macs = n * shape[0] * width
        wb, ab = _element_bits(lp.weight), _element_bits(lp.act)
        rescale = n * shape[0] * rescale_segments(lp, width) * RESCALE_BITS ** 2
        rows.append(LayerCost(name=name, role=lp.role, shape=shape, tokens=n, macs=macs, weight_bits=wb,
                              act_bits=ab, bitops=macs * wb * ab + rescale, rescale_bitops=rescale,
                              storage_bits=math.prod(shape) * _bits_per_weight(lp.weight, shape),
                              group_size=weight_group_size(lp)))
        if name in copies:
            rows[-1] = dataclasses.replace(rows[-1], macs=0, bitops=0, rescale_bitops=0, storage_bits=0.0,
                                           group_size=None, copy=True)
    return rows


def summarize(rows: list[LayerCost]) -> dict[str, Any]:
    """Totals of `layer_costs` rows: bitops, macs, storage_bits / storage_mb (all layers) and
    mean_group_size (over the weight-quantized layers; None when there are none)."""
    groups = [r.group_size for r in rows if r.group_size is not None]
    storage = float(sum(r.storage_bits for r in rows))
    return {
        "bitops": int(sum(r.bitops for r in rows)),
        "macs": int(sum(r.macs for r in rows)),
        "storage_bits": storage,
        "storage_mb": storage / 8 / 1e6,
        "mean_group_size": sum(groups) / len(groups) if groups else None,
        "quantized_layers": len(groups),
    }


def plan_cost(plan: QuantPlan, tokens: int | Mapping[str, int], copies: Iterable[str] = ()) -> dict[str, Any]:
    """Totals of a plan per sample and denoiser forward: {bitops, macs, storage_bits, storage_mb,
    mean_group_size, quantized_layers}."""
    return summarize(layer_costs(plan, tokens, copies))


def check_constraints(cost: Mapping[str, Any], *, max_bitops: float | None = None,
                      max_storage_bits: float | None = None,
                      min_mean_group_size: float | None = None) -> list[str]:
    """The constraints `cost` (from `plan_cost`) violates, one message each; [] = all met.
    `min_mean_group_size=128` is the public Q-DiT search's constraint, `max_bitops` the paper's."""
    out = []
    if max_bitops is not None and cost["bitops"] > max_bitops:
        out.append(f"bitops {cost['bitops']:.4g} > max_bitops {max_bitops:.4g}")
    if max_storage_bits is not None and cost["storage_bits"] > max_storage_bits:
        out.append(f"storage_bits {cost['storage_bits']:.6g} > max_storage_bits {max_storage_bits:.6g}")
    if min_mean_group_size is not None:
        mean = cost["mean_group_size"]
        if mean is None or mean < min_mean_group_size:
            out.append(f"mean_group_size {mean} < min_mean_group_size {min_mean_group_size}")
    return out


def layer_tokens(adapter, names=None) -> dict[str, int]:
    """{layer name: input vectors per sample} for `names` (default: the adapter's layers; give the
    plan's names once layers are wrapped): 1 for the layers that see only the condition
    (`adapter.conditioning_layers()`), the patch count for every other one ((H / patch) x (W / patch)
    of the latent; a patch-embedding conv's output positions). An adapter with its own count (text
    models: caption-side layers read the caption's tokens) provides `layer_tokens()`."""
    own = getattr(adapter, "layer_tokens", None)
    if callable(own):
        counts = own()
        names = list(counts) if names is None else list(names)
        return {n: counts[n] for n in names}
    _, h, w = adapter.latent_shape
    patch = int(getattr(getattr(adapter.denoiser, "config", None), "patch_size", None) or 1)
    patches = (int(h) // patch) * (int(w) // patch)
    cond = set(adapter.conditioning_layers())
    names = [info.name for info in adapter.layers()] if names is None else list(names)
    return {n: 1 if n in cond else patches for n in names}


def row_cost(plan: QuantPlan, adapter) -> dict[str, Any]:
    """The result row's `cost` field: plan_cost with the adapter's token counts, plus the tokens
    per sample of the block layers (per sample and denoiser forward; cfg doubles the forwards)."""
    tokens = layer_tokens(adapter, plan.layers)
    cost = plan_cost(plan, tokens, shared_copies(adapter, plan.layers))
    return {**cost, "tokens": max(tokens.values()) if tokens else 0, "unit": "per sample, per denoiser forward"}


def shared_copies(adapter, names=None) -> list[str]:
    """Layers (of `names`, default the adapter's) whose weight the adapter counts as a copy of
    another's (not among `adapter.unique_parameters()`)."""
    unique = {id(p) for p in adapter.unique_parameters()}
    names = [info.name for info in adapter.layers()] if names is None else list(names)
    return [n for n in names if id(adapter.denoiser.get_submodule(n).weight) not in unique]


def as_dicts(rows: list[LayerCost]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
