"""Convert a latent-diffusion release checkpoint to diffusers' layout (what `UNetAdapter` loads).

    python -m ditq.models.convert_ldm --ckpt model.ckpt --config lsun_churches256 --out checkpoints/ldm-lsun-church-256

`--config` is the checkpoint's LDM YAML (`models/ldm/<name>/config.yaml` of the release zip) or a preset
name (`PRESETS`: the unconditional release models, their values read from CompVis/latent-diffusion's
`models/ldm/{celeba256,lsun_beds256,lsun_churches256}/config.yaml`). The output directory holds
  unet/       UNet2DModel (openaimodel's UNetModel, key by key; attention qkv split per head)
  vqvae/      VQModel (first stage `VQModelInterface`)  or  vae/  AutoencoderKL (first stage `AutoencoderKL`)
  scheduler/  DDIMScheduler: LDM's "linear" schedule is diffusers' scaled_linear (linspace of sqrt(beta)),
              steps_offset 1 and set_alpha_to_one false as LDM's DDIM sampler (timesteps 1, 1 + T/S, ...)
  ldm_conversion.json  the source, the preset, the EMA choice and LDM's latent `scale_factor`
The mapping is strict both ways: every key of the checkpoint is consumed (weights converted, the
diffusion schedule buffers checked against the config, EMA shadow copies used or knowingly dropped) or
the conversion fails naming the leftover keys, and every diffusers parameter must be filled
(`load_state_dict(strict=True)`). The output is written to a temporary directory next to `--out` and
renamed into place, so an existing directory is never half-overwritten.

LDM's layout (ldm/modules/diffusionmodules/openaimodel.py, UNetModel): `input_blocks.0.0` is the input
conv; then per level l and ResBlock j, `input_blocks.{1 + l (R+1) + j}` = [ResBlock, AttentionBlock?],
and per level but the last, `input_blocks.{1 + l (R+1) + R}.0` = Downsample (`op`) or a down ResBlock
(resblock_updown); `middle_block` = [ResBlock, AttentionBlock, ResBlock]; `output_blocks.{u (R+1) + j}`
= [ResBlock, AttentionBlock?, Upsample (`conv`) or up ResBlock?] from the deepest level up; `out` =
[GroupNorm, SiLU, conv]; `time_embed` = [Linear, SiLU, Linear]. ResBlock: in_layers [norm, SiLU, conv],
emb_layers [SiLU, Linear], out_layers [norm, SiLU, Dropout, conv], skip_connection (1x1 conv when the
width changes). AttentionBlock: norm, qkv (Conv1d C -> 3C), proj_out (Conv1d); QKVAttentionLegacy
splits qkv's channels per head as [q_h, k_h, v_h] blocks (the new order: [q, k, v] each over heads).
Attention sits at level l when 2**l is in `attention_resolutions` (downsampling factors, not sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
# LatentDiffusion / DDPM buffers of the diffusion schedule (ldm/models/diffusion/ddpm.py register_schedule)
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights")


class ConversionError(ValueError):
    """The checkpoint and the config do not fit together (the message names the keys)."""


def _vq_f4() -> dict:
    return {"target": "ldm.models.autoencoder.VQModelInterface",
            "params": {"embed_dim": 3, "n_embed": 8192,
                       "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3,
                                    "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2,
                                    "attn_resolutions": [], "dropout": 0.0}}}


def _ldm4_unet() -> dict:
    return {"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
            "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
            "num_head_channels": 32}


# The `model.params` of the release configs (CompVis/latent-diffusion models/ldm/<name>/config.yaml).
PRESETS: dict[str, dict] = {
    "celeba256": {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 64,
                  "channels": 3, "unet_config": {"params": _ldm4_unet()}, "first_stage_config": _vq_f4()},
    "lsun_beds256": {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 64,
                     "channels": 3, "unet_config": {"params": _ldm4_unet()}, "first_stage_config": _vq_f4()},
    "lsun_churches256": {
        "linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "image_size": 32, "channels": 4,
        "scale_by_std": True,
        "unet_config": {"params": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
                                   "attention_resolutions": [1, 2, 4, 8], "num_res_blocks": 2,
                                   "channel_mult": [1, 2, 2, 4, 4], "num_heads": 8, "use_scale_shift_norm": True,
                                   "resblock_updown": True}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": 4,
                                          "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256,
                                                       "in_channels": 3, "out_ch": 3, "ch": 128,
                                                       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                                       "attn_resolutions": [], "dropout": 0.0}}},
    },
}
PRESET_ALIASES = {"celebahq": "celeba256", "lsun_bedrooms": "lsun_beds256", "lsun_bedroom": "lsun_beds256",
                  "lsun_churches": "lsun_churches256", "lsun_church": "lsun_churches256"}


# ---------------------------------------------------------------------------------------------------
# configs
def load_ldm_config(spec: str) -> dict:
    """`model.params` of an LDM config: a preset name or a YAML file (the release's config.yaml)."""
    name = PRESET_ALIASES.get(spec, spec)
    if name in PRESETS:
        return json.loads(json.dumps(PRESETS[name]))
    path = Path(spec)
    if not path.is_file():
        raise ConversionError(f"--config {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a file")
    import yaml

    doc = yaml.safe_load(path.read_text())
    try:
        params = dict(doc["model"]["params"])
    except (KeyError, TypeError):
        raise ConversionError(f"{path}: no model.params (is it a latent-diffusion config?)") from None
    target = str(doc["model"].get("target", ""))
    if not target.endswith("LatentDiffusion"):
        raise ConversionError(f"{path}: model.target is {target!r}; only LatentDiffusion checkpoints convert")
    cond = params.get("cond_stage_config")
    if cond not in (None, "__is_unconditional__") and params.get("conditioning_key") is not None:
        raise ConversionError(f"{path}: the model is conditional (conditioning_key="
                              f"{params.get('conditioning_key')!r}); ditq's U-Net adapter serves unconditional models")
    return params


def unet_arch(up: dict) -> tuple[dict, int | None]:
    """(UNet2DModel kwargs, number of heads when LDM fixes the head count instead of the head width)."""
    bad = {k: up[k] for k in ("num_classes", "context_dim") if up.get(k) is not None}
    bad.update({k: up[k] for k in ("use_spatial_transformer",) if up.get(k)})
    if up.get("dims", 2) != 2:
        bad["dims"] = up["dims"]
    if up.get("num_heads_upsample", -1) not in (-1, up.get("num_heads", -1)):
        bad["num_heads_upsample"] = up["num_heads_upsample"]
    if bad:
        raise ConversionError(f"unet_config has settings UNet2DModel cannot express: {bad}")
    if up.get("num_res_blocks") is None or not isinstance(up["num_res_blocks"], int):
        raise ConversionError(f"unet_config.num_res_blocks must be one integer, got {up.get('num_res_blocks')!r}")
    mult = list(up.get("channel_mult", [1, 2, 4, 8]))
    ch = int(up["model_channels"])
    attn = {int(a) for a in up["attention_resolutions"]}
    has_attn = [2 ** level in attn for level in range(len(mult))]
    updown = bool(up.get("resblock_updown", False))
    down = ["AttnDownBlock2D" if a else ("ResnetDownsampleBlock2D" if updown and i < len(mult) - 1 else "DownBlock2D")
            for i, a in enumerate(has_attn)]
    up_types = ["AttnUpBlock2D" if a else ("ResnetUpsampleBlock2D" if updown and i > 0 else "UpBlock2D")
                for i, a in reversed(list(enumerate(has_attn)))]
    head_ch, heads = int(up.get("num_head_channels", -1)), int(up.get("num_heads", -1))
    arch = {
        "sample_size": int(up["image_size"]), "in_channels": int(up["in_channels"]),
        "out_channels": int(up["out_channels"]), "center_input_sample": False, "time_embedding_type": "positional",
        "flip_sin_to_cos": True, "freq_shift": 0,  # openaimodel.timestep_embedding: [cos, sin], exponent / half
        "down_block_types": down, "up_block_types": up_types,
        "block_out_channels": [ch * m for m in mult], "layers_per_block": int(up["num_res_blocks"]),
        "mid_block_scale_factor": 1, "downsample_padding": 1, "act_fn": "silu", "norm_num_groups": 32,
        "norm_eps": 1e-5, "resnet_time_scale_shift": "scale_shift" if up.get("use_scale_shift_norm") else "default",
        "add_attention": True,
    }
    if up.get("use_scale_shift_norm"):
        # UNetMidBlock2D drops the mid attention's GroupNorm unless the time shift is "default"; LDM keeps it
        arch["attn_norm_num_groups"] = 32
    if updown:
        arch["downsample_type"], arch["upsample_type"] = "resnet", "resnet"
    if head_ch != -1:
        arch["attention_head_dim"] = head_ch
        return arch, None
    if heads <= 0:
        raise ConversionError("unet_config needs num_head_channels or num_heads")
    # UNet2DModel has one head *width*; LDM's num_heads fixes the head *count* at every level: build single-head
    # attentions (attention_head_dim=None: width = channels) and set the count afterwards (ditq_num_attention_heads).
    arch["attention_head_dim"] = None
    return arch, heads


def first_stage_arch(fs: dict) -> dict:
    """VQModel / AutoencoderKL kwargs (with `_class`) of an LDM first stage (taming's Encoder/Decoder)."""
    target, p = str(fs.get("target", "")), dict(fs.get("params", {}))
    dd = dict(p["ddconfig"])
    if list(dd.get("attn_resolutions", [])):
        raise ConversionError(f"first_stage ddconfig.attn_resolutions={dd['attn_resolutions']}: diffusers' "
                              "Encoder/Decoder have attention only in the middle block")
    n = len(dd["ch_mult"])
    common = {"in_channels": int(dd["in_channels"]), "out_channels": int(dd["out_ch"]),
              "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
              "block_out_channels": [int(dd["ch"]) * int(m) for m in dd["ch_mult"]],
              "layers_per_block": int(dd["num_res_blocks"]), "act_fn": "silu", "latent_channels": int(dd["z_channels"]),
              "sample_size": int(dd["resolution"]), "norm_num_groups": 32}
    if target.endswith("VQModelInterface") or target.endswith("VQModel"):
        if dd.get("double_z"):
            raise ConversionError("a VQ first stage with double_z=true is not a taming VQ autoencoder")
        return {"_class": "VQModel", **common, "num_vq_embeddings": int(p["n_embed"]),
                "vq_embed_dim": int(p["embed_dim"])}
    if target.endswith("AutoencoderKL"):
        if not dd.get("double_z", True) or int(p["embed_dim"]) != int(dd["z_channels"]):
            raise ConversionError(f"AutoencoderKL with double_z={dd.get('double_z')} and embed_dim={p['embed_dim']} "
                                  f"!= z_channels={dd['z_channels']}: diffusers' AutoencoderKL cannot express it")
        return {"_class": "AutoencoderKL", **common}
    raise ConversionError(f"first_stage_config.target={target!r}: expected VQModelInterface or AutoencoderKL")


def scheduler_config(params: dict) -> dict:
    if params.get("parameterization", "eps") != "eps":
        raise ConversionError(f"parameterization={params['parameterization']!r}: only eps-prediction models convert")
    if params.get("beta_schedule", "linear") != "linear":
        raise ConversionError(f"beta_schedule={params['beta_schedule']!r}: only LDM's 'linear' schedule converts")
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": int(params.get("timesteps", 1000)),
            "beta_start": float(params.get("linear_start", 1e-4)), "beta_end": float(params.get("linear_end", 2e-2)),
            "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
            "prediction_type": "epsilon"}


def ldm_betas(sched: dict) -> torch.Tensor:
    """ldm.modules.diffusionmodules.util.make_beta_schedule("linear"): linspace of sqrt(beta), squared."""
    n = sched["num_train_timesteps"]
    return torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2


# ---------------------------------------------------------------------------------------------------
# key mapping
class Source:
    """The checkpoint's tensors under a prefix; `take` marks a key consumed (a key taken twice is a bug)."""

    def __init__(self, sd: dict, prefix: str):
        self.sd, self.prefix = sd, prefix
        self.left = {k for k in sd if k.startswith(prefix)}

    def take(self, key: str) -> torch.Tensor:
        full = self.prefix + key
        if full not in self.sd:
            raise ConversionError(f"the checkpoint has no {full!r} (does --config match the checkpoint?)")
        if full not in self.left:
            raise ConversionError(f"{full!r} consumed twice (converter bug)")
        self.left.discard(full)
        return self.sd[full]

    def has(self, key: str) -> bool:
        return self.prefix + key in self.sd

    def take_param(self, src: str, dst: str, out: dict, squeeze: bool = False) -> None:
        for p in ("weight", "bias"):
            if self.has(f"{src}.{p}"):
                t = self.take(f"{src}.{p}")
                out[f"{dst}.{p}"] = t.reshape(t.shape[0], -1) if squeeze and p == "weight" else t


def _resblock(src: Source, a: str, b: str, out: dict) -> None:
    src.take_param(f"{a}.in_layers.0", f"{b}.norm1", out)
    src.take_param(f"{a}.in_layers.2", f"{b}.conv1", out)
    src.take_param(f"{a}.emb_layers.1", f"{b}.time_emb_proj", out)
    src.take_param(f"{a}.out_layers.0", f"{b}.norm2", out)
    src.take_param(f"{a}.out_layers.3", f"{b}.conv2", out)
    if src.has(f"{a}.skip_connection.weight"):
        src.take_param(f"{a}.skip_connection", f"{b}.conv_shortcut", out)


def _attention(src: Source, a: str, b: str, out: dict, heads: int, new_order: bool) -> None:
    src.take_param(f"{a}.norm", f"{b}.group_norm", out)
    w, bias = src.take(f"{a}.qkv.weight"), src.take(f"{a}.qkv.bias")
    c = w.shape[1]
    w = w.reshape(w.shape[0], c)
    if new_order:  # QKVAttention: qkv.chunk(3) over channels, heads inside each
        parts_w, parts_b = w.chunk(3, 0), bias.chunk(3, 0)
    else:  # QKVAttentionLegacy: per head [q, k, v] blocks of width c / heads
        d = c // heads
        ww, bb = w.reshape(heads, 3, d, c), bias.reshape(heads, 3, d)
        parts_w = [ww[:, i].reshape(c, c) for i in range(3)]
        parts_b = [bb[:, i].reshape(c) for i in range(3)]
    for name, pw, pb in zip(("to_q", "to_k", "to_v"), parts_w, parts_b):
        out[f"{b}.{name}.weight"], out[f"{b}.{name}.bias"] = pw.contiguous(), pb.contiguous()
    src.take_param(f"{a}.proj_out", f"{b}.to_out.0", out, squeeze=True)


def convert_unet_state(src: Source, up: dict) -> dict:
    """diffusers UNet2DModel state dict from openaimodel UNetModel keys (`src` under model.diffusion_model.)."""
    mult, r = list(up.get("channel_mult", [1, 2, 4, 8])), int(up["num_res_blocks"])
    ch, levels = int(up["model_channels"]), len(list(up.get("channel_mult", [1, 2, 4, 8])))
    attn = {int(a) for a in up["attention_resolutions"]}
    head_ch, n_heads = int(up.get("num_head_channels", -1)), int(up.get("num_heads", -1))
    updown, new_order = bool(up.get("resblock_updown")), bool(up.get("use_new_attention_order"))

    def heads(width: int) -> int:
        return width // head_ch if head_ch != -1 else n_heads

    out: dict = {}
    src.take_param("time_embed.0", "time_embedding.linear_1", out)
    src.take_param("time_embed.2", "time_embedding.linear_2", out)
    src.take_param("input_blocks.0.0", "conv_in", out)
    for level in range(levels):
        width, has_attn = ch * mult[level], 2 ** level in attn
        for j in range(r):
            i = 1 + level * (r + 1) + j
            _resblock(src, f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", out)
            if has_attn:
                _attention(src, f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", out, heads(width),
                           new_order)
        if level < levels - 1:
            i = 1 + level * (r + 1) + r
            if updown:
                _resblock(src, f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", out)
            else:
                src.take_param(f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", out)
    mid = ch * mult[-1]
    _resblock(src, "middle_block.0", "mid_block.resnets.0", out)
    _attention(src, "middle_block.1", "mid_block.attentions.0", out, heads(mid), new_order)
    _resblock(src, "middle_block.2", "mid_block.resnets.1", out)
    for u in range(levels):
        level = levels - 1 - u
        width, has_attn = ch * mult[level], 2 ** level in attn
        for j in range(r + 1):
            i = u * (r + 1) + j
            _resblock(src, f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}", out)
            k = 1
            if has_attn:
                _attention(src, f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{j}", out, heads(width), new_order)
                k = 2
            if j == r and level > 0:
                if updown:
                    _resblock(src, f"output_blocks.{i}.{k}", f"up_blocks.{u}.upsamplers.0", out)
                else:
                    src.take_param(f"output_blocks.{i}.{k}.conv", f"up_blocks.{u}.upsamplers.0.conv", out)
    src.take_param("out.0", "conv_norm_out", out)
    src.take_param("out.2", "conv_out", out)
    return out


def _taming_resnet(src: Source, a: str, b: str, out: dict) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        src.take_param(f"{a}.{name}", f"{b}.{name}", out)
    if src.has(f"{a}.nin_shortcut.weight"):
        src.take_param(f"{a}.nin_shortcut", f"{b}.conv_shortcut", out)


def _taming_mid(src: Source, a: str, b: str, out: dict) -> None:
    _taming_resnet(src, f"{a}.block_1", f"{b}.resnets.0", out)
    src.take_param(f"{a}.attn_1.norm", f"{b}.attentions.0.group_norm", out)
    for s, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        src.take_param(f"{a}.attn_1.{s}", f"{b}.attentions.0.{d}", out, squeeze=True)
    _taming_resnet(src, f"{a}.block_2", f"{b}.resnets.1", out)


def convert_first_stage_state(src: Source, fs: dict) -> dict:
    """diffusers VQModel / AutoencoderKL state from taming's Encoder/Decoder keys (under first_stage_model.)."""
    dd = fs["params"]["ddconfig"]
    n, r = len(dd["ch_mult"]), int(dd["num_res_blocks"])
    out: dict = {}
    src.take_param("encoder.conv_in", "encoder.conv_in", out)
    for level in range(n):
        for j in range(r):
            _taming_resnet(src, f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", out)
        if level < n - 1:
            src.take_param(f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv",
                           out)
    _taming_mid(src, "encoder.mid", "encoder.mid_block", out)
    src.take_param("encoder.norm_out", "encoder.conv_norm_out", out)
    src.take_param("encoder.conv_out", "encoder.conv_out", out)
    src.take_param("decoder.conv_in", "decoder.conv_in", out)
    _taming_mid(src, "decoder.mid", "decoder.mid_block", out)
    for level in range(n):
        u = n - 1 - level  # taming's decoder.up[level] runs deepest-first as diffusers' up_blocks[n - 1 - level]
        for j in range(r + 1):
            _taming_resnet(src, f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", out)
        if level > 0:
            src.take_param(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv", out)
    src.take_param("decoder.norm_out", "decoder.conv_norm_out", out)
    src.take_param("decoder.conv_out", "decoder.conv_out", out)
    src.take_param("quant_conv", "quant_conv", out)
    src.take_param("post_quant_conv", "post_quant_conv", out)
    if src.has("quantize.embedding.weight"):
        out["quantize.embedding.weight"] = src.take("quantize.embedding.weight")
    return out


# ---------------------------------------------------------------------------------------------------
def _ema_unet(sd: dict, ema: str) -> tuple[dict, set, bool]:
    """(state dict with the U-Net tensors to convert, the EMA keys consumed, whether EMA was used). LitEma
    (ldm/modules/ema.py) keeps each trainable parameter of LatentDiffusion.model (DiffusionWrapper) as
    `model_ema.<name without dots>`, e.g. model.diffusion_model.out.2.weight -> model_ema.diffusion_modelout2weight;
    scripts/sample_diffusion.py samples inside `model.ema_scope()`, i.e. with the EMA weights when present."""
    ema_keys = {k for k in sd if k.startswith(EMA_PREFIX)}
    shadow = {k[len(EMA_PREFIX):]: k for k in ema_keys if k not in (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")}
    if ema == "yes" and not shadow:
        raise ConversionError("--ema yes: the checkpoint has no model_ema.* weights")
    use = ema == "yes" or (ema == "auto" and bool(shadow))
    if not use:
        return sd, ema_keys, False
    sd = dict(sd)
    for k in [k for k in sd if k.startswith(UNET_PREFIX)]:
        s = k[len("model."):].replace(".", "")
        if s not in shadow:
            raise ConversionError(f"--ema: the checkpoint has no EMA copy of {k!r} (model_ema.{s}); use --ema no")
        sd[k] = sd[shadow.pop(s)]
    if shadow:
        raise ConversionError(f"EMA weights of no U-Net parameter: {sorted(shadow.values())[:8]}")
    return sd, ema_keys, True


def convert_state_dict(sd: dict, params: dict, ema: str = "auto") -> dict:
    """{"unet": state, "first_stage": state, "unet_arch", "vae_arch", "num_heads", "scheduler", "scale_factor",
    "ema"}; raises ConversionError naming every key left unconsumed."""
    up = dict(params["unet_config"]["params"])
    arch, num_heads = unet_arch(up)
    fs = params["first_stage_config"]
    vae_arch = first_stage_arch(fs)
    sched = scheduler_config(params)
    sd, ema_keys, used_ema = _ema_unet(sd, ema)
    unet_src = Source(sd, UNET_PREFIX)
    unet_state = convert_unet_state(unet_src, up)
    fs_src = Source(sd, FIRST_STAGE_PREFIX)
    fs_state = convert_first_stage_state(fs_src, fs)
    left = unet_src.left | fs_src.left
    consumed_other = set(ema_keys)
    for name in SCHEDULE_BUFFERS:
        if name in sd:
            consumed_other.add(name)
    if "betas" in sd:
        want = ldm_betas(sched)
        got = sd["betas"].double()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-8):
            raise ConversionError(f"the checkpoint's betas are not LDM's linear schedule from linear_start="
                                  f"{sched['beta_start']}, linear_end={sched['beta_end']}, timesteps="
                                  f"{sched['num_train_timesteps']}: wrong --config?")
    scale = float(params.get("scale_factor", 1.0))
    if "scale_factor" in sd:
        consumed_other.add("scale_factor")
        scale = float(sd["scale_factor"])
    elif params.get("scale_by_std"):
        raise ConversionError("the config has scale_by_std=true but the checkpoint stores no scale_factor")
    unknown = {k for k in sd if not (k.startswith(UNET_PREFIX) or k.startswith(FIRST_STAGE_PREFIX))} - consumed_other
    left |= unknown
    if left:
        raise ConversionError(f"{len(left)} checkpoint key(s) not consumed by the conversion: "
                              f"{', '.join(sorted(left)[:20])}{' ...' if len(left) > 20 else ''}")
    return {"unet": unet_state, "first_stage": fs_state, "unet_arch": arch, "vae_arch": vae_arch,
            "num_heads": num_heads, "scheduler": sched, "scale_factor": scale, "ema": used_ema}


def build_unet(arch: dict, num_heads: int | None = None):
    from diffusers import UNet2DModel

    from ditq.models.unet import set_attention_heads

    model = UNet2DModel(**arch)
    if num_heads:
        set_attention_heads(model, num_heads)
    return model


def build_first_stage(vae_arch: dict):
    from diffusers import AutoencoderKL, VQModel

    arch = dict(vae_arch)
    cls = VQModel if arch.pop("_class") == "VQModel" else AutoencoderKL
    return cls(**arch)


def _load_strict(model, state: dict, what: str) -> None:
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in set(want) & set(state)
              if tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or extra or shapes:
        raise ConversionError(f"{what}: {len(missing)} diffusers parameter(s) not filled {missing[:10]}, "
                              f"{len(extra)} converted key(s) without a parameter {extra[:10]}, shape mismatches "
                              f"{sorted(shapes)[:10]}")
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: Path, allow_pickle: bool = False) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except FileNotFoundError:
        raise ConversionError(f"--ckpt {path}: no such file") from None
    except Exception as err:  # noqa: BLE001 - pickled training state (Lightning callbacks) needs a full unpickle
        if allow_pickle:
            raise
        raise ConversionError(f"{path}: torch.load(weights_only=True) failed ({type(err).__name__}: "
                              f"{str(err)[:200]}); if you trust the file (the CompVis release), pass "
                              "--allow-pickle") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(UNET_PREFIX) for k in sd):
        raise ConversionError(f"{path}: no state_dict with {UNET_PREFIX}* keys (not a latent-diffusion checkpoint)")
    return sd


def convert(ckpt: str | Path, config: str, out: str | Path, ema: str = "auto", allow_pickle: bool = False,
            overwrite: bool = False) -> Path:
    """Convert and write `out` atomically (temp dir + rename). Returns `out`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"--out {out} exists; pass --overwrite to replace it")
    params = load_ldm_config(config)
    conv = convert_state_dict(load_checkpoint(Path(ckpt), allow_pickle), params, ema)
    return write_converted(conv, out, {"ckpt": str(ckpt), "config": config}, overwrite)


def write_converted(conv: dict, out: Path, source: dict, overwrite: bool = False) -> Path:
    unet = build_unet(conv["unet_arch"], conv["num_heads"])
    _load_strict(unet, conv["unet"], "unet")
    vae = build_first_stage(conv["vae_arch"])
    _load_strict(vae, conv["first_stage"], "first stage")
    vae_dir = "vqvae" if conv["vae_arch"]["_class"] == "VQModel" else "vae"
    if hasattr(vae, "register_to_config"):
        vae.register_to_config(scaling_factor=conv["scale_factor"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        unet.save_pretrained(tmp / "unet")
        if conv["num_heads"]:
            cfg_path = tmp / "unet" / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["ditq_num_attention_heads"] = conv["num_heads"]
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        vae.save_pretrained(tmp / vae_dir)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(conv["scheduler"], indent=2))
        meta = {**source, "ema": conv["ema"], "scale_factor": conv["scale_factor"], "vae": vae_dir,
                "num_attention_heads": conv["num_heads"]}
        (tmp / "ldm_conversion.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ditq.models.convert_ldm", description=__doc__.split("\n")[0])
    presets = ", ".join(sorted(PRESETS) + sorted(PRESET_ALIASES))
    ap.add_argument("--ckpt", required=True,
                    help="latent-diffusion model.ckpt (state_dict with model.diffusion_model.*)")
    ap.add_argument("--config", required=True, help=f"the checkpoint's LDM config.yaml or a preset: {presets}")
    ap.add_argument("--out", required=True,
                    help="output directory (diffusers layout: unet/, vqvae/ or vae/, scheduler/)")
    ap.add_argument("--ema", choices=("auto", "yes", "no"), default="auto",
                    help="use the model_ema.* weights (auto: when present, as LDM's sampling script does)")
    ap.add_argument("--allow-pickle", action="store_true", help="full unpickle (only for a trusted checkpoint)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    try:
        out = convert(a.ckpt, a.config, a.out, a.ema, a.allow_pickle, a.overwrite)
    except ConversionError as err:
        print(f"convert_ldm: {err}", file=sys.stderr)
        return 2
    meta = json.loads((out / "ldm_conversion.json").read_text())
    print(f"wrote {out} (ema={meta['ema']}, scale_factor={meta['scale_factor']:.8g}: set model.vae_scale to it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["convert", "convert_state_dict", "convert_unet_state", "convert_first_stage_state", "unet_arch",
           "first_stage_arch", "scheduler_config", "load_ldm_config", "write_converted", "ConversionError", "PRESETS"]
