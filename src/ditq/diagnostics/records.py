"""Held-out trajectory records for diagnostics: the denoiser inputs (x_t, t, y) of FP sampling
trajectories on seeds disjoint from the calibration and the evaluation seeds (the config refuses
overlaps), at up to `num_timesteps` evenly spaced steps, cached like the calibration inputs."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from ditq.calibration import collect_trajectory_inputs, select_steps

# Bump when a change alters what the cached held-out records contain.
RECORDS_VERSION = 1


def trajectory_config(cfg) -> SimpleNamespace:
    """The `collect_trajectory_inputs` settings of a diagnostics config: uniform steps, every seed."""
    return SimpleNamespace(seed_start=int(cfg.seed_start), num_samples=int(cfg.num_samples), labels=cfg.labels,
                           timesteps="uniform", num_timesteps=int(cfg.num_timesteps), batch_size=int(cfg.batch_size))


def selected_steps(num_steps: int, cfg) -> list[int]:
    """The sampler step indices (0 = noisiest) the records are taken at."""
    tc = trajectory_config(cfg)
    return sorted(select_steps(num_steps, tc, [tc.seed_start])[0])


def records_spec(cfg, *, model: str, sampler: dict, dtype: str) -> dict:
    """Cache key of the records: everything that determines them (not batch sizes or switches)."""
    keys = ("seed_start", "num_samples", "labels", "num_timesteps")
    c = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return {"v": RECORDS_VERSION, "model": model, "sampler": sampler, "dtype": dtype,
            "diagnostics": {k: c[k] for k in keys}}


def heldout_records(sampler, cfg, conditions=None, *, cache=None, spec: dict | None = None,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """{"x", "t", "y", "seed", "step"} of the held-out seeds, from `cache` (kind "diag_inputs") when
    stored there. The sampler's model must run in full precision while this builds."""
    def build():
        return collect_trajectory_inputs(sampler, trajectory_config(cfg), conditions, progress=progress)

    if cache is None or spec is None:
        return build()
    return cache.get_or_create("diag_inputs", spec, build)
