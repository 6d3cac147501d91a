"""Record the denoiser's inputs (x_t, t, y) while the FP model samples calibration seeds.

Which steps are kept (`calib.timesteps`):
  uniform            `num_timesteps` steps evenly spaced over the sampler's schedule, for every seed;
  all                every step, for every seed;
  random_per_sample  one step per seed, drawn from the seed's own stream (Q-DiT: each image of a
                     batch contributes its latent at a different random timestep).
"""
from __future__ import annotations

import numpy as np
import torch

from ditq.sampling.seeds import labels_for_seeds

_STEP_PICK_STREAM = 0xCA11B


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
    raise ValueError(f"calib.timesteps={cfg.timesteps!r}; choose one of: uniform, all, random_per_sample")


def collect_trajectory_inputs(sampler, cfg, num_classes: int, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run the FP sampler on the calibration seeds and keep the selected steps' inputs.

    Returns {"x": [R, C, H, W], "t": [R] (timestep values), "y": [R] (class labels),
    "seed": [R], "step": [R]} with R records in (batch, step, sample) order.
    """
    seeds = list(range(cfg.seed_start, cfg.seed_start + cfg.num_samples))
    labels = labels_for_seeds(seeds, num_classes, cfg.labels)
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
