"""Train the embedded unconditional U-Net on scikit-learn's digits (pixel space, 8x8).

    python -m ditq.train.tiny_unet [--steps 8000] [--out src/ditq/assets/tiny_unet_digits]

The model is diffusers' `UNet2DModel` (the class DDPM CIFAR-10 and the latent-diffusion U-Nets
load into) at a small width: channels (32, 64, 64), one ResNet per level, self-attention at 4x4 as
DDPM's CIFAR-10 model has it at 16x16, GroupNorm + SiLU in front of every convolution (the inputs
MSFP calls anomalous), sinusoidal timestep embedding. It is unconditional: the digits' labels are
not used. Saved in the layout of the hub's `CompVis/ldm-celebahq-256` (`unet/`, `scheduler/`), so
the embedded model and the real ones load through the same code.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from ditq.data.digits import load_digits_tensors
from ditq.paths import ASSETS_DIR
from ditq.train.loop import alphas_cumprod, noised, parse_training_args, train, train_meta, training_parser, write_meta
from ditq.train.tiny_dit import SCHEDULE

DEFAULT_OUT = ASSETS_DIR / "tiny_unet_digits"

ARCH = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
    act_fn="silu",
    time_embedding_type="positional",
    flip_sin_to_cos=True,
    freq_shift=0,
)


def build_model():
    from diffusers import UNet2DModel

    return UNet2DModel(**ARCH)


def save(model, out: Path, meta: dict) -> None:
    from diffusers import DDIMScheduler

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "unet")
    DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False).save_pretrained(out / "scheduler")
    write_meta(out, meta)


def main(argv: list[str] | None = None) -> None:
    p = training_parser(__doc__, steps=8000, lr=5e-4, save_every=1000, out=DEFAULT_OUT)
    args = parse_training_args(p, argv)
    gen = torch.Generator().manual_seed(args.seed)
    images, _ = load_digits_tensors()
    model = build_model().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny U-Net: {n_params / 1e6:.3f}M parameters")

    abar = alphas_cumprod(SCHEDULE)
    warmup = 200

    def lr_at(step):  # linear warm-up, then cosine down to 0.1x
        cosine = 0.5 * (1 + torch.cos(torch.tensor(step / args.steps * torch.pi))).item()
        return args.lr * min(1.0, step / warmup) * (0.1 + 0.9 * cosine)

    def loss_at(step):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x0 = images[idx]
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        return F.mse_loss(model(noised(x0, t, noise, abar), t).sample, noise)

    def on_save(step, running, seconds):
        meta = train_meta(args, step, running, seconds, arch=ARCH, schedule=SCHEDULE,
                          lr_schedule="linear warm-up 200, cosine to 0.1x")
        save(ema, out, meta)

    out = Path(args.out)
    seconds = train(model, ema, steps=args.steps, lr_at=lr_at, loss_at=loss_at, ema_decay=args.ema,
                    save_every=args.save_every, on_save=on_save)
    print(f"saved {out} after {seconds:.0f}s")


if __name__ == "__main__":
    main()
