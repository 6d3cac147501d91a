"""Record the denoiser's inputs (x_t, t, y) while the FP model samples calibration seeds.

Which steps are kept (`calib.timesteps`):
  uniform            `num_timesteps` steps evenly spaced over the sampler's schedule, for every seed;
  all                every step, for every seed;
  random_per_sample  one step per seed, drawn from the seed's own stream (Q-DiT: each image of a
                     batch contributes its latent at a different random timestep);
  ndtc               one step per seed from a discretised normal over the steps (PTQ4DM's normally
                     distributed timestep calibration), drawn from the seed's own stream: see `ndtc_step`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ditq.sampling.seeds import labels_for_seeds

_STEP_PICK_STREAM = 0xCA11B
_NDTC_STREAM = 0x9D7C  # a stream of its own: ndtc and random_per_sample draws stay independent


def _ndtc_index(u: float, num_steps: int) -> int:
    """Step index (0 = noisiest) of position u on the timestep axis (0 = clean end, 1 = pure noise)."""
    k = min(max(math.floor(u * num_steps), 0), num_steps - 1)  # bin k of [0, 1] counted from the clean end
    return num_steps - 1 - k


def ndtc_step(num_steps: int, seed: int, mean: float, std: float) -> int:
    """PTQ4DM's NDTC for one seed: u ~ N(mean, std) from the seed's own generator, where u is the
    position on the timestep axis (t / T: 0 = the clean end, 1 = pure noise); the step kept is the
    sampler step whose bin [k/n, (k+1)/n) (k counted from the clean end, n steps) holds u, with u < 0
    clamped to the last (cleanest) step and u >= 1 to the first (noisiest). The paper centres the
    normal towards the low-noise end (mean <= T/2); its NDTC script uses mean 0.4, std 0.4 (ditq's
    defaults). (The authors' script compares the draw with the loop index, which counts from the noise
    end; ditq follows the paper's definition, t = 0 clean.)"""
    u = float(np.random.default_rng([int(seed), _NDTC_STREAM]).normal(mean, std))
    return _ndtc_index(u, num_steps)


def ndtc_probabilities(num_steps: int, mean: float, std: float) -> list[float]:
    """P(step index i is kept) under `ndtc_step`, for i = 0 (noisiest) .. num_steps - 1."""
    cdf = lambda u: 0.5 * (1.0 + math.erf((u - mean) / (std * math.sqrt(2.0))))  # noqa: E731
    edges = [-math.inf] + [k / num_steps for k in range(1, num_steps)] + [math.inf]  # bins from the clean end
    by_k = [cdf(edges[k + 1]) - cdf(edges[k]) for k in range(num_steps)]
    return by_k[::-1]


def select_steps(num_steps: int, cfg, seeds: list[int]) -> list[set[int]]:
    """For each seed, the set of step indices (0 = first, noisiest step) whose input is kept."""
    if cfg.timesteps == "all":
        steps = set(range(num_steps))
        return [steps for _ in seeds]
    if cfg.timesteps == "uniform":
        steps = {int(round(v)) for v in np.linspace(0, num_steps - 1, cfg.num_timesteps)}
        return [steps for _ in seeds]
    if cfg.timesteps == "random_per_sample":
        return [{int(np.random.default_rng([int(s), _STEP_PICK_STREAM]).integers(num_steps))} for s in seeds]
    if cfg.timesteps == "ndtc":
        return [{ndtc_step(num_steps, s, cfg.ndtc_mean, cfg.ndtc_std)} for s in seeds]
    raise ValueError(f"calib.timesteps={cfg.timesteps!r}; choose one of: uniform, all, random_per_sample, ndtc")


def collect_trajectory_inputs(sampler, cfg, conditions=None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run the FP sampler on the calibration seeds and keep the selected steps' inputs.

    `conditions`: the run's `ditq.conditioning.Conditions` (default: the adapter's); an int is read
    as a number of classes. Returns {"x": [R, C, H, W], "t": [R] (timestep values), "y": [R]
    (condition indices: class labels / prompt indices), "seed": [R], "step": [R]} with R records in
    (batch, step, sample) order.
    """
    seeds = list(range(cfg.seed_start, cfg.seed_start + cfg.num_samples))
    if conditions is None:
        conditions = sampler.adapter.conditions
    labels = (labels_for_seeds(seeds, conditions, cfg.labels) if isinstance(conditions, int)
              else conditions.for_seeds(seeds, cfg.labels))
    keep = select_steps(sampler.cfg.num_steps, cfg, seeds)
    records: dict[str, list[torch.Tensor]] = {"x": [], "t": [], "y": [], "seed": [], "step": []}
    offset = [0]  # index of the current batch's first seed

    def record(step: int, t: int, x: torch.Tensor, y: torch.Tensor) -> None:
        rows = [i for i in range(x.shape[0]) if step in keep[offset[0] + i]]
        if not rows:
            return
        idx = torch.tensor(rows)
        records["x"].append(x[idx].detach().float().cpu())
        records["t"].append(torch.full((len(rows),), t, dtype=torch.long))
        records["y"].append(y[idx].cpu())
        records["seed"].append(torch.tensor([seeds[offset[0] + i] for i in rows]))
        records["step"].append(torch.full((len(rows),), step, dtype=torch.long))

    bs = cfg.batch_size
    for b in range(0, len(seeds), bs):
        offset[0] = b
        sampler.sample(seeds[b : b + bs], labels[b : b + bs], batch_size=bs, callback=record,
                       desc="calibration trajectories", progress=progress)
    out = {k: torch.cat(v) for k, v in records.items()}
    if not torch.isfinite(out["x"]).all():
        raise FloatingPointError(
            "the FP model produced NaN/Inf latents while sampling calibration trajectories; "
            "check the checkpoint and the inference dtype (fp16 overflow? try dtype_inference=float32)"
        )
    return out
