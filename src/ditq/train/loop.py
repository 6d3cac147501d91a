"""The training loop shared by the embedded diffusion models (tiny DiT, tiny PixArt, tiny U-Net).

Each script supplies what differs: how a batch is drawn and its loss (`loss_at(step)`, which draws
its random numbers in its own order), the learning-rate rule (`lr_at(step)`) and what a checkpoint
holds (`on_save(step, running_loss, seconds)`). The loop does the rest the same way for all of them:
AdamW without weight decay, gradient clipping at 1.0, an EMA copy with a warm-up of its decay (early
averages do not hold the random init), a smoothed loss printed every 100 steps, and a checkpoint every
`save_every` steps and at the end. The scripts also share their command-line options
(`training_parser`, `parse_training_args`) and the run fields of their `train_meta.json`
(`train_meta`, `write_meta`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn


def training_parser(description: str | None, *, steps: int, lr: float, save_every: int,
                    out: Path) -> argparse.ArgumentParser:
    """The options every training script takes, with its own defaults; a script adds its own options."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=save_every)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(out))
    return p


def parse_training_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then set torch's thread count (when given) and its global seed."""
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def train_meta(args: argparse.Namespace, step: int, running: float, seconds: float, **fields) -> dict:
    """A checkpoint's `train_meta.json`: the script's own `fields` (architecture, schedule, its options),
    then the run's shared options, how far it got and with which torch."""
    return {**fields, "steps": step, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
            "seed": args.seed, "final_loss_ema": running, "train_seconds": seconds, "torch": torch.__version__}


def write_meta(out: Path, meta: dict) -> None:
    (out / "train_meta.json").write_text(json.dumps(meta, indent=1))


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
