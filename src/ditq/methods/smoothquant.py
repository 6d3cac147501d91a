"""SmoothQuant (Xiao et al., 2023) as a method step: migrate activation outliers into the weights.

Per input channel j of a smoothed layer, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (X: the FP
layer inputs on calibration data, max|X_j| = max(|min_j|, |max_j|) over all calibration rows; W:
the FP weight; q/k/v share one s, with max|W_j| over the three weights). The input is divided by s
and the weight columns multiplied by s, folded exactly into the model (`ditq.methods.fold`):
  qkv   through the block's adaLN linear (scale_msa / shift_msa rows);
  fc1   through the adaLN linear (scale_mlp / shift_mlp rows);
  proj  through V (to_v's output rows / s, to_out.0's columns * s).
fc2 (input after GELU) cannot be folded exactly and ditq's QuantLinear has no online input
transform, so it is not smoothed. Channels with max|X_j| = 0 keep s_j = 1; max|W_j| is floored at
1e-5 and s at 1e-5, as in the reference implementation.

The step must run before any step fits a quantizer (`steps: [smoothquant, rtn]`): it refuses
fitted quantizers on the layers it changes. It edits the denoiser's own FP weights, so the FP model
(`full_precision`) stays the same function. The layer inputs later steps see are the smoothed ones:
the step replaces the in-memory entries (rows, min, max divided by s; new tensors) through
`Lazy.replace`, never re-recording and never touching the cached tensors.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict

import torch

from ditq.methods import fold
from ditq.methods.base import QuantContext, Step

log = logging.getLogger(__name__)

_MIN = 1e-5  # floor of max|W_j| and of s_j (SmoothQuant's reference code)
# smoothed input kind -> (role, layers relative to the block that read that input)
_KINDS = {
    "attn": ("qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    "proj": ("proj", ("attn1.to_out.0",)),
    "mlp": ("fc1", ("ff.net.0.proj",)),
}

_BLOCK_LAYER = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1 - alpha) per channel (float64); 1 where max|X| = 0."""
    x = x_absmax.to(torch.float64)
    w = w_absmax.to(torch.float64).clamp_min(_MIN)
    s = (x.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(_MIN)
    return torch.where(x > 0, s, torch.ones_like(s))


def input_absmax(records: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """max|X_j| over layer-input records {"rows", "min", "max"} (the exact full-data channel range)."""
    return torch.stack([torch.maximum(r["min"].abs(), r["max"].abs()) for r in records]).amax(0)


def weight_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max|W_j| per input column over one or more weights [out, in]."""
    return torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0)


def scaled_record(rec: dict[str, torch.Tensor], s: torch.Tensor) -> dict[str, torch.Tensor]:
    """A new layer-inputs record of X / s (rows, min, max; s > 0 keeps min <= max); `rec` is untouched."""
    out = dict(rec)
    for key in ("rows", "min", "max"):
        out[key] = rec[key] / s.to(dtype=rec[key].dtype, device=rec[key].device)
    return out


class SmoothQuant(Step):
    name = "smoothquant"

    def needs_layer_inputs(self, ctx: QuantContext) -> bool:
        return True

    def apply(self, ctx: QuantContext) -> None:
        groups = self._groups(ctx)
        if not groups:
            log.info("smoothquant: no quantized layer with an activation quantizer in roles %s; nothing to do",
                     list(self.options.roles))
            return
        denoiser = ctx.adapter.denoiser
        for (k, kind), _ in groups.items():  # every check before the first fold: no half-smoothed model
            block = fold.dit_block(denoiser, k)
            touched = ["attn1.to_v", "attn1.to_out.0"] if kind == "proj" else ["norm1.linear", *_KINDS[kind][1]]
            for rel in touched:
                fold.check_unfitted(block.get_submodule(rel), f"transformer_blocks.{k}.{rel}")
        provider = ctx.layer_inputs
        if not hasattr(provider, "replace"):
            raise TypeError("smoothquant: ctx.layer_inputs must be a ditq.calibration.lazy.Lazy (it needs replace()) "
                            "so that later steps see the smoothed layer inputs")
        inputs = provider()
        missing = sorted(n for names in groups.values() for n in names if n not in inputs)
        if missing:
            raise KeyError(f"smoothquant: no calibration inputs recorded for {missing[:5]}")
        new_inputs = dict(inputs)
        summary: dict[str, list[float]] = defaultdict(list)
        alpha = float(self.options.alpha)
        # per block: attn before proj, so q/k/v's scales see to_v's original columns (fold_v_scale edits its rows)
        for (k, kind), names in sorted(groups.items(), key=lambda kv: (kv[0][0], list(_KINDS).index(kv[0][1]))):
            block = fold.dit_block(denoiser, k)
            rel = _KINDS[kind][1]
            weights = [block.get_submodule(r).weight for r in rel]
            s = smooth_scales(input_absmax([inputs[n] for n in names]), weight_absmax(weights), alpha)
            if kind == "proj":
                fold.fold_v_scale(block, s)
            else:
                fold.fold_input_scale(denoiser, k, kind, s)
            for n in names:
                new_inputs[n] = scaled_record(inputs[n], s)
            summary[kind] += [float(s.min()), float(s.max())]
        provider.replace(new_inputs)
        ctx.diagnostics["smoothquant"] = {
            "alpha": alpha, "roles": list(self.options.roles), "smoothed_inputs": len(groups),
            "scale_range": {kind: [min(v), max(v)] for kind, v in summary.items()},
        }
        log.info("smoothquant: alpha %.2f, %d inputs smoothed (%s)", alpha, len(groups),
                 ", ".join(f"{kind}: s in [{min(v):.3g}, {max(v):.3g}]" for kind, v in summary.items()))

    def _groups(self, ctx: QuantContext) -> dict[tuple[int, str], list[str]]:
        """(block, kind) -> names of the quantized layers (with an activation quantizer) reading that input."""
        role_kind = {role: kind for kind, (role, _) in _KINDS.items()}
        out: dict[tuple[int, str], list[str]] = defaultdict(list)
        for name, q in ctx.qlayers.items():
            role = ctx.roles.get(name)
            if role not in self.options.roles or q.act_quantizer is None:
                continue
            kind = role_kind[role]
            m = _BLOCK_LAYER.match(name)
            if m is None or m.group(2) not in _KINDS[kind][1]:
                raise ValueError(f"smoothquant: layer {name} (role {role}) is not a DiT block's {role} layer; "
                                 "smoothing folds scales into DiT (adaLN-Zero) blocks only")
            out[int(m.group(1)), kind].append(name)
        return dict(out)
