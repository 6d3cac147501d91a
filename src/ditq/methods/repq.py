"""RepQ-ViT (Li et al., ICCV 2023) as a ditq step, adapted to DiT's adaLN-Zero blocks.

(a) Post-LayerNorm activations: quantized per channel at calibration, then reparameterised to one
    per-tensor grid. Per channel c the layer's activation quantizer config (format, range rule,
    asymmetric) fitted per channel on the FP calibration inputs gives scale s_c and zero point z_c;
    the tensor grid is s~ = mean(s_c), z~ = round(mean(z_c)) (RepQ-ViT takes the plain mean of the
    zero points; rounding it keeps the equivalence exact on an integer grid), and
        r_c = s_c / s~,   b_c = s~ (z~ - z_c),   x' = x / r - b.
    Quantizing x' on (s~, z~) then gives exactly the per-channel grid of x (x'/s~ + z~ = x/s_c + z_c),
    so the activation quantizer gets (s~, z~), frozen by "repq" (a later `rtn` keeps it).
    DiT's LayerNorms have no affine: the modulation x = LN(h) (1 + scale) + shift comes from the
    block's adaLN linear (`norm1.linear`, 6 chunks: shift_msa, scale_msa, gate_msa, shift_mlp,
    scale_mlp, gate_mlp; diffusers' AdaLayerNormZero / BasicTransformerBlock), so the division folds
    into the rows of that linear, exactly:
        scale' = (1 + scale) / r - 1  (rows W/r, bias (bias + 1)/r - 1),  shift' = shift / r - b  (rows W/r, bias/r - b)
    and the consumers (to_q/to_k/to_v after norm1; ff.net.0.proj after norm3) take it back:
        W' = W diag(r),  bias' = bias + W' b.
    The division by r is `ditq.methods.fold.fold_input_scale` (shared with SmoothQuant); the shift b is
    folded here. The FP function is unchanged (float32 rounding). The FP layer inputs are replaced
    (`Lazy.replace`, new tensors; the cached ones are never written) by x', so later steps see x'.
(b) Post-softmax: every block's self-attention gets a `ditq.quant.attention.QuantAttnProcessor` with a
    `Log2Quantizer` of the attention probabilities (scale fixed to 1), at the bit width of the
    attention's input activation quantizer. `softmax_grid: log_sqrt2` (default) puts them on
    RepQ-ViT's values 2^(-k/2): its log-sqrt2 quantizer "reparameterised to log2" is a shift plus a
    sqrt(2) scale of the odd codes, the same values; `log2` is the coarser plain 2^-k grid (on the
    embedded model it dominates the W8A8 error). It is gated on the attention's quantized layers, so
    `full_precision(...)` turns it off with them.
Not done (RepQ-ViT quantizes them, Q-DiT's layer set does not): the matmul inputs Q, K and V.
Run it before any step that fits weights (`steps: [repq, rtn]`): it changes weights and biases.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ditq.methods import fold
from ditq.methods.base import QuantContext, Step

log = logging.getLogger(__name__)

# site -> (shift chunk, scale chunk) in AdaLayerNormZero's order (ditq.methods.fold.ADALN_CHUNKS)
CHUNKS = {k: (fold.ADALN_CHUNKS.index(v[0]), fold.ADALN_CHUNKS.index(v[1])) for k, v in fold.FOLD_TARGETS.items()}


class RepQError(ValueError):
    """A model or quantizer setup that RepQ's reparameterisation cannot handle; the message says how to fix it."""


@dataclass
class Site:
    """One post-norm activation: produced by the adaLN chunks (shift, scale), read by `consumers`."""

    block: int
    kind: str  # "attn" (after norm1) or "mlp" (after norm3)
    adaln: str  # name of the block's adaLN linear
    shift: int
    scale: int
    consumers: list[str]


# ----------------------------------------------------------------------------- the model's sites
def post_norm_sites(adapter) -> list[Site]:
    """The two post-norm activations of every DiT block; RepQError for any other block structure."""
    from diffusers.models.normalization import AdaLayerNormZero

    denoiser = adapter.denoiser
    names = {id(m): n for n, m in denoiser.named_modules()}
    blocks = adapter.blocks()
    if not blocks:
        raise RepQError(f"repq: the model adapter {type(adapter).__name__} lists no transformer blocks; the "
                        "reparameterisation knows DiT's adaLN-Zero blocks (diffusers BasicTransformerBlock)")
    sites = []
    for i, block in enumerate(blocks):
        problem = None
        if getattr(block, "norm_type", None) != "ada_norm_zero" or not isinstance(block.norm1, AdaLayerNormZero):
            problem = f"norm_type={getattr(block, 'norm_type', None)!r}, norm1={type(getattr(block, 'norm1', None)).__name__}"
        elif block.pos_embed is not None or block.attn2 is not None or block.norm3 is None:
            problem = "a positional embedding, cross-attention or no norm3 between the norms and their consumers"
        elif block.attn1.spatial_norm is not None or block.attn1.group_norm is not None:
            problem = "attn1 normalises its input again (spatial_norm / group_norm)"
        elif not hasattr(block.ff.net[0], "proj"):
            problem = f"ff.net.0 is {type(block.ff.net[0]).__name__} without a proj linear"
        if problem:
            raise RepQError(f"repq: block {i} ({type(block).__name__}) is not a DiT adaLN-Zero block ({problem}); "
                            "the reparameterisation folds into AdaLayerNormZero's linear and knows only that layout")
        lin = names[id(block.norm1.linear)]
        attn = [names[id(m)] for m in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v)]
        sites.append(Site(i, "attn", lin, *CHUNKS["attn"], attn))
        sites.append(Site(i, "mlp", lin, *CHUNKS["mlp"], [names[id(block.ff.net[0].proj)]]))
    return sites


# ----------------------------------------------------------------------------- the arithmetic
@torch.no_grad()
def channel_params(act_quantizer, record: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s [C], z [C] or None) of the per-channel version of `act_quantizer`'s config, fitted on a
    layer-inputs record {"rows", "min", "max"} (minmax from the exact range, percentile/MSE from rows)."""
    from ditq.quant.quantizer import build_quantizer

    per_channel = build_quantizer(dataclasses.replace(act_quantizer.cfg, granularity="per_channel"), "act")
    per_channel.fit(record["rows"], data_range=(record["min"], record["max"]))
    return per_channel.scale, per_channel.zero_point


def reparam_params(s: torch.Tensor, z: torch.Tensor | None):
    """(r [C], b [C], s~, z~) of the module doc; b = 0 and z~ = None for a symmetric grid."""
    s = s.double()
    s_t = s.mean()
    r = s / s_t
    if z is None:
        return r, torch.zeros_like(r), s_t, None
    z = z.double()
    z_t = z.mean().round()
    return r, s_t * (z_t - z), s_t, z_t


def transform_record(record: dict, r: torch.Tensor, b: torch.Tensor) -> dict:
    """The record of x' = x / r - b (new tensors; r > 0 keeps min and max in place)."""
    f = lambda t: (t.double() / r - b).to(t.dtype)  # noqa: E731
    return {**record, "rows": f(record["rows"]), "min": f(record["min"]), "max": f(record["max"])}


@torch.no_grad()
def fold_site(adapter, site: Site, r: torch.Tensor, b: torch.Tensor) -> None:
    """Make the site's activation x / r - b, the FP function unchanged: the division by r through
    `ditq.methods.fold.fold_input_scale` (adaLN shift/scale rows / r, consumers' columns * r), then the
    shift: the adaLN shift rows' bias - b, the consumers' bias + W' b (W' the scaled weight). Float64
    math, new tensors (never written in place)."""
    fold.fold_input_scale(adapter, site.block, site.kind, r)
    denoiser = adapter.denoiser
    lin = denoiser.get_submodule(site.adaln)
    d = r.numel()
    shift = slice(site.shift * d, (site.shift + 1) * d)
    b = b.to(device="cpu", dtype=torch.float64)
    bias = fold.as_f64(lin.bias)
    bias[shift] -= b
    lin.bias.data = bias.to(device=lin.bias.device, dtype=lin.bias.dtype)
    for name in site.consumers:
        layer = denoiser.get_submodule(name)
        w = fold.as_f64(layer.weight)
        new = (fold.as_f64(layer.bias) if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)) + w @ b
        new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new, requires_grad=False)
        else:
            layer.bias.data = new


# ----------------------------------------------------------------------------- the step
class RepQ(Step):
    name = "repq"

    def _plan(self, ctx: QuantContext) -> list[tuple[Site, list[str]]]:
        """(site, its quantized consumers that have an activation quantizer) for every site to
        reparameterise; RepQError for setups it cannot handle (checked before any calibration)."""
        if not self.options.reparam:
            return []
        out, problems = [], []
        for site in post_norm_sites(ctx.adapter):
            quant = [n for n in site.consumers if n in ctx.qlayers and ctx.qlayers[n].act_quantizer is not None]
            if not quant:
                continue  # the activation stays FP: nothing to equalise
            cfgs = {n: ctx.qlayers[n].act_quantizer.cfg for n in quant}
            first = cfgs[quant[0]]
            spec = ctx.qlayers[quant[0]].act_quantizer.spec
            if first.dynamic or first.granularity != "per_tensor" or spec.is_block:
                problems.append(f"{quant[0]} has act {ctx.qlayers[quant[0]].act_quantizer.describe()}")
            elif any(c != first for c in cfgs.values()):
                problems.append(f"{', '.join(quant)} read one activation with different act quantizer configs")
            out.append((site, quant))
        if problems:
            raise RepQError(
                "repq: the reparameterisation turns a per-channel grid into one static per-tensor activation "
                f"quantizer per post-norm activation, but {'; '.join(problems)}. Use a static per_tensor, "
                "non-block activation format (method.act.granularity=per_tensor method.act.dynamic=false), or "
                "the step option reparam: false"
            )
        return out

    def _check_order(self, ctx: QuantContext, plan) -> None:
        touched = {n for site, _ in plan for n in [site.adaln, *site.consumers]}
        early = []
        for n in sorted(touched & set(ctx.qlayers)):
            q = ctx.qlayers[n]
            for side, qz in (("weight", q.weight_quantizer), ("act", q.act_quantizer)):
                if qz is not None and (qz.is_fitted or qz.frozen):
                    early.append(f"{n} {side}")
            if q.weight_source is not None:
                early.append(f"{n} weight source")
        if early:
            raise RepQError(
                f"repq changes weights, biases and activation grids, but earlier steps already fitted "
                f"{', '.join(early[:6])}{' ...' if len(early) > 6 else ''}; put repq first in method.steps "
                "(e.g. steps: [{name: repq}, {name: rtn}])"
            )

    def _softmax_bits(self, ctx: QuantContext) -> dict[str, int | None]:
        """{attention name: log2 bits or None (FP)} of every block's self-attention."""
        from ditq.quant.attention import attention_modules

        if not self.options.softmax:
            return {}
        out = {}
        for name, attn in attention_modules(ctx.adapter.denoiser).items():
            if self.options.softmax_bits is not None:
                out[name] = int(self.options.softmax_bits)
                continue
            aqs = [m.act_quantizer for m in (attn.to_q, attn.to_k, attn.to_v) if getattr(m, "act_quantizer", None)]
            out[name] = aqs[0].spec.bits if aqs else None
        return out

    def _check(self, ctx: QuantContext):
        from ditq.quant.attention import attention_modules, layer_gate

        plan = self._plan(ctx)
        self._check_order(ctx, plan)
        bits = self._softmax_bits(ctx)
        attns = attention_modules(ctx.adapter.denoiser)
        for name, b in bits.items():
            if b is not None:
                try:
                    layer_gate(attns[name], name)
                except ValueError as err:
                    raise RepQError(f"repq: {err} (step option softmax: false)") from None
        return plan, bits

    def needs_layer_inputs(self, ctx: QuantContext) -> bool:
        plan, _ = self._check(ctx)  # every setup error before calibration starts
        return bool(plan)

    def apply(self, ctx: QuantContext) -> None:
        from ditq.quant.attention import attention_modules, install
        from ditq.quant.log2 import Log2Quantizer

        plan, bits = self._check(ctx)
        report = {"sites": len(plan)}
        if plan and not callable(getattr(ctx.layer_inputs, "replace", None)):
            raise RepQError("repq: ctx.layer_inputs has no replace(value), so later steps could not see the "
                            "transformed inputs; provide them through ditq.calibration.lazy.Lazy")
        if plan:
            inputs = dict(ctx.layer_inputs())  # a new dict: entries are replaced, the cached tensors untouched
            ratios = []
            for site, quant in plan:
                rec = inputs[quant[0]]
                aq0 = ctx.qlayers[quant[0]].act_quantizer
                s, z = channel_params(aq0, rec)
                r, b, s_t, z_t = reparam_params(s.cpu(), None if z is None else z.cpu())
                fold_site(ctx.adapter, site, r, b)
                for n in site.consumers:
                    if n in inputs:  # new tensors under the same key: later steps see x'
                        inputs[n] = transform_record(inputs[n], r.to(inputs[n]["rows"].device),
                                                     b.to(inputs[n]["rows"].device))
                for n in quant:
                    dev = ctx.qlayers[n].weight.device
                    _set_tensor_grid(ctx.qlayers[n].act_quantizer, s_t.to(dev), None if z_t is None else z_t.to(dev))
                ratios.append(r)
            ctx.layer_inputs.replace(inputs)
            r_all = torch.cat(ratios)
            report.update(r_min=float(r_all.min()), r_max=float(r_all.max()))
            log.info("repq: reparameterised %d post-norm activations (channel ratios %.3g .. %.3g)",
                     len(plan), report["r_min"], report["r_max"])
        wanted = {n: b for n, b in bits.items() if b is not None}
        if wanted:
            attns = attention_modules(ctx.adapter.denoiser)
            sqrt2 = self.options.softmax_grid == "log_sqrt2"
            install({n: attns[n] for n in wanted}, lambda n, _a: Log2Quantizer(wanted[n], scale=1.0, sqrt2=sqrt2))
            report["softmax_bits"] = sorted(set(wanted.values()))
            report["softmax_grid"] = self.options.softmax_grid
            log.info("repq: %s softmax quantizer (%s bits) in %d attention(s)", self.options.softmax_grid,
                     "/".join(map(str, report["softmax_bits"])), len(wanted))
        ctx.diagnostics["repq"] = report


def _set_tensor_grid(aq, s_t: torch.Tensor, z_t: torch.Tensor | None) -> None:
    from ditq.quant.quantizer import QParams

    scale = s_t.to(torch.float32)
    zp = None if z_t is None else z_t.to(torch.float32)
    aq.set_params(QParams(scale, zp), freeze=True, frozen_by="repq")
