"""Samplers through diffusers' schedulers (DDIM, DPM-Solver, DDPM) with classifier-free guidance.

Guidance follows the original DiT: eps = uncond + s * (cond - uncond) on the first
`cfg_channels` output channels (DiT-XL/2: 3 of 4 latent channels), the conditional prediction
on the rest; `cfg_scale == 1` runs the conditional branch only.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ditq.sampling.seeds import noise_for_seeds, step_generators

# callback(step_index, t, x_t, y) sees the denoiser's input at every step (calibration uses it);
# y: condition indices (ditq.conditioning: class labels, prompt indices or zeros)
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class Sampler:
    def __init__(self, adapter, cfg, clip_sample: bool = False):
        self.adapter = adapter
        self.cfg = cfg
        self.clip_sample = clip_sample

    def make_scheduler(self):
        """A fresh scheduler (multistep solvers keep state between steps)."""
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

        base = self.adapter.scheduler_config()
        c = self.cfg
        if c.kind == "ddim":
            sch = DDIMScheduler.from_config(
                base, timestep_spacing=c.timestep_spacing, set_alpha_to_one=True, clip_sample=self.clip_sample
            )
        elif c.kind == "dpm_solver":
            sch = DPMSolverMultistepScheduler.from_config(
                base,
                timestep_spacing=c.timestep_spacing,
                solver_order=c.solver_order,
                algorithm_type=c.algorithm,
                thresholding=False,
                lower_order_final=True,
            )
        elif c.kind == "ddpm":
            sch = DDPMScheduler.from_config(
                base, timestep_spacing=c.timestep_spacing, clip_sample=self.clip_sample, variance_type="fixed_small"
            )
        else:
            raise ValueError(f"sampler.kind={c.kind!r}; choose one of: ddim, dpm_solver, ddpm")
        sch.set_timesteps(c.num_steps)
        return sch

    def timesteps(self) -> list[int]:
        return [int(t) for t in self.make_scheduler().timesteps]

    def guided_eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.cfg.cfg_scale
        if s == 1.0:
            return self.adapter.denoise(x, t, y)
        null = self.adapter.conditions.null_like(y)  # GuidanceError for a model without one
        eps = self.adapter.denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = eps.chunk(2)
        k = self.adapter.cfg_channels or x.shape[1]
        out = cond.clone()
        out[:, :k] = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
        return out

    @torch.no_grad()
    def sample_batch(self, seeds: list[int], labels: torch.Tensor, callback: StepCallback | None = None,
                     progress: tqdm | None = None) -> torch.Tensor:
        device = self.adapter.device
        sch = self.make_scheduler()
        x = noise_for_seeds(seeds, self.adapter.latent_shape).to(device) * sch.init_noise_sigma
        y = labels.to(device)
        stochastic = self.cfg.kind == "ddpm" or (self.cfg.kind == "ddim" and self.cfg.eta > 0)
        gens = step_generators(seeds) if stochastic else None
        for i, t in enumerate(sch.timesteps):
            if callback is not None:
                callback(i, int(t), x, y)
            tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
            eps = self.guided_eps(sch.scale_model_input(x, t), tt, y)
            kwargs = {}
            if self.cfg.kind == "ddim":
                kwargs = {"eta": self.cfg.eta, "generator": gens}
            elif self.cfg.kind == "ddpm":
                kwargs = {"generator": gens}
            x = sch.step(eps, t, x, **kwargs).prev_sample
            if progress is not None:
                progress.update(1)
        return x

    def sample(self, seeds: list[int], labels: torch.Tensor, batch_size: int | None = None,
               callback: StepCallback | None = None, desc: str = "sampling", progress: bool = True) -> torch.Tensor:
        """Final samples (model space, on CPU) for `seeds` with condition indices `labels`, in seed order."""
        bs = batch_size or self.cfg.batch_size
        out = []
        n_batches = (len(seeds) + bs - 1) // bs
        with tqdm(total=n_batches * self.cfg.num_steps, desc=desc, unit="step", disable=not progress,
                  dynamic_ncols=True, mininterval=2.0) as bar:
            for b in range(0, len(seeds), bs):
                x = self.sample_batch(seeds[b : b + bs], labels[b : b + bs], callback, bar).cpu()
                if not torch.isfinite(x).all():
                    bad = [seeds[b + i] for i in (~torch.isfinite(x.flatten(1))).any(1).nonzero().flatten().tolist()]
                    raise FloatingPointError(
                        f"{desc}: the model produced NaN/Inf samples for seeds {bad[:8]}{' ...' if len(bad) > 8 else ''}. "
                        "A quantized model: a static activation range or format overflowed (try dynamic "
                        "activations or a wider format); full precision: check the checkpoint and dtype_inference."
                    )
                out.append(x)
        return torch.cat(out)
