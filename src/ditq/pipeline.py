"""One run: preflight -> load -> FP samples -> (calibrate -> quantize -> sample) -> score -> record.

Each stage lives in its own package; this module only wires them together. Everything that can
fail on bad input (config, reference data, metric weights, checkpoints) is checked before any
sampling. Expensive artifacts (FP samples, calibration inputs, layer inputs, reference
statistics and FP features) come from the content-keyed disk cache when they exist.
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import ditq
from ditq.config.schema import is_full_precision
from ditq.utils.atomic import atomic_write_text
from ditq.utils.cache import DiskCache
from ditq.utils.timing import Timings

log = logging.getLogger(__name__)

# Bump when a change alters what cached samples / calibration data contain.
SAMPLES_VERSION = 1
CALIB_VERSION = 2  # 2: trajectories always from the FP model (a step asking first got the quantized one)



def quantizers_by_role(qlayers: dict, roles: dict[str, str]) -> dict[str, dict[str, str | None]]:
    """The effective quantizers per role and side (method settings + what the format dictates + what
    the steps chose per layer): one description, or the distinct ones with their layer counts."""
    from collections import Counter

    seen: dict[str, dict[str, Counter]] = {}
    for n, q in qlayers.items():
        for side, qz in (("weight", q.weight_quantizer), ("act", q.act_quantizer)):
            seen.setdefault(roles[n], {}).setdefault(side, Counter())[None if qz is None else qz.describe()] += 1
    out: dict[str, dict[str, str | None]] = {}
    for role, sides in seen.items():
        out[role] = {}
        for side, c in sides.items():
            if len(c) == 1:
                out[role][side] = next(iter(c))
            else:
                out[role][side] = " | ".join(f"{d} ({k})" for d, k in sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0]))))
    return out

def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    return name


def build_reference(dataset_cfg):
    """The real data a run is scored against."""
    from ditq.metrics import Reference

    from ditq.config.checks import PROMPT_DATASET_KINDS
    from ditq.data.prompts import uses_real_digits

    if uses_real_digits(dataset_cfg.kind):  # digits, digits_captions
        from ditq.data.digits import real_digits_uint8

        images, labels = real_digits_uint8()
        return Reference.from_images(images, spec={"dataset": "sklearn_digits", "n": len(images), "v": 1}, labels=labels)
    if dataset_cfg.reference is None and dataset_cfg.kind in PROMPT_DATASET_KINDS:
        return None  # prompt sets without images (CLIP / ImageReward / HPSv2 need none)
    if dataset_cfg.reference is None:
        raise FileNotFoundError(f"dataset '{dataset_cfg.name}' needs dataset.reference (a reference batch .npz)")
    path = Path(dataset_cfg.reference)
    if not path.is_file():
        hint = f" Download it from {dataset_cfg.download_hint} to {path}," if dataset_cfg.download_hint else ""
        raise FileNotFoundError(
            f"reference batch for dataset '{dataset_cfg.name}' not found at {path}.{hint} "
            "or set dataset.reference=/path/to/file.npz."
        )
    return Reference.from_adm_npz(path)


def sampler_spec(run, sampler_cfg=None) -> dict:
    """The sampler part of cache keys: the run's sampler (or `sampler_cfg`) plus the model's clipping."""
    cfg = run.sampler if sampler_cfg is None else sampler_cfg
    return {**OmegaConf.to_container(cfg, resolve=True), "clip_sample": run.model.clip_sample}


def fp_samples_spec(run, model_fp: dict, sampler_cfg=None) -> dict:
    """Cache key of the FP model's samples (shards add their seeds and labels)."""
    return {"v": SAMPLES_VERSION, "model": model_fp, "sampler": sampler_spec(run, sampler_cfg),
            "dtype": run.dtype_inference, "label_mode": run.eval.labels}


# every prompt pool up to this size is encoded whole (a few MB); larger ones (COCO) per seed
ENCODE_WHOLE_POOL = 10_000


def run_condition_indices(run, conditions, fp_run: bool) -> torch.Tensor:
    """The condition indices a run can ask for: its evaluation, calibration, held-out and search seeds."""
    if len(getattr(conditions, "pool", ())) <= ENCODE_WHOLE_POOL:
        return torch.arange(len(conditions.pool))
    ranges = [(run.eval.seed_start, run.eval.num_samples, run.eval.labels)]
    if not fp_run:
        ranges.append((run.calib.seed_start, run.calib.num_samples, run.calib.labels))
        if run.diagnostics.enabled:
            ranges.append((run.diagnostics.seed_start, run.diagnostics.num_samples, run.diagnostics.labels))
        if any(s.get("name") in ("group_search",) for s in run.method.steps):
            s = run.search
            ranges += [(s.seed_start, s.num_samples, run.eval.labels),
                       (s.holdout_seed_start, s.holdout_samples, run.eval.labels)]
    out = [conditions.for_seeds(list(range(a, a + n)), mode) for a, n, mode in ranges]
    if not fp_run:
        from ditq.calibration.noised import calibration_condition_indices

        noised = calibration_condition_indices(run)  # captions of noised COCO calibration images
        if noised is not None:
            out.append(noised)
    return torch.cat(out)


def sample_images(adapter, sampler, seeds: list[int], labels: torch.Tensor, *, cache: DiskCache | None,
                  spec: dict | None, desc: str, stats: dict | None = None, progress: bool = True,
                  sharded: tuple | None = None) -> torch.Tensor | None:
    """uint8 NCHW images of `seeds`, in shards of sampler.batch_size seeds; with a cache, each
    finished shard is stored, so an interrupted run resumes from the shards it completed.
    `stats` (if given) gets `produce_s` (time it took to PRODUCE the shards, cached ones as recorded
    when built) and `cached_shards` / `shards`. `sharded` = (Dist, store) under torchrun
    (`ditq.sampling.distributed`): this rank samples its shards; rank 0 gets all images, others None."""
    bs = sampler.cfg.batch_size

    def build_shard(b, shard_seeds, shard_labels):
        with torch.no_grad():
            x = sampler.sample(shard_seeds, shard_labels, batch_size=bs, progress=progress,
                               desc=f"{desc} [{b}:{b + len(shard_seeds)}/{len(seeds)}]")
            return adapter.decode(x.to(adapter.device)).cpu()

    if sharded is not None:
        from ditq.sampling.distributed import sample_sharded

        return sample_sharded(*sharded, seeds, labels, bs, build_shard, desc=desc, stats=stats)
    out = []
    produce_s, cached_shards = 0.0, 0
    for b in range(0, len(seeds), bs):
        shard_seeds, shard_labels = seeds[b : b + bs], labels[b : b + bs]

        def build():
            return build_shard(b, shard_seeds, shard_labels)

        t0 = time.perf_counter()
        if cache is None or spec is None:
            out.append(build())
            produce_s += time.perf_counter() - t0
        else:
            shard_spec = {**spec, "seeds": [shard_seeds[0], len(shard_seeds)], "labels": shard_labels.tolist()}
            rec = cache.get_or_create_record("samples", shard_spec, build)
            out.append(rec.value)
            cached_shards += rec.cached
            # an entry written before manifests recorded build_seconds counts its load time
            produce_s += rec.build_seconds if rec.build_seconds is not None else time.perf_counter() - t0
    if stats is not None:
        stats.update(produce_s=round(produce_s, 3), cached_shards=cached_shards, shards=len(out))
    return torch.cat(out)


def element_bits(fmt: str | None) -> int | str:
    if fmt is None:
        return 32
    from ditq.quant.spec import parse_format

    return parse_format(fmt).bits


def run(run, output_dir: str | Path, sweep_dir: str | None = None, job_num: int | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Execute one validated run config; returns the result row (already stored and logged), or None
    on a torchrun rank other than 0 (ditq.sampling.distributed)."""
    from ditq.calibration import collect_layer_inputs
    from ditq.calibration.layer_inputs import LAYER_INPUTS_VERSION
    from ditq.calibration.lazy import Lazy
    from ditq.methods.base import QuantContext
    from ditq.methods.services import RunServices
    from ditq.methods.registry import build_steps
    from ditq.methods.cost import row_cost
    from ditq.methods.plan import plan_for_run
    from ditq.methods.wrap import bits_per_weight as layer_bits_per_weight
    from ditq.methods.wrap import full_precision, wrap_layers
    from ditq.metrics import Evaluator
    from ditq.models import load_adapter
    from ditq.sampling import Sampler
    from ditq.data.prompts import build_conditions, load_prompt_pool
    from ditq.preflight import check_guidance, check_loaded_model, check_outputs, check_reference
    from ditq.tracking.keep import keep_row
    from ditq.tracking.identity import previous_run
    from ditq.tracking.sweep import stop_if_launcher_gone
    from ditq.metrics import write_adm_npz
    from ditq.utils.images import save_grid

    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    timings = Timings()
    output_dir = Path(output_dir)
    check_outputs(run, output_dir, sweep_dir)  # creates the run dir; an unwritable output fails before any work
    fp_run = is_full_precision(run)
    cache = DiskCache(run.paths.cache_dir)
    device = resolve_device(run.device)
    from ditq.sampling import distributed

    dist = distributed.setup(device)  # under torchrun: join the process group (else rank 0 of 1, a no-op)
    metrics = list(run.eval.metrics)
    if fp_run:  # paired metrics of the FP model against itself are trivial
        metrics = [m for m in metrics if m not in ("psnr", "ssim", "lpips", "fid_to_fp")]

    # -- preflight: every bad input fails here, before the model loads ----------------------------
    with timings("preflight"):
        evaluator = Evaluator(metrics, feature_net=run.eval.feature_net, cache=cache,
                              batch_size=run.eval.batch_size, device=device, options=dict(run.eval.options))
        reference = build_reference(run.dataset)
        check_reference(reference, run)
        prompt_pool = load_prompt_pool(run.dataset)  # a missing / empty prompt file fails here
        evaluator.check(reference=reference, has_prompts=prompt_pool is not None, has_fp_images=not fp_run,
                        has_labels=prompt_pool is None or prompt_pool.class_of is not None,
                        num_samples=run.eval.num_samples, samples_key="eval.num_samples")
        steps = [] if fp_run else build_steps(list(run.method.steps))

    with timings("load"):
        adapter = load_adapter(run.model, device=device, dtype=run.dtype_inference)
        check_loaded_model(adapter, run)  # timesteps, channels, image side: before any sampling
        check_guidance(adapter, run)  # guidance of a model without an unconditional branch
        conditions = build_conditions(run.dataset, adapter, pool=prompt_pool)  # seed -> label / prompt
        adapter.set_conditions(conditions)
        plan = None if fp_run else plan_for_run(run, adapter)  # per-layer quantizers, checked before sampling
        for step in steps:  # step settings against this model and plan (search choices, budgets)
            step.check_plan(run, adapter, plan)
    sampler = Sampler(adapter, run.sampler, clip_sample=run.model.clip_sample)
    seeds = list(range(run.eval.seed_start, run.eval.seed_start + run.eval.num_samples))
    labels = conditions.for_seeds(seeds, run.eval.labels)  # condition indices, a function of each seed
    model_fp = adapter.fingerprint()
    if adapter.conditioning == "text":  # encode the run's prompts once (cached), free the encoder
        from ditq.conditioning.text import prepare_text

        with timings("encode_prompts"):
            bank = prepare_text(adapter, conditions, run_condition_indices(run, conditions, fp_run), cache=cache,
                                progress=progress)
        model_fp = {**model_fp, "conditions": conditions.spec(), "text_encoder": bank.encoder}
        text_stats = dict(bank.stats)
    run_key, previous = previous_run(run, model_fp, device)  # same config, weights, ditq version
    if previous is not None and not run.force:
        log.info("identical run already finished: %s; force=true to redo", previous.path)
        return previous.row
    fp_spec = fp_samples_spec(run, model_fp)

    calib_cfg = OmegaConf.to_container(run.calib, resolve=True)
    calib_file = calib_cfg.pop("file", None)  # where the records are kept is not what they are
    calib_spec = {"v": CALIB_VERSION, "model": model_fp, "sampler": sampler_spec(run), "calib": calib_cfg,
                  "dtype": run.dtype_inference}
    if calib_file and not fp_run:  # a calibration file of another model / sampler / setting fails here
        from ditq.calibration import files as calib_files

        calib_files.check(calib_file, calib_spec)

    fp_stats: dict[str, Any] = {}
    with timings("fp_sample"):
        fp_images = sample_images(adapter, sampler, seeds, labels, cache=cache, spec=fp_spec, desc="FP samples",
                                  stats=fp_stats, progress=progress, sharded=distributed.fp_shards(dist, cache, fp_spec))

    diagnostics: dict[str, Any] = {}
    if adapter.conditioning == "text":
        diagnostics["text_encoding"] = text_stats  # prompts encoded, cache hit, seconds
    bits_of: dict[str, float] = {}
    if fp_run:
        images = fp_images
    else:
        def trajectory_inputs():  # always the FP model's trajectories, whoever asks (a step or layer_inputs)
            from ditq.calibration import files as calib_files

            if calib_file and calib_files.check(calib_file, calib_spec):
                return calib_files.load(calib_file, calib_spec)
            from ditq.calibration.noised import calibration_records, records_spec  # calib.source: trajectories | noised_data

            with full_precision(qlayers):
                records = cache.get_or_create(
                    "calib_inputs", records_spec(run, calib_spec),
                    lambda: calibration_records(sampler, run, conditions, progress=progress))
            if calib_file:
                calib_files.save(calib_file, calib_spec, records)
            return records

        layer_names: list[str] = []
        transforms: list[dict] = []  # what the model-transforming steps (rotations) did before the inputs are recorded

        def record_layer_inputs():  # always the FP model's inputs, whether or not a step declared the need
            spec = {**calib_spec, "layers": layer_names, "max_tokens": run.calib.max_tokens_per_layer,
                    "uncond": run.calib.include_uncond and run.sampler.cfg_scale > 1, "li_v": LAYER_INPUTS_VERSION}
            if transforms:
                spec["transforms"] = transforms
            with full_precision(qlayers):
                return cache.get_or_create(
                    "layer_inputs", spec,
                    lambda: collect_layer_inputs(adapter, trajectory_inputs(), layer_names,
                                                 run.calib.max_tokens_per_layer, include_uncond=spec["uncond"],
                                                 batch_size=run.calib.batch_size, progress=progress))

        # loaded once per run by whichever of pipeline and steps asks first; released before sampling
        layer_inputs = Lazy(record_layer_inputs, "layer inputs")

        with timings("quantize"):
            qlayers, roles = wrap_layers(adapter, run, plan=plan)
            layer_names.extend(qlayers)
            services = RunServices(adapter=adapter, run=run, qlayers=qlayers, cache=cache, model_fp=model_fp,
                                   device=device, progress=progress)
            ctx = QuantContext(adapter=adapter, run=run, qlayers=qlayers, roles=roles, layer_inputs=layer_inputs,
                               diagnostics=diagnostics, calib_records=trajectory_inputs,
                               timesteps=sampler.timesteps(), scratch_dir=str(Path(run.paths.cache_dir) / "block_io"),
                               progress=progress, plan=plan, output_dir=str(output_dir), services=services)
        n_transforms = sum(1 for s in steps if s.transforms_model)  # they lead the steps (checked with the config)
        with timings("quantize"):  # rotations first: the layer inputs below are those of the transformed model
            for step in steps[:n_transforms]:
                with timings(f"step_{step.name}"):
                    step.apply(ctx)
                transforms.append(step.transform_spec())
        if any(s.needs_layer_inputs(ctx) for s in steps[n_transforms:]):
            with timings("calibrate"):  # FP inputs (the provider records under full_precision), before any other step
                layer_inputs()
        with timings("quantize"):
            for step in steps[n_transforms:]:
                with timings(f"step_{step.name}"):
                    step.apply(ctx)
        plan = ctx.plan  # a search step may have replaced it
        diagnostics["quantizers"] = quantizers_by_role(qlayers, roles)  # as the steps left them
        plan.save(output_dir / "plan.yaml")  # method.plan=<it> reproduces this run's quantizers
        layer_inputs.release()  # free the layer inputs (GBs for DiT-XL/2) before sampling
        if run.diagnostics.enabled:  # per-layer / denoiser errors on held-out records: CSV + plots in the run dir
            from ditq.diagnostics import run_diagnostics

            with timings("diagnostics"):
                diagnostics["errors"] = run_diagnostics(
                    adapter, sampler, run, qlayers, roles, output_dir=output_dir, cache=cache, model_fp=model_fp,
                    sampler_spec=sampler_spec(run), progress=progress)
        bits_of = {n: q.bits_per_weight() for n, q in qlayers.items() if q.weight_quantizer is not None}
        with timings("sample"):
            q_shards = distributed.run_shards(dist, run.paths.cache_dir, run_key, {"v": SAMPLES_VERSION})
            images = sample_images(adapter, sampler, seeds, labels, cache=None, spec=None, desc=f"{run.method.name} {run.bits.name}",
                                   progress=progress, sharded=q_shards)
    if not dist.is_main:  # torchrun: rank 0 gathers, scores and records; the other ranks are done
        return None

    with timings("score"):
        scores = evaluator.evaluate(images, labels=conditions.labels(labels), prompts=conditions.prompts(labels),
                                    groups=conditions.groups_of(labels), reference=reference,
                                    fp_images=None if fp_run else fp_images, fp_spec=fp_spec)

    grid_path = None
    if run.eval.grid_size > 0:
        n = min(run.eval.grid_size, len(images))
        upscale = max(1, 64 // images.shape[-1])
        grid_path = save_grid(images[:n], output_dir / "samples_grid.png", upscale=upscale)
    if run.eval.save_samples:
        write_adm_npz(output_dir / "samples.npz", images, labels)
        if conditions.kind == "text":  # the prompt of every sample, in seed order
            atomic_write_text(output_dir / "prompts.txt", "".join(p.replace("\n", " ") + "\n"
                                                                for p in conditions.prompts(labels)))

    from ditq.quant.lora import declared_storage_bits  # modules added by steps (TALoRA) at their storage bits

    total_bits = adapter.parameter_bits({**bits_of, **declared_storage_bits(adapter.denoiser)})
    row: dict[str, Any] = {
        "run_name": run.run_name,
        "experiment": run.experiment,
        "sweep_dir": str(Path(sweep_dir).resolve()) if sweep_dir else None,
        "job_num": job_num,
        "run_key": run_key,
        "supersedes": previous.row.get("run_id") if previous else None,  # a forced rerun's older row
        "output_dir": str(output_dir.resolve()),
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "is_fp": fp_run,
        "wbits": plan.element_bits("weight") if plan and run.method.plan else element_bits(run.bits.weight),
        "abits": plan.element_bits("act") if plan and run.method.plan else element_bits(run.bits.act),
        "metrics": {k: float(v) for k, v in scores.items()},
        "metric_settings": evaluator.settings(),
        "protocol": {
            "model": run.model.name,
            "sampler": run.sampler.kind,
            "steps": run.sampler.num_steps,
            "cfg_scale": run.sampler.cfg_scale,
            "cfg_channels": run.model.cfg_channels,
            "num_samples": run.eval.num_samples,
            "seeds": [seeds[0], len(seeds)],
            "labels": run.eval.labels,
            "conditions": conditions.spec(),
            "dtype": run.dtype_inference,
            "reference": run.dataset.name,
            "feature_net": run.eval.feature_net,
        },
        "size_mb": total_bits / 8 / 1e6,
        "bits_per_weight": 32.0 if fp_run else layer_bits_per_weight(qlayers),  # weighted by parameter count
        "plan": None if plan is None else {**plan.compact(), "file": str((output_dir / "plan.yaml").resolve()),
                                           "source": run.method.plan or "method+bits"},
        "quantized_layers": len(bits_of),
        "cost": None if plan is None else row_cost(plan, adapter),  # BitOps, storage, mean group size (methods/cost.py)
        "timings": {**timings.seconds, "total_s": timings.total(),
                    # FP: the time it took to produce the samples, not the cache load of a warm run
                    "sample_s": fp_stats["produce_s"] if fp_run else timings.seconds.get("sample", 0.0),
                    "fp_sample_cached": fp_stats["cached_shards"], "fp_sample_shards": fp_stats["shards"]},
        "diagnostics": diagnostics,
        "environment": {"ditq": ditq.__version__, "torch": torch.__version__, "device": device,
                        "threads": torch.get_num_threads(), "python": platform.python_version()},
        "config": OmegaConf.to_container(run, resolve=True),
    }
    stop_if_launcher_gone()  # a sweep job whose launcher died writes no row
    path = keep_row(row, output_dir, run.paths.results_dir)  # <run dir>/result.json first, then the store
    if not fp_run and q_shards is not None:  # torchrun: the quantized shards served their run
        q_shards[1].remove_all()
    log.info("result row written to %s", path)
    if run.logger.wandb and run.logger.mode != "disabled":
        from ditq.tracking.wandb_log import log_run

        log_run(row, run.logger, output_dir, OmegaConf.to_container(run.table, resolve=True), grid_path)
    return row
