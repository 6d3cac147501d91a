"""TALoRA + DFA (MSFP) as a method step: timestep-aware LoRA branches on every quantized layer, trained
against the FP model's outputs with the denoising-factor-weighted loss.

1. A router (`ditq.quant.lora.Router`: learned or a fixed partition of the sampler's timesteps) on the
   denoiser, a `LoRABranch` with K branches of rank r on every quantized layer (their output slot), and
   the timestep hooks on the denoiser (every row's timestep reaches the layers).
2. The calibration records (x_t, t, y along FP trajectories; with guidance and `calib.include_uncond`
   each pass batch also holds the rows' unconditional twins, stacked as guidance stacks them) and, once,
   the FP model's outputs on them (`full_precision`: quantizers and branches off).
3. `algorithms.finetune`: Adam on the LoRA (and learned router) weights only (the quantizers and every
   other weight frozen; put talora after rtn / gptq), loss = mean over rows of w_t * MSE(eps_q, eps_fp),
   w_t = DFA weight of the row's timestep (`sampling.denoising_factor`: |gamma_t|^p, mean 1 over the
   sampler's timesteps; 1 with dfa=false); checkpointed (resume to identical weights).
4. After training: weights rounded to fp16 when lora_bits=16, frozen, left installed (sampling uses
   them; they are submodules of the denoiser, so the row's model size counts them at `lora_bits`),
   saved to `<output_dir>/talora.pt` with their spec; per-timestep errors before / after, the loss curve
   and the branch of every sampler timestep in `ctx.diagnostics["talora"]`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ditq.methods.base import QuantContext, Step

log = logging.getLogger(__name__)

__all__ = ["TALoRA", "TALoRAError", "TALORA_VERSION", "load_talora"]

TALORA_VERSION = 1
# options that do not change what training produces (not part of the checkpoint spec)
_NOT_IN_SPEC = ("checkpoint", "checkpoint_every", "log_every", "pass_batch_size")


class TALoRAError(ValueError):
    """TALoRA settings that cannot work with this run."""


def _plain(obj) -> Any:
    """Config node / namespace / dataclass -> JSON-able data (for specs)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return {k: _plain(v) for k, v in vars(obj).items() if not k.startswith("_")}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _steps_before(run) -> list:
    steps = _plain(getattr(getattr(run, "method", None), "steps", None)) or []
    names = [s.get("name") for s in steps]
    return steps[: names.index("talora")] if "talora" in names else steps


class TALoRA(Step):
    name = "talora"

    # -- before any work ----------------------------------------------------------------------------
    def check_plan(self, run, adapter, plan) -> None:
        from ditq.sampling import Sampler

        o = self.options
        names = [s.get("name") for s in run.method.steps]
        if names.count("talora") > 1:
            raise TALoRAError("method.steps holds talora twice; LoRA branches can be installed once")
        after = names[names.index("talora") + 1:] if "talora" in names else []
        if after:
            raise TALoRAError(f"method.steps runs {after} after talora; the LoRA branches are trained for the quantizers "
                              "as they are when talora runs, so talora must be the last step (move it to the end)")
        n = len(Sampler(adapter, run.sampler, clip_sample=run.model.clip_sample).timesteps())
        if o.branches > n:
            raise TALoRAError(
                f"talora: a router with branches={o.branches} over the sampler's {n} timesteps "
                f"(sampler={run.sampler.name}, num_steps={run.sampler.num_steps}) leaves branches without a timestep; "
                f"use branches <= {n}")
        if plan is not None and not plan.quantized():
            raise TALoRAError("talora adds LoRA branches to quantized layers, but the plan quantizes no layer")

    # -- helpers --------------------------------------------------------------------------------------
    def spec(self, ctx: QuantContext, records: dict) -> dict:
        """What the trained LoRA depends on: model, quantizers (plan + the steps before), data, options."""
        services = ctx.services
        model_fp = getattr(services, "model_fp", None) or ctx.adapter.fingerprint()
        run = ctx.run
        t = records["t"].to(torch.int64).cpu().numpy().tobytes()
        return {
            "v": TALORA_VERSION,
            "model": _plain(model_fp),
            "plan": ctx.plan.digest() if ctx.plan is not None else sorted(ctx.qlayers),
            "steps_before": _steps_before(run),
            "calib": _plain(getattr(run, "calib", None)),
            "sampler": _plain(getattr(run, "sampler", None)),
            "records": {"rows": int(len(records["x"])), "t_sha256": hashlib.sha256(t).hexdigest()[:16]},
            "options": {k: v for k, v in asdict(self.options).items() if k not in _NOT_IN_SPEC},
        }

    def _checkpointer(self, ctx: QuantContext, spec: dict):
        from ditq.algorithms.finetune import Checkpointer

        o = self.options
        if o.checkpoint:
            return Checkpointer(o.checkpoint, spec, explicit=True)
        if not ctx.scratch_dir:
            return None
        # keyed by the whole spec: every configuration (a sweep's ablations too) resumes its own checkpoint; a file
        # under the key with another spec (a changed spec format) is logged and replaced
        from ditq.utils.cache import content_key

        return Checkpointer(Path(ctx.scratch_dir) / "talora" / content_key(spec, 20) / "checkpoint.pt", spec,
                            explicit=False)

    def _check_layers(self, ctx: QuantContext) -> None:
        unfitted = [n for n, q in ctx.qlayers.items() if q.act_quantizer is not None
                    and not q.act_quantizer.cfg.dynamic and not q.act_quantizer.is_fitted]
        if unfitted:
            raise TALoRAError(f"talora trains through the quantized model, but the static activation quantizers of "
                              f"{len(unfitted)} layers (e.g. {unfitted[0]}) have no ranges yet: put `{{name: rtn}}` "
                              "before `{name: talora}` in method.steps")
        if not ctx.qlayers:
            raise TALoRAError("talora: no quantized layer to put LoRA branches on")
        if not ctx.timesteps:
            raise TALoRAError("talora needs the sampler's timesteps (QuantContext.timesteps) for its router and DFA")

    def _rows(self, ctx: QuantContext, records: dict):
        from ditq.calibration.blocks import calibration_batches

        run = ctx.run
        include_uncond = bool(getattr(run.calib, "include_uncond", False) and run.sampler.cfg_scale > 1)
        batches = list(calibration_batches(records, ctx.adapter.null_index, include_uncond,
                                           self.options.pass_batch_size))
        return [torch.cat([b[i] for b in batches]) for i in range(3)], [len(b[0]) for b in batches]

    def _row_weights(self, ctx: QuantContext, t: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        """Per-row DFA weights, {t: gamma}, {t: weight}."""
        o = self.options
        ts = [int(v) for v in ctx.timesteps]
        if not o.dfa:
            return torch.ones(len(t)), {}, {}
        from ditq.sampling import Sampler
        from ditq.sampling.denoising_factor import dfa_weights, gamma_for_sampler

        sampler = Sampler(ctx.adapter, ctx.run.sampler, clip_sample=ctx.run.model.clip_sample)
        gamma = gamma_for_sampler(sampler)
        weights = dfa_weights(gamma, o.dfa_power)
        table = torch.tensor([weights[v] for v in ts], dtype=torch.float32)
        tsv = torch.tensor(ts, dtype=torch.float32)
        nearest = (t.float()[:, None] - tsv[None]).abs().argmin(1)
        off = (tsv[nearest] != t.float()).sum()
        if off:
            log.warning("talora: %d calibration rows have timesteps outside the sampler's; they take the DFA weight of "
                        "the nearest sampler timestep", int(off))
        return table[nearest], gamma, weights

    # -- the step -----------------------------------------------------------------------------------
    def apply(self, ctx: QuantContext) -> None:
        from ditq.algorithms.finetune import finetune
        from ditq.quant.lora import Router, install_lora, lora_modules
        from ditq.quant.modules import full_precision
        from ditq.utils.atomic import atomic_write_bytes

        o = self.options
        self._check_layers(ctx)
        adapter, qlayers = ctx.adapter, ctx.qlayers
        device = adapter.device
        started = time.perf_counter()
        timesteps = [int(v) for v in ctx.timesteps]
        if o.branches > len(timesteps):
            raise TALoRAError(f"talora: branches={o.branches} > the sampler's {len(timesteps)} timesteps; use "
                              f"branches <= {len(timesteps)}")
        router = Router(o.branches, o.router, timesteps, embed_dim=o.router_embed_dim, hidden=o.router_hidden,
                        temperature=o.router_temperature, seed=o.seed, storage_bits=o.lora_bits).to(device)
        init_agreement = router.fit_partition() if router.learned and o.router_init == "partition" else None
        context = install_lora(adapter.denoiser, qlayers, router, o.rank, alpha=o.alpha, lora_input=o.lora_input,
                               storage_bits=o.lora_bits, seed=o.seed)
        modules = lora_modules(adapter.denoiser, qlayers)

        records = ctx.calib_records()
        (x, t, y), sizes = self._rows(ctx, records)
        x, t, y = x.to(device), t.to(device), y.to(device)
        w_row, gamma, weights = self._row_weights(ctx, t.cpu())
        with torch.no_grad():
            rows_per_branch = torch.bincount(router.choice(t), minlength=o.branches).tolist()
        routing0 = router.routing()
        for k, n in enumerate(rows_per_branch):
            if n == 0:
                log.warning("talora: branch %d (sampler timesteps %s) has no calibration rows at the start; it stays at "
                            "zero (the quantized layer) unless the learned router moves rows to it. Record more "
                            "timesteps (calib.num_timesteps, calib.timesteps=all) or use fewer branches", k,
                            [tt for tt, b in routing0.items() if b == k])
        w_row = w_row.to(device)
        pb = o.pass_batch_size

        def passes(fn):
            return torch.cat([fn(slice(a, a + pb)) for a in range(0, len(x), pb)])

        with torch.no_grad():
            with full_precision(qlayers):
                target = passes(lambda s: adapter.denoise(x[s], t[s], y[s]).float())
            if not torch.isfinite(target).all():
                raise TALoRAError("talora: the FP model's outputs on the calibration records hold NaN/Inf")

            def row_errors():
                return passes(lambda s: (adapter.denoise(x[s], t[s], y[s]).float() - target[s]).pow(2).flatten(1).mean(1))

            err_before = row_errors()

        # only the LoRA (and learned router) weights train
        frozen = [(p, p.requires_grad) for p in adapter.denoiser.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        lora_params = [p for n, p in modules.named_parameters() if not n.startswith("router.")]
        router_params = [p for n, p in modules.named_parameters() if n.startswith("router.")]
        for p in lora_params + router_params:
            p.requires_grad_(True)
        groups = [{"params": lora_params, "lr": o.lr}]
        if router_params:
            groups.append({"params": router_params, "lr": o.router_lr or o.lr})

        def loss_of(rows: torch.Tensor) -> torch.Tensor:
            rows = rows.to(device)
            eps = adapter.denoise(x[rows], t[rows], y[rows]).float()
            err = (eps - target[rows]).pow(2).flatten(1).mean(1)
            return (w_row[rows] * err).mean()

        spec = self.spec(ctx, records)
        checkpointer = self._checkpointer(ctx, spec)
        try:
            res = finetune(modules, groups, loss_of, len(x), iters=o.iters, batch_size=o.batch_size, seed=o.seed,
                           checkpointer=checkpointer, checkpoint_every=o.checkpoint_every, log_every=o.log_every,
                           progress=ctx.progress, desc="talora")
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
            for p in lora_params + router_params:
                p.requires_grad_(False)  # inference: one-hot routing, each row runs its own branch only
        with torch.no_grad():
            if o.lora_bits == 16:
                for p in lora_params + router_params:
                    p.copy_(p.half().float())
            err_after = row_errors()

        routing = router.routing()
        state = {"spec": spec, "state_dict": {k: v.detach().cpu() for k, v in modules.state_dict().items()},
                 "routing": routing, "layers": sorted(qlayers)}
        saved = None
        if ctx.output_dir:
            import io

            buf = io.BytesIO()
            torch.save(state, buf)
            saved = Path(ctx.output_dir) / "talora.pt"
            atomic_write_bytes(saved, buf.getvalue())

        def per_t(err):
            out = {}
            for v in sorted(set(t.tolist()), reverse=True):
                out[int(v)] = round(float(err[t == v].mean()), 8)
            return out

        n_lora = sum(p.numel() for p in lora_params)
        n_router = sum(p.numel() for p in router_params)
        ctx.diagnostics["talora"] = {
            "branches": o.branches, "rank": o.rank, "router": o.router if o.branches > 1 else "single",
            "dfa": o.dfa, "dfa_power": o.dfa_power if o.dfa else None, "lora_input": o.lora_input,
            "lora_bits": o.lora_bits, "layers": len(qlayers), "rows": int(len(x)), "iters": o.iters,
            "loss_first": round(res.loss_first, 8), "loss_last": round(res.loss_last, 8),
            "curve": [[int(i), round(float(v), 8)] for i, v in res.curve],
            "mse_before": round(float(err_before.mean()), 8), "mse_after": round(float(err_after.mean()), 8),
            "mse_by_t_before": per_t(err_before), "mse_by_t_after": per_t(err_after),
            "routing": {str(k): v for k, v in routing.items()},
            "rows_per_branch_at_start": rows_per_branch,
            "router_init_agreement": init_agreement,
            "gamma": {str(k): round(v, 6) for k, v in gamma.items()} or None,
            "dfa_weights": {str(k): round(v, 6) for k, v in weights.items()} or None,
            "lora_params": int(n_lora), "router_params": int(n_router),
            "resumed_from": res.resumed_from, "checkpoint_restart": res.restart_reason,
            "checkpoint": None if checkpointer is None else str(checkpointer.path),
            "file": None if saved is None else str(saved.resolve()),
            "train_seconds": res.seconds, "seconds": round(time.perf_counter() - started, 3),
            "seconds_per_iter": round(res.seconds / max(1, o.iters - (res.resumed_from or 0)), 5),
        }
        self.context = context  # the hooks stay: sampling routes by timestep
        log.info("talora: %d layers, K=%d r=%d, loss %.4g -> %.4g, MSE vs FP %.4g -> %.4g, %.1f s", len(qlayers),
                 o.branches, o.rank, res.loss_first, res.loss_last, float(err_before.mean()), float(err_after.mean()),
                 ctx.diagnostics["talora"]["seconds"])


def load_talora(path: str | Path, spec: dict | None = None) -> dict:
    """A saved `talora.pt` ({spec, state_dict, routing, layers}); with `spec`, a file made by another
    model or configuration raises `CheckpointMismatchError` naming the differing fields."""
    from ditq.algorithms.finetune import CheckpointMismatchError, spec_diff

    state = torch.load(Path(path), map_location="cpu", weights_only=False)
    if spec is not None:
        diff = spec_diff(state["spec"], json.loads(json.dumps(spec, default=str)))
        if diff:
            raise CheckpointMismatchError(f"{path} holds TALoRA weights of another model or configuration; differing "
                                          f"fields (file -> this run): {'; '.join(diff[:8])}")
    return state
