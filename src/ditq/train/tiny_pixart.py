"""Train the embedded text-to-image DiT on scikit-learn's digits with captions (pixel space, 8x8).

    python -m ditq.train.tiny_pixart [--steps 7000] [--out src/ditq/assets/tiny_pixart_digits]

The denoiser is diffusers' `PixArtTransformer2DModel` (the class PixArt-alpha and PixArt-Sigma
load into: adaLN-single, self-attention, cross-attention to the caption, caption projection) at
a small width: hidden 128, 6 blocks, 4 heads, patch 2, 1 channel. The text encoder is
transformers' `T5EncoderModel` (PixArt's encoder family) at d_model 64, 2 layers, with a
word-level tokenizer built here over the caption vocabulary (`ditq.data.captions`), T5's special
tokens (pad 0, eos 1, unk 2) and a 16-token limit. Both are trained together from scratch; the
result is saved in the layout of the hub's PixArt pipelines (`transformer/`, `text_encoder/`,
`tokenizer/`, `scheduler/`), so the embedded model and the real ones load through the same code.

Classifier-free guidance: 10% of the captions are replaced by the empty prompt "" (its T5
encoding is the unconditional embedding, as diffusers' PixArt pipelines use for the negative
prompt). Initialisation as PixArt: xavier linears, N(0, 0.02) timestep and caption embedders,
zeroed cross-attention output and final projection.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ditq.data.captions import DIGIT_CAPTIONS, random_caption_indices
from ditq.data.digits import load_digits_tensors
from ditq.paths import ASSETS_DIR
from ditq.train.loop import alphas_cumprod, noised, parse_training_args, train, train_meta, training_parser, write_meta

DEFAULT_OUT = ASSETS_DIR / "tiny_pixart_digits"
MAX_TOKENS = 16

ARCH = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    cross_attention_dim=128,
    sample_size=8,
    patch_size=2,
    caption_channels=64,
    norm_type="ada_norm_single",
    use_additional_conditions=False,
    activation_fn="gelu-approximate",
)
TEXT_ARCH = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                 relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def build_tokenizer():
    """A word-level T5-style tokenizer over the caption vocabulary (lower case, whitespace split)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in DIGIT_CAPTIONS for w in c.lower().split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=MAX_TOKENS)


def build_text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, **TEXT_ARCH))


def build_transformer():
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(**ARCH)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    conv = model.pos_embed.proj
    nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
    nn.init.zeros_(conv.bias)
    te = model.adaln_single.emb.timestep_embedder
    for lin in (te.linear_1, te.linear_2, model.caption_projection.linear_1, model.caption_projection.linear_2):
        nn.init.normal_(lin.weight, std=0.02)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)
    return model


def tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class Pair(nn.Module):
    """Text encoder + transformer, trained together."""

    def __init__(self, text_encoder, transformer):
        super().__init__()
        self.text_encoder, self.transformer = text_encoder, transformer

    def forward(self, xt, t, ids, mask):
        emb = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.transformer(xt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t).sample


def save(model: Pair, tokenizer, out: Path, meta: dict) -> None:
    from diffusers import DPMSolverMultistepScheduler

    out.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(out / "transformer")
    model.text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    DPMSolverMultistepScheduler(**SCHEDULE).save_pretrained(out / "scheduler")
    write_meta(out, meta)


def main(argv: list[str] | None = None) -> None:
    p = training_parser(__doc__, steps=7000, lr=3e-4, save_every=500, out=DEFAULT_OUT)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    args = parse_training_args(p, argv)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, digits = load_digits_tensors()
    tokenizer = build_tokenizer()
    ids_all, mask_all = tokenize(tokenizer, [*DIGIT_CAPTIONS, ""])  # last row: the empty prompt
    null = len(DIGIT_CAPTIONS)
    model = Pair(build_text_encoder(len(tokenizer)), build_transformer()).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    print(f"tiny PixArt: {sum(p.numel() for p in model.transformer.parameters()) / 1e6:.2f}M transformer + "
          f"{sum(p.numel() for p in model.text_encoder.parameters()) / 1e6:.3f}M text encoder parameters")

    abar = alphas_cumprod(SCHEDULE)
    warmup = 200

    def loss_at(step):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x0 = images[idx]
        cap = torch.from_numpy(random_caption_indices(digits[idx].numpy(), rng))
        cap[torch.rand(args.batch_size, generator=gen) < args.caption_dropout] = null
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        return F.mse_loss(model(noised(x0, t, noise, abar), t, ids_all[cap], mask_all[cap]), noise)

    def on_save(step, running, seconds):
        meta = train_meta(args, step, running, seconds, arch=ARCH, text_arch=TEXT_ARCH, max_tokens=MAX_TOKENS,
                          schedule=SCHEDULE, caption_dropout=args.caption_dropout)
        save(ema, tokenizer, out, meta)

    out = Path(args.out)
    seconds = train(model, ema, steps=args.steps, lr_at=lambda step: args.lr * min(1.0, step / warmup),
                    loss_at=loss_at, ema_decay=args.ema, save_every=args.save_every, on_save=on_save)
    print(f"saved {out} after {seconds:.0f}s")


if __name__ == "__main__":
    main()
