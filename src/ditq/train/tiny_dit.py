"""Train the embedded class-conditional DiT on scikit-learn's digits (pixel space, 8x8).

    python -m ditq.train.tiny_dit [--steps 6000] [--out src/ditq/assets/tiny_dit_digits]

The model is diffusers' `DiTTransformer2DModel` (the class DiT-XL/2 loads into) at a small
width: hidden 128, 6 blocks, 4 heads, patch 2, 1 channel. The result is saved in the layout
of the hub's `facebook/DiT-XL-2-256` (`transformer/`, `scheduler/`), so the embedded model
and the real one load through the same code.

Two details of diffusers' DiT are handled here as the original DiT does them:
  - class-label dropout for classifier-free guidance happens once per sample, outside the
    model (diffusers drops labels independently inside every block and once more in the
    output layer); the null class is index `num_classes`;
  - adaLN-Zero initialisation: zeroed modulation linears and output layer; xavier linears.
The timestep/label embedder is shared by all blocks during training (as in the original DiT)
and saved as identical per-block copies (as diffusers' converted DiT-XL/2 checkpoints are).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditq.data.digits import NUM_CLASSES, load_digits_tensors
from ditq.paths import ASSETS_DIR
from ditq.train.loop import alphas_cumprod, noised, parse_training_args, train, train_meta, training_parser, write_meta

DEFAULT_OUT = ASSETS_DIR / "tiny_dit_digits"

ARCH = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,
    norm_type="ada_norm_zero",
    activation_fn="gelu-approximate",
)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def build_model():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**ARCH)
    shared_emb = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
        block.norm1.emb = shared_emb
    shared_emb.class_embedder.dropout_prob = 0.0  # dropout is done once, outside (see module doc)
    dit_initialize(model)
    return model


def dit_initialize(model: nn.Module) -> None:
    """The DiT paper's initialisation (facebookresearch/DiT `initialize_weights`)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    conv = model.pos_embed.proj
    nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
    nn.init.zeros_(conv.bias)
    emb = model.transformer_blocks[0].norm1.emb
    nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def untie_embedders(model: nn.Module) -> nn.Module:
    """Give every block its own copy of the shared embedder (the saved, diffusers layout)."""
    model = copy.deepcopy(model)
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = copy.deepcopy(block.norm1.emb)
    return model


def save(model: nn.Module, out: Path, meta: dict) -> None:
    from diffusers import DDIMScheduler

    out.mkdir(parents=True, exist_ok=True)
    untie_embedders(model).save_pretrained(out / "transformer")
    DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False).save_pretrained(out / "scheduler")
    write_meta(out, meta)


def main(argv: list[str] | None = None) -> None:
    p = training_parser(__doc__, steps=6000, lr=3e-4, save_every=1000, out=DEFAULT_OUT)
    p.add_argument("--label-dropout", type=float, default=0.1)
    args = parse_training_args(p, argv)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_tensors()
    model = build_model().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny DiT: {n_params / 1e6:.2f}M trainable parameters (embedder shared while training)")

    abar = alphas_cumprod(SCHEDULE)
    warmup = 200

    def loss_at(step):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.label_dropout
        y[drop] = NUM_CLASSES
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        return F.mse_loss(model(noised(x0, t, noise, abar), timestep=t, class_labels=y).sample, noise)

    def on_save(step, running, seconds):
        meta = train_meta(args, step, running, seconds, arch=ARCH, schedule=SCHEDULE,
                          label_dropout=args.label_dropout)
        save(ema, out, meta)

    out = Path(args.out)
    seconds = train(model, ema, steps=args.steps, lr_at=lambda step: args.lr * min(1.0, step / warmup),
                    loss_at=loss_at, ema_decay=args.ema, save_every=args.save_every, on_save=on_save)
    print(f"saved {out} after {seconds:.0f}s")


if __name__ == "__main__":
    main()
