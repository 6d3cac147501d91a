"""The training loop shared by the embedded diffusion models (tiny DiT, tiny PixArt, tiny U-Net).

Each script supplies what differs: how a batch is drawn and its loss (`loss_at(step)`, which draws
its random numbers in its own order), the learning-rate rule (`lr_at(step)`) and what a checkpoint
holds (`on_save(step, running_loss, seconds)`). The loop does the rest the same way for all of them:
AdamW without weight decay, gradient clipping at 1.0, an EMA copy with a warm-up of its decay (early
averages do not hold the random init), a smoothed loss printed every 100 steps, and a checkpoint every
`save_every` steps and at the end.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn


def alphas_cumprod(schedule: dict) -> torch.Tensor:
    """abar_t of a linear beta schedule (`num_train_timesteps`, `beta_start`, `beta_end`), float32."""
    betas = torch.linspace(schedule["beta_start"], schedule["beta_end"], schedule["num_train_timesteps"],
                           dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def noised(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, one t per row."""
    a = abar[t].view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def train(model: nn.Module, ema: nn.Module, *, steps: int, lr_at: Callable[[int], float],
          loss_at: Callable[[int], torch.Tensor], ema_decay: float, save_every: int,
          on_save: Callable[[int, float, float], None]) -> float:
    """Train `model` for `steps` steps (1-based) and keep `ema` averaged; returns the seconds taken."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(1), weight_decay=0.0)
    t0 = time.time()
    running = None
    for step in range(1, steps + 1):
        loss = loss_at(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0:
            el = time.time() - t0
            print(f"step {step}/{steps}  loss {running:.4f}  {el:.0f}s  ({el / step:.3f}s/step)", flush=True)
        if step % save_every == 0 or step == steps:
            on_save(step, running, round(time.time() - t0, 1))
    return time.time() - t0
