"""Denoising factor gamma_t (MSFP's DFA loss): how much of an error in the predicted noise at timestep t
reaches the next sample under the run's sampler.

A sampler step is x_prev = step(eps, t, x). For the schedulers used here the step is affine in the
current noise prediction eps, x_prev = a_t x + gamma_t eps + (terms of earlier predictions, noise), so an
error delta in eps moves x_prev by exactly gamma_t delta: gamma_t is that coefficient.

DDIM (eta = 0), with abar_t the cumulative alpha at t and abar_prev the one at the next (less noisy)
timestep (the final alpha, 1 with set_alpha_to_one, after the last step):
    x0_pred = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x_prev  = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev) eps
            = sqrt(abar_prev / abar_t) x_t + [sqrt(1 - abar_prev) - sqrt(abar_prev (1 - abar_t) / abar_t)] eps
so  gamma_t = sqrt(1 - abar_prev) - sqrt(abar_prev (1 - abar_t) / abar_t)    (`ddim_gamma`).
It is negative (x0_pred removes the predicted noise) and largest in magnitude at the first, noisiest
steps (embedded DiT, ddim25: -0.46 at t = 960, -0.13 at t = 40, -0.01 at the last step t = 0).

`measured_gamma` measures the same coefficient numerically through any diffusers scheduler: at each
step it runs `scheduler.step` on copies of the scheduler's state with eps = 0 and eps = 1 on the same x
(and the same generator for stochastic samplers, whose noise then cancels) and takes the difference;
the scheduler then advances. Valid for any scheduler linear in the current eps (DDIM with any eta,
DDPM, DPM-Solver's coefficient of the current model output).

Loss weights (`dfa_weights`): w_t = |gamma_t|^p normalised to mean 1 over the sampler's timesteps
(p = 1: the loss scaled by the factor, the method's statement; p = 2: the weighted MSE is the squared
error that reaches x_prev).
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

__all__ = ["ddim_gamma", "measured_gamma", "gamma_for_sampler", "dfa_weights"]


def ddim_gamma(scheduler) -> dict[int, float]:
    """{timestep: gamma_t} of a DDIM scheduler (eta 0) whose `set_timesteps` was called (closed form)."""
    ac = scheduler.alphas_cumprod.double()
    ts = [int(t) for t in scheduler.timesteps]
    final = float(scheduler.final_alpha_cumprod)
    out = {}
    for i, t in enumerate(ts):
        a_t = float(ac[t])
        # diffusers' DDIM: prev = t - num_train_timesteps // num_inference_steps
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        a_prev = float(ac[prev]) if prev >= 0 else final
        out[t] = (1 - a_prev) ** 0.5 - (a_prev * (1 - a_t) / a_t) ** 0.5
    return out


def measured_gamma(make_scheduler: Callable[[], object], sample_shape: Sequence[int] = (1, 1, 2, 2),
                   step_kwargs: Callable[[], dict] | None = None) -> dict[int, float]:
    """{timestep: gamma_t} measured through `scheduler.step` (module doc). `make_scheduler()` returns a
    scheduler with its timesteps set; `step_kwargs()` gives the extra arguments of each step call (e.g.
    a fresh seeded generator, so both calls draw the same noise)."""
    sch = make_scheduler()
    kw = step_kwargs or (lambda: {})
    x = torch.zeros(tuple(sample_shape), dtype=torch.float64)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    out = {}
    for t in sch.timesteps:
        a = copy.deepcopy(sch).step(zero, t, x, **kw()).prev_sample
        b = copy.deepcopy(sch).step(one, t, x, **kw()).prev_sample
        out[int(t)] = float((b - a).double().mean())
        sch.step(zero, t, x, **kw())  # advance the state (multistep solvers keep earlier predictions)
    return out


def gamma_for_sampler(sampler) -> dict[int, float]:
    """gamma_t of a `ditq.sampling.Sampler`'s scheduler: the closed form for DDIM with eta 0, else measured."""
    cfg = sampler.cfg
    if cfg.kind == "ddim" and float(getattr(cfg, "eta", 0.0)) == 0.0:
        return ddim_gamma(sampler.make_scheduler())
    kw = None
    if cfg.kind == "ddpm" or cfg.kind == "ddim":
        kw = (lambda: {"generator": torch.Generator().manual_seed(0),
                       **({"eta": float(cfg.eta)} if cfg.kind == "ddim" else {})})
    return measured_gamma(sampler.make_scheduler, step_kwargs=kw)


def dfa_weights(gamma: dict[int, float], power: float = 1.0) -> dict[int, float]:
    """{timestep: |gamma_t|^power / mean over timesteps} (mean 1; power 0: all ones)."""
    if not gamma:
        raise ValueError("DFA weights need at least one timestep")
    raw = {t: abs(g) ** power for t, g in gamma.items()}
    mean = sum(raw.values()) / len(raw)
    if not mean > 0:
        raise ValueError(f"denoising factors are all zero ({gamma}); DFA weights are undefined: set dfa=false")
    return {t: v / mean for t, v in raw.items()}
