"""Hadamard rotation of layer inputs (HQ-DiT's "universal identity transform") as a method step.

Two kinds of rotation, both exact for the full-precision model (float64 folds):

  online   the input of a quantized layer is rotated at every forward, x -> x R (R orthogonal:
           random signs times a Hadamard matrix, `ditq.quant.hadamard.Rotation`), and R is folded
           into the weight, W -> W R, so x R (W R)^T = x W^T. Works for any Linear or Conv2d (a conv
           rotates its channels). Layers that read the same tensor (q, k and v of a self-attention)
           share one rotation, so their input is rotated and quantized once. Found by one probe
           forward (`shared_inputs`), not by names.
  heads    V and the attention output projection (role `proj`): per head h, V_h -> V_h R_h folded into
           to_v's output rows (W_v -> R^T W_v, b_v -> R^T b_v per head), and R_h into to_out.0's
           columns (W_o -> W_o blockdiag(R_h)). Attention mixes tokens, not the channels of a head,
           so proj's input is rotated at no online cost.

The residual stream is not rotated: DiT's LayerNorm + adaLN modulation (per-channel scale and shift)
does not commute with a rotation.

DiT-XL/2's widths are not powers of two (1152 = 9 x 2^7, 4608 = 9 x 2^9, head 72); `Rotation` builds
Hadamard matrices of these orders as Kronecker products (see ditq.quant.hadamard) and falls back to a
seeded random orthogonal matrix, with a warning, for a width it has no construction for
(`fallback: error` refuses instead, before any sampling).

The step must run before anything fits a quantizer or records calibration inputs (the config
checks that `rotate` leads method.steps; fitted quantizers are refused here too): the pipeline
records the layer inputs after it, of the rotated model, keyed by the step's options.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, defaultdict

import torch
import torch.nn as nn

from ditq.methods import fold
from ditq.methods.base import QuantContext, Step

log = logging.getLogger(__name__)


def derived_seed(seed: int, key: str) -> int:
    """A per-rotation seed from the step's seed and a layer name (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def input_width(layer: nn.Module) -> int:
    return int(layer.weight.shape[1])  # Linear [out, in]; Conv2d [out, in, kh, kw]: the channels rotated


@torch.no_grad()
def rotate_input(layer: nn.Module, rotation: nn.Module, name: str = "") -> None:
    """Rotate `layer`'s input online with `rotation` (x -> x R) and fold R into its weight (W -> W R).
    `layer` must be a QuantLinear / QuantConv2d (it applies the transform); refused when its
    quantizers were already fitted (the grid would belong to the old weight) or it is rotated already."""
    name = name or getattr(layer, "name", "") or type(layer).__name__
    if not hasattr(layer, "transform_input"):
        raise fold.FoldError(f"layer {name} is a plain {type(layer).__name__}: an online rotation needs a quantized "
                             "layer (QuantLinear / QuantConv2d) to apply it; quantize the layer (method.layers)")
    if layer.input_transform is not None:
        raise fold.FoldError(f"layer {name} already rotates its input; rotate each layer once")
    fold.check_unfitted(layer, name)
    width = input_width(layer)
    if getattr(rotation, "n", width) != width:
        raise fold.FoldError(f"layer {name}: a rotation of width {rotation.n} for an input of {width} channels")
    r = rotation.matrix(torch.float64).cpu()
    w = fold.as_f64(layer.weight)
    w = torch.einsum("oikl,ij->ojkl", w, r) if w.ndim == 4 else w @ r
    fold.set_param(layer.weight, w)
    layer.input_transform = rotation.to(device=layer.weight.device)
    fold.drop_cached_weights([layer])


def attention_of(denoiser: nn.Module, proj_name: str) -> tuple[nn.Module, str]:
    """The attention module whose output projection is `proj_name` (diffusers: `<attn>.to_out.0`)."""
    parent = proj_name.rsplit(".", 2)[0] if proj_name.endswith(".to_out.0") else None
    attn = None if parent is None else denoiser.get_submodule(parent)
    if attn is None or not all(hasattr(attn, a) for a in ("to_v", "to_out", "heads")):
        raise fold.FoldError(f"layer {proj_name} (role proj) is not the output projection `to_out.0` of a diffusers "
                             "Attention with `to_v` and `heads`: the per-head rotation cannot be folded there; "
                             "set head_rotation: false in the rotate step")
    return attn, parent


def head_dim(attn: nn.Module, where: str) -> int:
    v, out = attn.to_v, attn.to_out[0]
    width = int(v.weight.shape[0])
    if width % int(attn.heads) or int(out.weight.shape[1]) != width:
        raise fold.FoldError(f"{where}: to_v has {width} outputs for {attn.heads} heads and to_out.0 reads "
                             f"{int(out.weight.shape[1])} channels; a per-head rotation needs to_v's outputs split "
                             "evenly into heads and read whole by to_out.0")
    if getattr(attn, "spatial_norm", None) is not None:
        raise fold.FoldError(f"{where}: the attention has a spatial norm; rotating V would not be exact")
    return width // int(attn.heads)


@torch.no_grad()
def rotate_heads(attn: nn.Module, rotation: nn.Module, where: str = "attention") -> None:
    """V_h -> V_h R per head (to_v's output rows, weight and bias) and to_out.0's columns W_o[:, h] R:
    the attention computes the same function and to_out.0 reads a rotated input (module doc)."""
    d = head_dim(attn, where)
    if getattr(rotation, "n", d) != d:
        raise fold.FoldError(f"{where}: a head rotation of width {rotation.n} for heads of {d} channels")
    v, out = attn.to_v, attn.to_out[0]
    for m, n in ((v, f"{where}.to_v"), (out, f"{where}.to_out.0")):
        fold.check_unfitted(m, n)
    fold.check_no_input_transform(out, f"{where}.to_out.0")
    r = rotation.matrix(torch.float64).cpu()
    heads = int(attn.heads)
    wv = fold.as_f64(v.weight)
    wv = torch.einsum("ji,hjk->hik", r, wv.reshape(heads, d, -1)).reshape(wv.shape)
    fold.set_param(v.weight, wv)
    if v.bias is not None:
        fold.set_param(v.bias, torch.einsum("ji,hj->hi", r, fold.as_f64(v.bias).reshape(heads, d)).reshape(-1))
    wo = fold.as_f64(out.weight)
    fold.set_param(out.weight, torch.einsum("ohj,ji->ohi", wo.reshape(wo.shape[0], heads, d), r).reshape(wo.shape))
    fold.drop_cached_weights([v, out])


@torch.no_grad()
def shared_inputs(adapter, qlayers: dict[str, nn.Module], names: list[str]) -> list[list[str]]:
    """`names` grouped by the tensor they read in one probe forward of the FP model (q, k and v of a
    self-attention read one tensor). A layer that never runs is an error naming it."""
    from ditq.methods.wrap import full_precision

    seen: dict[str, tuple[int, torch.Tensor]] = {}
    keep: list[torch.Tensor] = []  # keep inputs alive so their ids are not reused within the probe

    def hook_for(name):
        def hook(module, args):
            if name not in seen:
                keep.append(args[0])
                seen[name] = (id(args[0]), args[0])
        return hook

    handles = [qlayers[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with full_precision(qlayers):
            dev = getattr(adapter, "device", "cpu")
            x = torch.zeros((1, *adapter.latent_shape), device=dev, dtype=getattr(adapter, "dtype", torch.float32))
            t = torch.tensor([0], device=dev)
            null = adapter.null_index
            y = torch.tensor([0 if null is None else null], device=dev)
            adapter.denoise(x, t, y)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise RuntimeError(f"rotate: layers {missing[:5]} did not run in a probe forward of the model; an online "
                           "rotation needs to know which layers read the same input")
    groups: dict[int, list[str]] = defaultdict(list)
    for n in names:
        groups[seen[n][0]].append(n)
    return list(groups.values())


class Rotate(Step):
    name = "rotate"
    transforms_model = True  # runs before the layer inputs are recorded (the pipeline keys them by it)

    def _rotation(self, width: int, key: str):
        from ditq.quant.hadamard import Rotation

        o = self.options
        return Rotation(width, seed=derived_seed(o.seed, key), random_signs=o.random_signs, fallback=o.fallback)

    def transform_spec(self) -> dict:
        """What this step does to the model, for the keys of caches recorded after it."""
        from dataclasses import asdict

        return {"step": self.name, "options": asdict(self.options)}

    def _online(self, roles: dict[str, str], names) -> list[str]:
        return [n for n in names if roles.get(n) in self.options.roles]

    def _heads(self, roles: dict[str, str], names) -> list[str]:
        # the attention output projections (diffusers: <attn>.to_out.0); other proj-role layers (Hunyuan-DiT's
        # skip_linear) are not per-head and keep only their online rotation, if any
        return [n for n in names if roles.get(n) == "proj" and n.endswith(".to_out.0")] if self.options.head_rotation else []

    def check_plan(self, run, adapter, plan) -> None:
        """Structure and widths, before any sampling: head rotations need diffusers attentions, and
        with fallback=error every width needs a Hadamard construction."""
        from ditq.quant.hadamard import RotationError, hadamard_factors

        quantized = plan.quantized()
        roles = {n: lp.role for n, lp in quantized.items()}
        widths = {}
        for n in self._online(roles, quantized):
            widths[input_width(adapter.denoiser.get_submodule(n))] = n
        for n in self._heads(roles, quantized):
            attn, parent = attention_of(adapter.denoiser, n)
            widths[head_dim(attn, parent)] = f"{parent} (heads)"
        if self.options.fallback == "error":
            bad = {w: n for w, n in widths.items() if hadamard_factors(w) is None}
            if bad:
                raise RotationError(
                    "rotate: no Hadamard construction is known for the width(s) "
                    + ", ".join(f"{w} (input of {n})" for w, n in sorted(bad.items()))
                    + "; set fallback: random in the rotate step (a seeded random orthogonal matrix) or drop those roles")

    def apply(self, ctx: QuantContext) -> None:
        start = time.perf_counter()
        online = self._online(ctx.roles, ctx.qlayers)
        heads = self._heads(ctx.roles, ctx.qlayers)
        skipped = sorted(set(self.options.roles) - set(ctx.roles[n] for n in online))
        if skipped:
            log.info("rotate: no quantized layer of role(s) %s (method.layers); their inputs stay unrotated", skipped)
        # every check before the first fold: no half-rotated model
        for n in online:
            fold.check_unfitted(ctx.qlayers[n], n)
        attns = {n: attention_of(ctx.adapter.denoiser, n) for n in heads}
        for n, (attn, parent) in attns.items():
            head_dim(attn, parent)
            for rel in ("to_v", "to_out.0"):
                fold.check_unfitted(attn.get_submodule(rel), f"{parent}.{rel}")
        kinds: Counter = Counter()
        described: dict[str, str] = {}
        for n, (attn, parent) in attns.items():  # before the online folds: to_out.0 must not rotate its input yet
            rot = self._rotation(head_dim(attn, parent), f"{parent}:heads")
            rotate_heads(attn, rot, parent)
            kinds[rot.kind] += 1
            described[f"heads {rot.n}"] = rot.describe()
        groups = shared_inputs(ctx.adapter, ctx.qlayers, online) if online else []
        per_role: Counter = Counter()
        for group in groups:
            rot = self._rotation(input_width(ctx.qlayers[group[0]]), group[0])
            for n in group:
                rotate_input(ctx.qlayers[n], rot, n)
            per_role[ctx.roles[group[0]]] += 1
            kinds[rot.kind] += 1
            described[f"input {rot.n}"] = rot.describe()
        seconds = time.perf_counter() - start
        ctx.diagnostics["rotate"] = {
            "online_inputs": dict(per_role), "online_layers": len(online), "head_rotations": len(heads),
            "kinds": dict(kinds), "rotations": described, "seconds": round(seconds, 3),
        }
        log.info("rotate: %d online input rotations (%s) over %d layers, %d attentions rotated per head; %s (%.1f s)",
                 len(groups), ", ".join(f"{r}: {c}" for r, c in sorted(per_role.items())) or "none", len(online),
                 len(heads), "; ".join(f"{k}: {v}" for k, v in sorted(described.items())), seconds)
