"""AdaRound as a method step: BRECQ block reconstruction, segment by segment, with `adaround_block`.

The segments are the block runner's ("pre", blocks 0..n-1, "tail"); every segment holding a layer to
round is reconstructed as a whole (BRECQ), the "pre" and "tail" segments too:
  pre    rows of the calibration records (x, t, y) -> everything the first block receives (its
         hidden input and the call's tensors: PixArt's adaLN vector and projected captions);
  block  rows of the block's hidden input (+ its call) -> the block's output;
  tail   rows of the last block's output (+ call) -> the denoiser's output.
For each one: one FP pass over the segment's inputs gives the targets (the FP segment on the same
inputs), AdaRound learns the rounding of the segment's weights, hardens and freezes it, then one pass
through the (now quantized) segment gives the next segment's inputs (`sequential`, BRECQ / GPTQ's
order; with sequential=false they are the FP model's). Inputs and targets are kept per pass batch
(memory up to `io_budget_mb`, then memory-mapped files, as the block-wise engine does); each
iteration draws `batch_size` random rows across them. The engine's `on_segment` callback hands
statistics, not the segment's inputs and outputs, so this step drives `BlockRunner` itself with the
engine's pieces (`calibration_batches`, `TensorStream`, `full_precision`).

Activations run as configured: dynamic quantizers online, static ones must be fitted before (put
`rtn` first). The step knows no number format (the weight quantizer is the format) and no model
(the adapter's block runner is the model). Records go to `ctx.diagnostics["adaround"]`.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ditq.algorithms.adaround import AdaRoundError, adaround_block
from ditq.methods.base import QuantContext, Step

log = logging.getLogger(__name__)

__all__ = ["AdaRound", "RowSet", "capture_with_grad"]


def capture_with_grad(runner, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    """(first block's hidden input, its positional args, its keyword args) for (x, t, y), like
    `BlockRunner.capture` but differentiable (the "pre" segment's output)."""
    return runner.capture_args(x, t, y)


def _gather(items: list, sizes: list[int], picks: list[torch.Tensor], device):
    """The rows `picks[j]` of every chunk item `items[j]` (a tensor, BlockCall or nested tuple / list /
    dict of them), concatenated. A tensor whose first dim is its chunk's row count is a per-row tensor
    (indexed); anything else is shared by the rows and taken from the first chunk."""
    from ditq.calibration.blocks import BlockCall

    first = items[0]
    if isinstance(first, torch.Tensor):
        if first.ndim >= 1 and all(it.ndim >= 1 and it.shape[0] == n for it, n in zip(items, sizes)):
            parts = [it[p.to(it.device)] for it, p in zip(items, picks)]
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
            return out.to(device) if device is not None else out
        return first.to(device) if device is not None else first
    if isinstance(first, BlockCall):
        n = int(sum(len(p) for p in picks))
        return BlockCall(_gather([c.args for c in items], sizes, picks, device),
                         _gather([c.kwargs for c in items], sizes, picks, device),
                         _gather([c.t for c in items], sizes, picks, None),
                         _gather([c.y for c in items], sizes, picks, None),
                         (n, *first.out_shape[1:]), first.out_dtype)
    if isinstance(first, dict):
        return {k: _gather([it[k] for it in items], sizes, picks, device) for k in first}
    if isinstance(first, (tuple, list)):
        vals = [_gather([it[i] for it in items], sizes, picks, device) for i in range(len(first))]
        return tuple(vals) if isinstance(first, tuple) else vals
    return first


class RowSet:
    """Rows of a segment's inputs or targets, kept as the chunks (pass batches) that produced them."""

    def __init__(self, get: Callable[[int], Any], sizes: list[int], device=None):
        self.get, self.sizes, self.device = get, list(sizes), device
        self.offsets = torch.tensor([0, *torch.tensor(self.sizes).cumsum(0).tolist()])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, rows: torch.Tensor):
        rows = torch.as_tensor(rows, dtype=torch.long).sort().values
        chunk = torch.searchsorted(self.offsets, rows, right=True) - 1
        js = chunk.unique().tolist()
        picks = [rows[chunk == j] - self.offsets[j] for j in js]
        return _gather([self.get(j) for j in js], [self.sizes[j] for j in js], picks, self.device)


def _static_unfitted(qlayers) -> list[str]:
    return [n for n, q in qlayers.items()
            if q.act_quantizer is not None and not q.act_quantizer.cfg.dynamic and not q.act_quantizer.is_fitted]


class AdaRound(Step):
    name = "adaround"

    def check_plan(self, run, adapter, plan) -> None:
        """Before any sampling: a segment runner (else no block reconstruction), and weights to round:
        every layer of the roles AdaRound targets must have a quantized weight."""
        adapter.block_runner()
        if plan is None:
            return
        roles = self.options.roles
        if roles is not None:
            bare = [f"{n} ({lp.role})" for n, lp in plan.layers.items() if lp.role in roles and lp.weight is None]
            if bare:
                raise AdaRoundError(
                    f"adaround targets roles {list(roles)}, but the weights of {len(bare)} of their layers are not "
                    f"quantized (e.g. {', '.join(bare[:3])}): AdaRound rounds weights onto a grid; add the roles to "
                    "method.layers (or give them a weight format in bits / the plan), or drop them from adaround's "
                    "roles"
                )
        elif not any(lp.weight is not None for lp in plan.layers.values()):
            raise AdaRoundError(
                f"adaround rounds weights, but no layer of the plan has a quantized weight (bits={run.bits.name} "
                f"weight={run.bits.weight}); use bits with a weight format or drop the adaround step"
            )

    def _targets(self, ctx: QuantContext) -> dict:
        o = self.options
        picked = {n: q for n, q in ctx.qlayers.items() if o.roles is None or ctx.roles.get(n) in o.roles}
        bare = [n for n, q in picked.items() if q.weight_quantizer is None]
        if o.roles is not None and bare:
            raise AdaRoundError(f"adaround targets roles {list(o.roles)}, but layer(s) {bare[:3]} have no weight "
                                "quantizer (their weights stay in full precision); quantize their weights or drop "
                                "their roles from adaround's roles")
        targets = {n: q for n, q in picked.items() if q.weight_quantizer is not None}
        if not targets:
            raise AdaRoundError("adaround: no layer has a weight quantizer, so there is nothing to round; use bits "
                                "with a weight format or drop the adaround step")
        frozen = [f"{n} (by {q.weight_quantizer.frozen_by})" for n, q in targets.items() if q.weight_quantizer.frozen]
        if frozen:
            raise AdaRoundError(f"adaround: the weight quantizers of {len(frozen)} layers are frozen by an earlier "
                                f"step (e.g. {frozen[0]}), whose values AdaRound would overwrite; keep one of the two "
                                "steps")
        unfitted = _static_unfitted(ctx.qlayers)
        if unfitted:
            raise AdaRoundError(
                f"adaround runs the quantized blocks, but the static activation quantizers of {len(unfitted)} layers "
                f"(e.g. {unfitted[0]}) have no ranges yet: put `{{name: rtn}}` before `{{name: adaround}}` in "
                "method.steps (it fits them on FP calibration inputs) or use dynamic activations"
            )
        return targets

    def apply(self, ctx: QuantContext) -> None:
        from ditq.calibration.blocks import PRE, TAIL, calibration_batches
        from ditq.calibration.engine import TensorStream, full_precision

        o = self.options
        targets = self._targets(ctx)
        records = ctx.calib_records()
        run, adapter = ctx.run, ctx.adapter
        include_uncond = bool(run.calib.include_uncond and run.sampler.cfg_scale > 1)
        runner = adapter.block_runner()
        segments = runner.segment_layers(list(ctx.qlayers))
        batches = list(calibration_batches(records, adapter.null_index, include_uncond, o.pass_batch_size))
        sizes = [len(b[0]) for b in batches]
        device = adapter.device
        budget = int(o.io_budget_mb * 2**20)
        spill_root = Path(ctx.scratch_dir) if ctx.scratch_dir else None
        if spill_root is not None:
            spill_root.mkdir(parents=True, exist_ok=True)
        spill = Path(tempfile.mkdtemp(prefix="adaround_io_", dir=str(spill_root) if spill_root else None))
        all_q = list(ctx.qlayers.values())
        advance_ctx = (lambda: nullcontext()) if o.sequential else (lambda: full_precision(all_q))
        report: dict[str, Any] = {}
        started = time.perf_counter()
        bar = tqdm(total=len(runner.segments()), desc="adaround", unit="segment", disable=not ctx.progress,
                   dynamic_ncols=True, mininterval=2.0)

        def reconstruct(seg, names, forward, target: RowSet, frozen_modules):
            layers = {n: targets[n] for n in names if n in targets}
            if not layers:
                return
            res = adaround_block(
                layers, lambda rows: forward(rows), target.gather, len(target), iters=o.iters,
                batch_size=o.batch_size, lr=o.lr, reg_weight=o.reg_weight, beta_start=o.beta_start,
                beta_end=o.beta_end, warmup=o.warmup, scale_aware=o.scale_aware, rec_loss=o.rec_loss, seed=o.seed,
                log_every=o.log_every, name=_seg_name(seg), frozen_modules=frozen_modules)
            report[str(seg)] = res.to_dict()
            log.info("adaround %s: %d layers, loss nearest %.4g -> hardened %.4g, %.1f s", _seg_name(seg),
                     len(layers), res.loss_nearest, res.loss_final, res.seconds)

        def fp_targets(names, produce):
            """Per pass batch, the FP segment's output (a stream of tensors, or a list of structures)."""
            stream_out, structured = TensorStream(budget, spill), []
            with torch.no_grad(), full_precision([ctx.qlayers[n] for n in names]):
                for j in range(len(batches)):
                    y = produce(j)
                    if not all(bool(torch.isfinite(t).all()) for t in _leaves(y)):
                        raise AdaRoundError(f"adaround: the FP outputs of {_seg_name(seg_now[0])} hold NaN/Inf on "
                                            f"calibration batch {j}; the calibration inputs or the model overflow "
                                            "(fp16?)")
                    if isinstance(y, torch.Tensor):
                        stream_out.append(y)
                    else:
                        structured.append(y)
            return structured if structured else stream_out

        seg_now = [PRE]
        try:
            # -- pre: records -> first block's input and call
            names = segments[PRE]
            if any(n in targets for n in names):
                inputs = RowSet(lambda j: batches[j], sizes, device)

                def capture_fp(j):
                    x, t, y = (v.to(device) for v in batches[j])
                    return capture_with_grad(runner, x, t, y)

                tgt = fp_targets(names, capture_fp)
                reconstruct(PRE, names, lambda rows: capture_with_grad(runner, *inputs.gather(rows)),
                            RowSet(lambda j: tgt[j], sizes, device), [adapter.denoiser])
                del tgt
            stream, calls = TensorStream(budget, spill), []
            with torch.no_grad(), advance_ctx():
                for x, t, y in batches:
                    hidden, call = runner.capture(x.to(device), t.to(device), y.to(device))
                    stream.append(hidden)
                    calls.append(call)
            bar.update(1)
            # -- blocks
            for k in range(runner.num_blocks):
                seg_now[0] = k
                names = segments[k]
                if any(n in targets for n in names):
                    tgt = fp_targets(names, lambda j: runner.run_block(k, stream[j], calls[j]))
                    inputs = RowSet(lambda j: (stream[j], calls[j]), sizes, device)
                    block = runner.blocks[k]

                    def forward(rows, k=k, inputs=inputs):
                        h, call = inputs.gather(rows)
                        return runner.block_forward(k, h, call)

                    reconstruct(k, names, forward, RowSet(lambda j, tgt=tgt: tgt[j], sizes, device), [block])
                    del tgt
                nxt = TensorStream(budget, spill)
                with torch.no_grad(), advance_ctx():
                    for j in range(len(batches)):
                        nxt.append(runner.run_block(k, stream[j], calls[j]))
                stream = nxt
                bar.update(1)
            # -- tail: last block's output -> denoiser output
            seg_now[0] = TAIL
            names = segments[TAIL]
            if any(n in targets for n in names):
                tgt = fp_targets(names, lambda j: runner.finish(stream[j], calls[j]))
                inputs = RowSet(lambda j: (stream[j], calls[j]), sizes, device)

                def forward_tail(rows):
                    h, call = inputs.gather(rows)
                    return runner.tail_forward(h, call)

                reconstruct(TAIL, names, forward_tail, RowSet(lambda j: tgt[j], sizes, device), [adapter.denoiser])
            bar.update(1)
        finally:
            bar.close()
            shutil.rmtree(spill, ignore_errors=True)
        done = {n for seg in report.values() for n in seg["per_layer"]}
        missed = sorted(set(targets) - done)
        if missed:
            raise RuntimeError(f"adaround: layers {missed[:5]} were never reached by the block runner")
        flips = [v["flips"] for seg in report.values() for v in seg["per_layer"].values()]
        ctx.diagnostics["adaround"] = {
            "layers": len(done), "segments": report, "rows": int(sum(sizes)),
            "iters": o.iters, "scale_aware": o.scale_aware, "lr": o.lr, "sequential": o.sequential,
            "mean_flips": round(sum(flips) / len(flips), 6) if flips else 0.0,
            "seconds": round(time.perf_counter() - started, 3),
        }
        log.info("adaround: %d layers in %d segments, %.1f s", len(done), len(report),
                 ctx.diagnostics["adaround"]["seconds"])


def _seg_name(seg) -> str:
    return f"block {seg}" if isinstance(seg, int) else f"segment {seg!r}"


def _leaves(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _leaves(v)]
    return []
