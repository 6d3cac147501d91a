"""Small builders shared by tests."""
from __future__ import annotations

from omegaconf import OmegaConf

from ditq.config.schema import ModelConfig, SamplerConfig

TINY_ARCH = dict(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=2,
                 sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def random_dit(arch: dict | None = None, **kw):
    """A small randomly initialised DiT adapter (no files needed)."""
    from ditq.models import load_adapter

    cfg = OmegaConf.structured(ModelConfig(name="random_dit", weights="random", arch=dict(arch or TINY_ARCH),
                                           resolution=8, num_classes=10, **kw))
    adapter = load_adapter(cfg)
    # random init leaves adaLN-Zero layers at diffusers' defaults; give them weight so outputs depend on inputs
    import torch

    g = torch.Generator().manual_seed(1)
    for p in adapter.denoiser.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return adapter


def denoise_inputs(n: int = 6, seed: int = 0, channels: int = 1, side: int = 8):
    """(x, t, y) for a digits-sized denoiser: seeded noise, timesteps from 999 down to 1, labels with
    the last one the null (unconditional) label 10."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, side, side, generator=g)
    t = torch.tensor([999, 800, 500, 250, 60, 1][:n])
    y = torch.arange(n) % 10
    y[-1] = 10  # the null (unconditional) label
    return x, t, y


def rel_max_err(a, b) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def sampler_cfg(**kw):
    base = dict(name="t", kind="ddim", num_steps=5, cfg_scale=1.5, batch_size=8)
    base.update(kw)
    return OmegaConf.structured(SamplerConfig(**base))


def run_pipeline(compose, overrides, out_dir, shrink: bool = True):
    """One pipeline run of the composed config (shrunk to seconds by default); returns its row."""
    from ditq.config import validate_config
    from ditq.pipeline import run
    from tests.conftest import SHRINK

    cfg = validate_config(compose((SHRINK if shrink else []) + list(overrides)))
    return run(cfg, output_dir=out_dir, progress=False)
