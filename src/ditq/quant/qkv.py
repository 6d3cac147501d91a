"""Fake-quantized Q, K, V (and optionally the attention probabilities) in diffusers' `Attention`s.

FP4DiT quantizes the tensors that enter the attention matmuls online, per token: the outputs of
`to_q`, `to_k` and `to_v`, each with maxval = the absmax of the token's row at every forward
(dynamic, per_token; `per_head=True`: one range per token and head, the public code's layout after
`head_to_batch_dim`), in the activation format of the projection that produced it, read at call time
from that projection's `act_quantizer` (so a step that changes a layer's activation format, e.g.
`format_select`, is followed). The softmax output stays at full precision unless `probs` names a
format: then `ditq.quant.attention.QuantAttnProcessor` (explicit softmax) quantizes it per query row.

Q/K/V are quantized by forward hooks on the projections, so any attention processor works (diffusers'
AttnProcessor2_0 of DiT / PixArt, Hunyuan-DiT's: there the quantized Q/K then pass through its q/k
norms and rotary embedding, as in FP4DiT's public Hunyuan processor). Every hook is gated like the
probability quantizer (`attention.layer_gate`): active only while all the attention's quantized layers
are enabled, so inside `full_precision(...)` the attention is bit-identical to the stock one, and an
attention with no quantized layer gets no quantizer. `install_for_run(adapter, run)` reads `method.attn`
(checked with the config, `ditq.config.checks._check_attn`); `remove_qkv(denoiser)` takes it all out.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from ditq.quant.attention import attention_modules, install, layer_gate

__all__ = ["QKVQuantError", "TensorQuantizer", "install_qkv", "install_for_run", "remove_qkv", "qkv_hooks",
           "PROJECTIONS"]

log = logging.getLogger(__name__)

PROJECTIONS = ("to_q", "to_k", "to_v")


class QKVQuantError(ValueError):
    """A Q/K/V or probability quantizer setup that cannot work; the message says how to fix it."""


def _side_config(fmt: str, per_head_dim: Optional[int], key: str):
    """The QuantizerConfig of a per-token (or per token and head) dynamic absmax quantizer of `fmt`."""
    from ditq.config.schema import quantizer_config

    side: dict[str, Any] = {"granularity": "per_token", "dynamic": True, "range": "minmax", "symmetric": True}
    if per_head_dim is not None:
        side.update(granularity="per_token_group", group_size=int(per_head_dim))
    return quantizer_config(side, fmt, "act", key)


class TensorQuantizer:
    """Online quantizer of one tensor: its format comes from `format_of()` at every call (None: full
    precision), the quantizer is built once per format."""

    def __init__(self, format_of: Callable[[], Optional[str]], per_head_dim: Optional[int] = None, name: str = ""):
        self.format_of = format_of
        self.per_head_dim = per_head_dim
        self.name = name
        self._built: dict[str, Any] = {}
        self.calls = 0

    def quantizer(self):
        fmt = self.format_of()
        if fmt is None:
            return None
        if fmt not in self._built:
            from ditq.quant.quantizer import build_quantizer

            q = build_quantizer(_side_config(fmt, self.per_head_dim, self.name or "qkv"), "act")
            q.name = self.name
            self._built[fmt] = q
        return self._built[fmt]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer()
        if q is None:
            return x
        self.calls += 1
        return q(x).to(x.dtype)


class _Hook:
    """Forward hook of one projection: its output through `quant` while `gate()` holds."""

    def __init__(self, quant: TensorQuantizer, gate: Callable[[], bool]):
        self.quant, self.gate = quant, gate
        self.handle = None

    def __call__(self, _module, _inputs, output):
        if not self.gate():
            return None  # unchanged: the stock output
        return self.quant(output)


def _act_format(layer: nn.Module) -> Optional[str]:
    aq = getattr(layer, "act_quantizer", None)
    return None if aq is None else aq.cfg.format


def qkv_hooks(denoiser: nn.Module) -> dict[str, _Hook]:
    """{"<attention>.<to_q|to_k|to_v>": hook} of the Q/K/V quantizers installed in `denoiser`."""
    out = {}
    for name, attn in attention_modules(denoiser).items():
        for proj, hook in getattr(attn, "_ditq_qkv_hooks", {}).items():
            out[f"{name}.{proj}"] = hook
    return out


def remove_qkv(denoiser_or_attentions) -> int:
    """Take out the Q/K/V hooks; returns how many were removed."""
    attns = (denoiser_or_attentions if isinstance(denoiser_or_attentions, dict)
             else attention_modules(denoiser_or_attentions))
    n = 0
    for attn in attns.values():
        for hook in getattr(attn, "_ditq_qkv_hooks", {}).values():
            hook.handle.remove()
            n += 1
        attn._ditq_qkv_hooks = {}
    return n


def install_qkv(attentions: dict[str, nn.Module], per_head: bool = False) -> dict[str, _Hook]:
    """Per-token online quantizers on the outputs of to_q/to_k/to_v of each attention whose projection has
    an activation quantizer (its format is the quantizer's), gated by `layer_gate`. Replaces hooks a
    previous call installed. Returns {"<attention>.<proj>": hook}."""
    out = {}
    for name, attn in attentions.items():
        projs = {p: getattr(attn, p, None) for p in PROJECTIONS}
        wanted = {p: m for p, m in projs.items() if m is not None and getattr(m, "act_quantizer", None) is not None}
        remove_qkv({name: attn})
        if not wanted:
            continue
        gate = layer_gate(attn, name)
        head_dim = None
        if per_head:
            inner = int(attn.to_q.out_features) if hasattr(attn.to_q, "out_features") else int(attn.to_q.weight.shape[0])
            head_dim = inner // int(attn.heads)
        hooks = {}
        for p, layer in wanted.items():
            quant = TensorQuantizer(lambda layer=layer: _act_format(layer), head_dim, name=f"{name}.{p}.output")
            hook = _Hook(quant, gate)
            hook.handle = layer.register_forward_hook(hook)
            hooks[p] = hook
            out[f"{name}.{p}"] = hook
        attn._ditq_qkv_hooks = hooks
    return out


def _check_probs_processor(attentions: dict[str, nn.Module]) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ditq.quant.attention import QuantAttnProcessor

    bad = {n: type(a.processor).__name__ for n, a in attentions.items()
           if not isinstance(a.processor, (AttnProcessor2_0, QuantAttnProcessor))}
    if bad:
        name, proc = next(iter(bad.items()))
        raise QKVQuantError(f"method.attn.probs quantizes the softmax with an explicit-softmax copy of diffusers' "
                            f"AttnProcessor2_0, and {len(bad)} attention(s) use another processor (e.g. {name}: {proc}, "
                            f"whose rotary embedding / norms it would drop); set method.attn.probs=null for this model")


def install_for_run(adapter, run, qlayers: dict | None = None) -> dict[str, Any]:
    """Install what `run.method.attn` asks for ({qkv, per_head, probs}) in the adapter's denoiser, after
    `wrap_layers`. Returns a summary {"qkv": hooked projections, "probs": attentions} (empty when off)."""
    attn_cfg = run.method.get("attn") or {}
    qkv, probs = bool(attn_cfg.get("qkv", False)), attn_cfg.get("probs")
    if not qkv and probs is None:
        return {}
    attns = attention_modules(adapter.denoiser)
    quantized = {n: a for n, a in attns.items()
                 if any(getattr(getattr(a, p, None), "act_quantizer", None) is not None for p in PROJECTIONS)
                 or any(hasattr(m, "quant_enabled") for m in a.modules())}
    summary: dict[str, Any] = {}
    if qkv:
        hooks = install_qkv(quantized, per_head=bool(attn_cfg.get("per_head", False)))
        if not hooks:  # e.g. bits with full-precision activations: Q/K/V follow them
            log.info("method.attn.qkv: no to_q/to_k/to_v of model %s has an activation quantizer (bits=%s): Q, K and "
                     "V stay in full precision", run.model.name, run.bits.name)
        summary["qkv"] = len(hooks)
    if probs is not None:
        targets = {n: a for n, a in quantized.items() if any(hasattr(m, "quant_enabled") for m in a.modules())}
        if not targets:
            raise QKVQuantError(f"method.attn.probs={probs}: no attention of model {run.model.name} has a quantized layer "
                                "to gate it; add qkv to method.layers or set method.attn.probs=null")
        _check_probs_processor(targets)
        cfg = _side_config(str(probs), None, "method.attn.probs")

        def quantizer_for(name, _attn):
            from ditq.quant.quantizer import build_quantizer

            q = build_quantizer(cfg, "act")
            q.name = f"{name}.probs"
            return q

        install(targets, quantizer_for)
        summary["probs"] = len(targets)
        summary["probs_format"] = str(probs)
    log.info("attention quantizers: %s", summary)
    return summary
