"""Exact per-channel scale folding in DiT blocks (diffusers' `BasicTransformerBlock` with
norm_type "ada_norm_zero", the DiT-XL/2 block), for smoothing-style methods (SmoothQuant, RepQ-ViT).

Each fold divides the input of some linear layers by s per input channel and multiplies the
consumers' weight columns by s, so the block computes the same function (to float rounding):

  fold_input_scale(model, k, "attn", s)   the modulated input LN(x) * (1 + scale_msa) + shift_msa of
                                          to_q / to_k / to_v: the adaLN linear's scale_msa rows become
                                          (1 + scale) / s - 1 = scale / s + (1 / s - 1) (weight rows / s,
                                          bias (b + 1) / s - 1) and its shift_msa rows shift / s;
  fold_input_scale(model, k, "mlp", s)    the same with scale_mlp / shift_mlp for ff.net.0.proj (fc1);
  fold_v_scale(block, s)                  the input of to_out.0 (proj): to_v's output rows (weight and
                                          bias) / s, to_out.0's weight columns * s. Attention is linear
                                          in V per channel (softmax(QK^T) V mixes tokens, not channels;
                                          heads only split the channels), so exact.

The adaLN chunk order is diffusers' `AdaLayerNormZero.forward`: shift_msa, scale_msa, gate_msa,
shift_mlp, scale_mlp, gate_mlp (`ADALN_CHUNKS`). fc2's input (after GELU) has no linear op in
front of it, so it cannot be folded exactly and there is no fold for it.

The edits replace the parameters' data with new tensors computed in float64 (never in place: the
weights may share storage with loaded files); a quantized layer (QuantLinear) drops its cached weight. Folding
after a quantizer of an affected layer was fitted would leave a stale grid, so it is refused.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

# diffusers AdaLayerNormZero.forward: emb.chunk(6, dim=1) in this order
ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
# target -> (shift chunk, scale chunk, consumers of the modulated input, relative to the block)
FOLD_TARGETS = {
    "attn": ("shift_msa", "scale_msa", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    "mlp": ("shift_mlp", "scale_mlp", ("ff.net.0.proj",)),
}


class FoldError(ValueError):
    """A fold that would not be exact (unexpected block structure, bad scales, fitted quantizers)."""


def dit_blocks(adapter_or_denoiser) -> nn.ModuleList:
    """The transformer blocks of a DiT adapter (its `denoiser`) or of the denoiser itself."""
    model = getattr(adapter_or_denoiser, "denoiser", adapter_or_denoiser)
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise FoldError(f"{type(model).__name__} has no transformer_blocks: scale folding supports diffusers' "
                        "DiTTransformer2DModel (adaLN-Zero blocks) only")
    return blocks


def dit_block(adapter_or_denoiser, block_index: int) -> nn.Module:
    blocks = dit_blocks(adapter_or_denoiser)
    if not 0 <= int(block_index) < len(blocks):
        raise FoldError(f"block_index={block_index} is out of range: the model has {len(blocks)} blocks")
    return blocks[int(block_index)]


def _check_block(block: nn.Module, target: str) -> None:
    norm_type = getattr(block, "norm_type", None)
    if norm_type != "ada_norm_zero":
        raise FoldError(f"scale folding needs an adaLN-Zero DiT block (norm_type 'ada_norm_zero'), got {norm_type!r}")
    if target == "attn" and getattr(block, "pos_embed", None) is not None:
        raise FoldError("the block adds a positional embedding to the modulated input before attention: "
                        "dividing that input by s would not commute with it")
    if target == "attn" and any(getattr(block.attn1, n, None) is not None for n in ("group_norm", "spatial_norm")):
        raise FoldError("attn1 normalises its input (group_norm / spatial_norm): dividing it by s would not be exact")
    if target == "attn" and getattr(block.attn1, "only_cross_attention", False):
        raise FoldError("attn1 is cross-attention only: its keys/values do not read the modulated input")
    if block.norm1.linear.bias is None:
        raise FoldError("the adaLN linear has no bias: the +1 of (1 + scale) cannot be folded without one")


def _scales(s: torch.Tensor, width: int, what: str) -> torch.Tensor:
    s = torch.as_tensor(s).detach()
    if s.ndim != 1 or s.numel() != width:
        raise FoldError(f"{what}: s must be a 1-D tensor of {width} per-channel scales, got shape {tuple(s.shape)}")
    s = s.to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise FoldError(f"{what}: every scale must be finite and > 0 (got min {float(s.min())}, max {float(s.max())})")
    return s


def check_unfitted(module: nn.Module, name: str) -> None:
    """A quantized layer whose grid was already fitted (or whose rounded weights were set) would go
    stale after its FP weight changes."""
    wq = getattr(module, "weight_quantizer", None)
    aq = getattr(module, "act_quantizer", None)
    stale = []
    if wq is not None and wq.is_fitted:
        stale.append(f"weight quantizer fitted{' and frozen by ' + wq.frozen_by if wq.frozen else ''}")
    if getattr(module, "weight_source", None) is not None:
        stale.append("weight source set")
    if aq is not None and not aq.cfg.dynamic and aq.is_fitted:
        stale.append("static activation ranges fitted")
    if stale:
        raise FoldError(f"layer {name}: {', '.join(stale)} before the scale folding; folding must run before any "
                        "step fits quantizers (put the smoothing step first in method.steps)")


def check_no_input_transform(module: nn.Module, name: str) -> None:
    """A per-channel scale folded into the producer of a layer's input does not commute with an online
    input transform (a rotation mixes the channels the scale was meant for)."""
    if getattr(module, "input_transform", None) is not None:
        raise FoldError(f"layer {name} rotates its input online (input_transform); a per-channel scale folded "
                        "in front of it would not be exact. Smooth before rotating is not supported either: "
                        "use the rotation or the smoothing on this layer, not both")


def set_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Give `param` the value `value` (its own dtype and device) in new storage."""
    param.data = value.to(device=param.device, dtype=param.dtype)  # new storage, never an in-place edit


def as_f64(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy of `t` (folds compute in float64)."""
    return t.detach().to(device="cpu", dtype=torch.float64, copy=True)


def drop_cached_weights(modules: Iterable[nn.Module]) -> None:
    """Drop a quantized layer's cached weight: it is re-quantized, its grid fitted, at first use on the
    folded weight (refresh() would fit the grid now, and the next fold would find it stale)."""
    for m in modules:
        if hasattr(m, "refresh") and hasattr(m, "weight_quantizer"):
            m.w_hat = None


def consumers(block: nn.Module, target: str) -> list[nn.Module]:
    """The layers reading the modulated input of `target` ("attn": to_q, to_k, to_v; "mlp": fc1)."""
    if target not in FOLD_TARGETS:
        raise FoldError(f"target={target!r}; choose one of: {', '.join(FOLD_TARGETS)}")
    return [block.get_submodule(n) for n in FOLD_TARGETS[target][2]]


@torch.no_grad()
def fold_input_scale(adapter_or_denoiser, block_index: int, target: str, s: torch.Tensor) -> None:
    """Divide the modulated input of `target`'s layers in block `block_index` by s (per channel)
    through the block's adaLN linear, and multiply those layers' weight columns by s (module doc)."""
    block = dit_block(adapter_or_denoiser, block_index)
    layers = consumers(block, target)
    _check_block(block, target)
    where = f"block {block_index} {target}"
    width = layers[0].weight.shape[1]
    s = _scales(s, width, where)
    ada = block.norm1.linear
    if ada.weight.shape[0] != len(ADALN_CHUNKS) * width:
        raise FoldError(f"{where}: the adaLN linear has {ada.weight.shape[0]} outputs, expected "
                        f"{len(ADALN_CHUNKS)} x {width} (shift/scale/gate for attention and MLP)")
    names = [f"block {block_index} norm1.linear"] + [f"block {block_index} {n}" for n in FOLD_TARGETS[target][2]]
    for m, n in zip([ada, *layers], names):
        check_unfitted(m, n)
    for m, n in zip(layers, names[1:]):
        check_no_input_transform(m, n)
    shift_chunk, scale_chunk, _ = FOLD_TARGETS[target]
    shift = slice(ADALN_CHUNKS.index(shift_chunk) * width, (ADALN_CHUNKS.index(shift_chunk) + 1) * width)
    scale = slice(ADALN_CHUNKS.index(scale_chunk) * width, (ADALN_CHUNKS.index(scale_chunk) + 1) * width)
    w, b = as_f64(ada.weight), as_f64(ada.bias)
    w[scale] /= s[:, None]
    b[scale] = (b[scale] + 1.0) / s - 1.0  # (1 + scale) / s = 1 + (scale / s + 1 / s - 1)
    w[shift] /= s[:, None]
    b[shift] /= s
    set_param(ada.weight, w)
    set_param(ada.bias, b)
    for layer in layers:
        set_param(layer.weight, as_f64(layer.weight) * s[None, :])
    drop_cached_weights([ada, *layers])


@torch.no_grad()
def fold_v_scale(block: nn.Module, s: torch.Tensor) -> None:
    """Divide the input of attn1.to_out.0 (proj) by s per channel: to_v's output rows (weight and
    bias) / s, to_out.0's weight columns * s (exact: attention is linear in V per channel)."""
    attn = block.attn1
    v, out = attn.to_v, attn.to_out[0]
    width = v.weight.shape[0]
    if out.weight.shape[1] != width:
        raise FoldError(f"to_v has {width} outputs but to_out.0 reads {out.weight.shape[1]} channels")
    if getattr(attn, "spatial_norm", None) is not None:
        raise FoldError("the attention has a spatial norm: dividing V by s would not be exact")
    s = _scales(s, width, "fold_v_scale")
    for m, n in ((v, "attn1.to_v"), (out, "attn1.to_out.0")):
        check_unfitted(m, n)
    check_no_input_transform(out, "attn1.to_out.0")
    set_param(v.weight, as_f64(v.weight) / s[:, None])
    if v.bias is not None:
        set_param(v.bias, as_f64(v.bias) / s)
    set_param(out.weight, as_f64(out.weight) * s[None, :])
    drop_cached_weights([v, out])
