"""Calibration records from real captioned images noised with the model's training schedule (FP4DiT).

FP4DiT calibrates on 128 MS-COCO images with one caption each, noised at the timesteps of sampling,
with conditional and unconditional text embeddings. `calib.source=noised_data` builds the same records
as `ditq.calibration.trajectories.collect_trajectory_inputs` ({"x", "t", "y", "seed", "step"}, so every
consumer, the unconditional twins of `calib.include_uncond` included, works unchanged) from:

  images   dataset=digits / digits_captions: `calib.num_samples` distinct bundled digits drawn with the
           generator of `calib.seed_start` (a caption template per image from the same stream);
           dataset=coco_captions: `ditq.data.prompts.coco_calibration_pairs(dataset.prompts,
           dataset.images, calib.num_samples, calib.seed_start)`, each image resized (shorter side to the
           model's resolution, bicubic) and centre-cropped (the public code crops at random).
           Latent models encode with the adapter's VAE: `vae.encode(x).latent_dist.sample(g) * vae_scale`
           (g seeded by the image's seed); pixel-space models take the image in [-1, 1].
  y        the caption's index in the run's prompt pool (digits_captions: `captions.caption_index`,
           COCO: the pair's index), the digit for the class-conditional digits, 0 for unconditional models.
  timesteps calib.noise_timesteps=sampler (default, the paper): the sampler's steps that `calib.timesteps`
           picks for the image's seed (`trajectories.select_steps`: all = every step, FP4DiT's 20);
           raw_0_19: raw timesteps 0..19 of the training schedule for every image (the public code; nearly
           clean images). `step` is the sampler's step index (0 = noisiest), for raw_0_19 the position in
           19..0 (0 = t 19).
  noise    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, abar from the training schedule
           (`adapter.scheduler_config()` through diffusers' DDPMScheduler), eps drawn per (seed, t) from
           its own generator (`noise_for`), so records do not depend on batching or on which other steps
           are kept.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ditq.calibration.trajectories import select_steps

__all__ = ["RAW_TIMESTEPS", "calibration_condition_indices", "calibration_records", "collect_noised_inputs", "noise_for", "training_alphas_cumprod",
           "noised_timesteps", "digit_images", "coco_images", "records_spec"]

RAW_TIMESTEPS = tuple(range(19, -1, -1))  # FP4DiT's public code: raw timesteps 0..19 (kept noisiest first)
_NOISE_STREAM = 0x401DE
_DIGIT_STREAM = 0xD161
_VAE_STREAM = 0x7AE


def calibration_records(sampler, run, conditions=None, progress: bool = True) -> dict[str, torch.Tensor]:
    """The run's calibration records from `calib.source`: FP trajectories (default) or noised real images."""
    if run.calib.get("source", "trajectories") == "noised_data":
        return collect_noised_inputs(sampler, run.calib, run.dataset, conditions)
    from ditq.calibration.trajectories import collect_trajectory_inputs

    return collect_trajectory_inputs(sampler, run.calib, conditions, progress=progress)


def records_spec(run, calib_spec: dict) -> dict:
    """The cache key of the records: `calib_spec` (model, sampler, the whole calib config), plus, for noised
    COCO images, the image directory (the captions are in the model fingerprint's prompt pool)."""
    if run.calib.get("source", "trajectories") != "noised_data" or run.dataset.kind != "coco_captions":
        return calib_spec
    return {**calib_spec, "images": str(run.dataset.images)}


def calibration_condition_indices(run) -> torch.Tensor | None:
    """The prompt indices noised COCO calibration records carry (their captions' pool indices), for the text
    bank of a run whose pool is too large to encode whole (`pipeline.run_condition_indices`); None when the
    records use no indices beyond the run's calibration seeds' own (every other source)."""
    if run.calib.get("source", "trajectories") != "noised_data" or run.dataset.kind != "coco_captions":
        return None
    from ditq.data.prompts import coco_calibration_pairs

    pairs = coco_calibration_pairs(run.dataset.prompts, run.dataset.images, int(run.calib.num_samples),
                                   int(run.calib.seed_start))
    return torch.tensor([p.index for p in pairs], dtype=torch.long)


def noise_for(seed: int, t: int, shape) -> torch.Tensor:
    """eps of image `seed` at timestep `t`: standard normal from the generator of (seed, t)."""
    rng = np.random.default_rng([int(seed), _NOISE_STREAM, int(t)])
    return torch.from_numpy(rng.standard_normal(tuple(shape)).astype(np.float32))


def training_alphas_cumprod(adapter) -> torch.Tensor:
    """abar_t of the model's training schedule, t = 0 .. num_train_timesteps - 1 (float64)."""
    from diffusers import DDPMScheduler

    sch = DDPMScheduler.from_config(adapter.scheduler_config())
    return sch.alphas_cumprod.to(torch.float64)


def noised_timesteps(sampler, cfg, seeds: list[int]) -> list[list[tuple[int, int]]]:
    """Per seed the [(step, t)] it is noised at (see the module doc), noisiest first."""
    mode = cfg.get("noise_timesteps", "sampler")
    if mode == "raw_0_19":
        return [[(k, t) for k, t in enumerate(RAW_TIMESTEPS)] for _ in seeds]
    if mode != "sampler":
        raise ValueError(f"calib.noise_timesteps={mode!r}; choose one of: sampler, raw_0_19")
    ts = sampler.timesteps()
    keep = select_steps(len(ts), cfg, seeds)
    return [[(k, int(ts[k])) for k in sorted(steps)] for steps in keep]


def digit_images(n: int, seed: int, conditioning: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` distinct bundled digits [n, 1, 8, 8] in [-1, 1] drawn with the generator of `seed`, and their
    conditions: a caption index (text), the digit (class) or 0 (none)."""
    from ditq.data.captions import TEMPLATES, caption_index
    from ditq.data.digits import load_digits_tensors

    images, labels = load_digits_tensors()
    if not 1 <= n <= len(images):
        raise ValueError(f"calib.num_samples={n}: noised digits calibration draws distinct images from the "
                         f"{len(images)} bundled digits; choose 1 <= calib.num_samples <= {len(images)}")
    rng = np.random.default_rng([int(seed), _DIGIT_STREAM])
    idx = rng.choice(len(images), size=n, replace=False)
    templates = rng.integers(0, len(TEMPLATES), size=n)
    digits = labels[torch.from_numpy(idx)]
    if conditioning == "text":
        y = torch.tensor([caption_index(int(d), int(k)) for d, k in zip(digits, templates)], dtype=torch.long)
    elif conditioning == "class":
        y = digits.clone()
    else:
        y = torch.zeros(n, dtype=torch.long)
    return images[torch.from_numpy(idx)].clone(), y


def coco_images(annotation: str, images_dir: str, n: int, seed: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4DiT's captioned COCO images: [n, 3, R, R] in [-1, 1] (shorter side resized to R, centre crop) and
    the index of each image's caption in `coco_caption_conditions(annotation)`'s pool."""
    from PIL import Image

    from ditq.data.prompts import coco_calibration_pairs

    pairs = coco_calibration_pairs(annotation, images_dir, n, seed)
    out = []
    for p in pairs:
        with Image.open(p.image) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out), torch.tensor([p.index for p in pairs], dtype=torch.long)


def _encode(adapter, images: torch.Tensor, seeds: list[int], batch_size: int) -> torch.Tensor:
    """x_0 in the denoiser's space: VAE latents (sampled with a generator per image seed, x vae_scale) or the
    pixels; shape checked against the model's latent shape."""
    vae = getattr(adapter, "vae", None)
    if vae is None:
        x0 = images.float()
    else:
        dev, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        scale = float(adapter.cfg.vae_scale)
        parts = []
        for i in range(len(images)):  # one generator per image: the latent does not depend on batching
            g = torch.Generator(device=dev).manual_seed(int(seeds[i]) * 7919 + _VAE_STREAM)
            with torch.no_grad():
                dist = vae.encode(images[i:i + 1].to(dev, dtype)).latent_dist
                parts.append((dist.sample(generator=g) * scale).float().cpu())
        x0 = torch.cat(parts)
    want = tuple(getattr(adapter, "latent_shape", x0.shape[1:]))
    if tuple(x0.shape[1:]) != want:
        raise ValueError(f"noised calibration images give denoiser inputs of shape {tuple(x0.shape[1:])}, and model "
                         f"{getattr(adapter.cfg, 'name', '?')} takes {want} (channels, side); use a dataset of this "
                         f"model's images (the digits for the embedded models, COCO for PixArt / Hunyuan-DiT) or "
                         f"calib.source=trajectories")
    return x0


def collect_noised_inputs(sampler, cfg, dataset_cfg, conditions=None) -> dict[str, torch.Tensor]:
    """Records {"x" [R, C, H, W], "t" [R], "y" [R], "seed" [R], "step" [R]} of `cfg.num_samples` real images
    noised at their timesteps (module doc), in (image, step) order."""
    adapter = sampler.adapter
    n, start = int(cfg.num_samples), int(cfg.seed_start)
    seeds = list(range(start, start + n))
    kind = dataset_cfg.kind
    conditioning = getattr(adapter, "conditioning", "class")
    if kind in ("digits", "digits_captions"):
        images, y = digit_images(n, start, conditioning)
    elif kind == "coco_captions":
        if conditioning != "text":
            raise ValueError("calib.source=noised_data with dataset=coco_captions needs a text-to-image model")
        images, y = coco_images(dataset_cfg.prompts, dataset_cfg.images, n, start, int(adapter.cfg.resolution))
    else:
        raise ValueError(f"calib.source=noised_data has no images for dataset.kind={kind!r}; use digits, "
                         "digits_captions or coco_captions (with dataset.images), or calib.source=trajectories")
    x0 = _encode(adapter, images, seeds, int(cfg.batch_size))
    abar = training_alphas_cumprod(adapter)
    picks = noised_timesteps(sampler, cfg, seeds)
    records: dict[str, list[Any]] = {"x": [], "t": [], "y": [], "seed": [], "step": []}
    for i, seed in enumerate(seeds):
        for step, t in picks[i]:
            if not 0 <= t < len(abar):
                raise ValueError(f"noised calibration: timestep {t} is outside the training schedule "
                                 f"(0..{len(abar) - 1}) of model {getattr(adapter.cfg, 'name', '?')}")
            a = abar[t]
            eps = noise_for(seed, t, x0.shape[1:])
            x = (a.sqrt() * x0[i].double() + (1 - a).sqrt() * eps.double()).float()
            records["x"].append(x)
            records["t"].append(t)
            records["y"].append(int(y[i]))
            records["seed"].append(seed)
            records["step"].append(step)
    out = {"x": torch.stack(records["x"]),
           **{k: torch.tensor(records[k], dtype=torch.long) for k in ("t", "y", "seed", "step")}}
    if not torch.isfinite(out["x"]).all():
        raise FloatingPointError("noised calibration records hold NaN/Inf (a VAE in fp16 overflowing? try "
                                 "dtype_inference=float32)")
    return out
