"""GPTQ as a method step: Hessians from the block-wise engine, `gptq_quantize` per layer.

The step knows no number format (the layer's weight quantizer is the format) and no model (the
adapter's block runner is the model). The parameters GPTQ used are stored in the weight quantizer
and frozen, so no later step (e.g. `rtn`) re-fits or re-rounds them; GPTQ's quantized values
become the layer's weight source (`set_weight_source`), while `weight` stays the FP weight, so the
FP model (diagnostics, FP layer inputs) is still one `full_precision` away.
"""
from __future__ import annotations

import logging

import torch

from ditq.methods.base import QuantContext, Step

log = logging.getLogger(__name__)


def gptq_layer(q, hessian: torch.Tensor, name: str, **options):
    """GPTQ one quantized layer in place: its (FP) weight under `hessian` with its own weight
    quantizer; the parameters are frozen and the values become the layer's weight source. Returns
    the `GPTQResult`. `options`: block_size, percdamp, act_order, static_groups."""
    from ditq.algorithms.gptq import gptq_quantize

    w = q.weight.detach()
    # gptq_quantize leaves H intact: shared Hessians (q/k/v, memoised grids) stay valid
    res = gptq_quantize(w.reshape(w.shape[0], -1), hessian, q.weight_quantizer, name=name, **options)
    q.weight_quantizer.set_params(res.params, freeze=True, frozen_by="gptq")
    q.set_weight_source(res.weight.reshape(w.shape))
    return res


class GPTQ(Step):
    name = "gptq"

    def check_plan(self, run, adapter, plan) -> None:
        """Block-wise calibration needs a segment runner (a chain of blocks, or the U-Net's runner with
        its skip stack): a model without one (Hunyuan-DiT's long skips) is refused here, before any sampling."""
        adapter.block_runner()

    def apply(self, ctx: QuantContext) -> None:
        from ditq.calibration.engine import BlockwiseEngine

        o = self.options
        targets = {n: q for n, q in ctx.qlayers.items() if q.weight_quantizer is not None}
        if not targets:
            log.info("gptq: no layer has a weight quantizer; nothing to do")
            return
        self._check_before_work(ctx, targets)
        records = ctx.calib_records()
        self._check_records(records, ctx.timesteps)
        run = ctx.run
        include_uncond = bool(run.calib.include_uncond and run.sampler.cfg_scale > 1)
        conditions = ctx.adapter.conditions  # class models: every label; text: the calibration prompts
        labels = conditions.grid(records["y"]).tolist() + ([conditions.null_index] if include_uncond else [])
        per_layer: dict[str, dict] = {}

        def on_segment(segment, names, stats):
            for n in names:
                q = targets.get(n)
                if q is None:
                    continue
                res = gptq_layer(q, stats.hessian(n), n, block_size=o.block_size, percdamp=o.percdamp,
                                 act_order=o.act_order, static_groups=o.static_groups)
                per_layer[n] = {"segment": str(segment), "rows": stats.rows_seen(n), "loss": res.loss,
                                "dead_columns": res.dead_columns, "damping": res.damping,
                                "hessian_shared_with": stats.owner(n) if stats.owner(n) != n else None}

        engine = BlockwiseEngine(
            ctx.adapter, ctx.qlayers, records, include_uncond=include_uncond, batch_size=o.batch_size,
            sequential=o.sequential, grid_timesteps=list(ctx.timesteps) if o.conditioning_grid else None,
            grid_labels=labels, io_budget_mb=o.io_budget_mb, spill_root=ctx.scratch_dir, progress=ctx.progress,
            desc="gptq",
        )
        report = engine.run(on_segment)
        missed = sorted(set(targets) - set(per_layer))
        if missed:
            raise RuntimeError(f"gptq: layers {missed[:5]} were never reached by the block runner")
        report["layers"] = len(per_layer)
        report["dead_columns"] = sum(v["dead_columns"] for v in per_layer.values())
        ctx.diagnostics["gptq"] = {**report, "per_layer": per_layer}
        log.info("gptq: %d layers, %d block forwards, %.1f s", len(per_layer), report["block_forwards"],
                 report["seconds"])

    def _check_before_work(self, ctx: QuantContext, targets) -> None:
        """Static activation quantizers must have ranges before the sequential pass runs them."""
        if not self.options.sequential:
            return
        unfitted = [n for n, q in ctx.qlayers.items()
                    if q.act_quantizer is not None and not q.act_quantizer.cfg.dynamic
                    and not q.act_quantizer.is_fitted]
        if unfitted:
            raise ValueError(
                f"gptq (sequential) runs the quantized blocks, but the static activation quantizers of "
                f"{len(unfitted)} layers (e.g. {unfitted[0]}) have no ranges yet: put `{{name: rtn}}` before "
                "`{name: gptq}` in method.steps (it fits them on FP calibration inputs), use dynamic "
                "activations, or set sequential: false"
            )

    @staticmethod
    def _check_records(records: dict, timesteps: list[int]) -> None:
        if timesteps:
            foreign = sorted(set(records["t"].tolist()) - set(int(t) for t in timesteps))
            if foreign:
                raise ValueError(
                    f"gptq: the calibration records hold timesteps {foreign[:5]} that the run's sampler never "
                    "uses: they were recorded with another sampler; delete that calibration cache entry or "
                    "calibrate with the run's sampler"
                )
