"""Fake-quantized attention probabilities in diffusers' `Attention` modules.

`QuantAttnProcessor` is diffusers' `AttnProcessor2_0` with the softmax made explicit so that the
probabilities can pass through a quantizer (any callable probs -> probs, e.g.
`ditq.quant.log2.Log2Quantizer`) before they multiply the values:

    P = softmax(Q K^T / sqrt(d))  (float32)  ->  P_hat = quantizer(P)  ->  P_hat V

While it is not active it runs the stock `scaled_dot_product_attention` path, so the model is then
exactly the stock one. It is active when it has a quantizer and its `gate()` says so; `install`
gates every processor on the quantization switch of its attention's quantized layers
(`QuantLinear.quant_enabled` of to_q/to_k/to_v/to_out.0): inside `full_precision(...)` of any of them
(FP calibration records, diagnostics' FP pass, a block-wise engine's FP pass of that block) the
softmax is full precision too, with no extra switch to remember. The scale is 1/sqrt(head_dim),
SDPA's default, as the stock processor uses (it ignores `attn.scale`).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantAttnProcessor", "attention_modules", "install", "remove", "installed"]

# Largest float32 score tensor built at once (elements, ~1 GiB); larger batches run in chunks.
MAX_SCORE_ELEMENTS = 2 ** 28


class QuantAttnProcessor:
    """AttnProcessor2_0 with an optional quantizer of the post-softmax probabilities (module doc)."""

    def __init__(self, quantizer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 gate: Optional[Callable[[], bool]] = None, previous=None, name: str = ""):
        self.quantizer = quantizer
        self.gate = gate  # None: active whenever a quantizer is set
        self.previous = previous  # the processor `remove` puts back
        self.name = name
        self.quantized_calls = 0  # forwards whose probabilities were quantized

    @property
    def active(self) -> bool:
        return self.quantizer is not None and (self.gate is None or bool(self.gate()))

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.active:
            hidden_states = self._quantized_attention(query, key, value, attention_mask)
            self.quantized_calls += 1
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _quantized_attention(self, query, key, value, mask) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d) + mask) quantized, times V; [B, H, N, d], in float32, batch chunks
        bounded by MAX_SCORE_ELEMENTS."""
        b, h, n, d = query.shape
        m = key.shape[2]
        step = max(1, MAX_SCORE_ELEMENTS // max(1, h * n * m))
        scale = 1.0 / math.sqrt(d)
        out = []
        for i in range(0, b, step):
            q, k, v = (t[i:i + step].float() for t in (query, key, value))
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
            if mask is not None:
                part = mask[i:i + step] if mask.shape[0] == b else mask
                if part.dtype == torch.bool:
                    scores = scores.masked_fill(~part, float("-inf"))
                else:
                    scores = scores + part.float()
            probs = self.quantizer(scores.softmax(dim=-1))
            out.append(torch.matmul(probs.to(torch.float32), v).to(value.dtype))
        return out[0] if len(out) == 1 else torch.cat(out)


def attention_modules(denoiser: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every diffusers `Attention` in the denoiser."""
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in denoiser.named_modules() if isinstance(m, Attention)}


def layer_gate(attn: nn.Module, name: str = "") -> Callable[[], bool]:
    """True while every quantized layer (a module with `quant_enabled`) inside `attn` is enabled.
    Raises ValueError when the attention has none: nothing would switch its softmax back to FP."""
    layers = [m for m in attn.modules() if hasattr(m, "quant_enabled")]
    if not layers:
        raise ValueError(
            f"attention {name or type(attn).__name__}: its softmax quantizer follows the full-precision switch "
            f"of the attention's quantized layers (full_precision / quant_enabled of to_q, to_k, to_v, to_out.0), "
            f"and none of them is quantized; quantize qkv or proj (method.layers) or leave the softmax unquantized"
        )
    return lambda: all(m.quant_enabled for m in layers)


def install(attentions: dict[str, nn.Module], quantizer_for: Callable[[str, nn.Module], Optional[Callable]],
            gate: bool = True) -> dict[str, QuantAttnProcessor]:
    """Give each attention a `QuantAttnProcessor` with `quantizer_for(name, attn)` (None: that one
    stays unquantized), gated by `layer_gate` (gate=False: always active). An attention that already
    has one gets a new one (its original processor is kept for `remove`). Returns {name: processor}."""
    gates = {n: layer_gate(a, n) if gate else None for n, a in attentions.items()}  # all errors before any change
    out = {}
    for name, attn in attentions.items():
        prev = attn.processor
        if isinstance(prev, QuantAttnProcessor):
            prev = prev.previous
        proc = QuantAttnProcessor(quantizer_for(name, attn), gates[name], previous=prev, name=name)
        attn.set_processor(proc)
        out[name] = proc
    return out


def installed(denoiser: nn.Module) -> dict[str, QuantAttnProcessor]:
    """{name: processor} of the attentions that hold a `QuantAttnProcessor`."""
    return {n: a.processor for n, a in attention_modules(denoiser).items()
            if isinstance(a.processor, QuantAttnProcessor)}


def remove(denoiser_or_attentions) -> int:
    """Put back the processors `install` replaced; returns how many were restored."""
    attentions: Iterable[nn.Module] = (
        denoiser_or_attentions.values() if isinstance(denoiser_or_attentions, dict)
        else attention_modules(denoiser_or_attentions).values()
    )
    n = 0
    for attn in attentions:
        proc = attn.processor
        if isinstance(proc, QuantAttnProcessor):
            if proc.previous is not None:
                attn.set_processor(proc.previous)
            else:
                from diffusers.models.attention_processor import AttnProcessor2_0

                attn.set_processor(AttnProcessor2_0())
            n += 1
    return n
