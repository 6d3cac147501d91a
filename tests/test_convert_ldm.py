"""`ditq.models.convert_ldm`: latent-diffusion checkpoints -> diffusers' layout, checked against a small
reference implementation of LDM's networks (openaimodel's UNetModel, taming's Decoder) written here from
the original code's structure: same module names, so its state dict has the release checkpoint's keys."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from ditq.models.convert_ldm import (ConversionError, convert, convert_state_dict, ldm_betas, scheduler_config,
                                     write_converted)


# --- reference: openaimodel.UNetModel --------------------------------------------------------------
def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, out_ch, scale_shift, up=False, down=False):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.up, self.down, self.scale_shift = up, down, scale_shift
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, kernel_size=2, stride=2)

    def forward(self, x, emb):
        if self.up or self.down:
            h = self.in_layers[:-1](x)
            h, x = self._resample(h), self._resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, ch, heads, new_order):
        super().__init__()
        self.heads, self.new_order = heads, new_order
        self.norm = nn.GroupNorm(32, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def attention(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.heads)
        if self.new_order:  # QKVAttention
            q, k, v = (p.reshape(bs * self.heads, ch, length) for p in qkv.chunk(3, dim=1))
        else:  # QKVAttentionLegacy
            q, k, v = qkv.reshape(bs * self.heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)

    def forward(self, x):
        b, c, *sp = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *sp)


class RefUNet(nn.Module):
    def __init__(self, p):
        super().__init__()
        mc, mult, r = p["model_channels"], p["channel_mult"], p["num_res_blocks"]
        ss, updown, new = p.get("use_scale_shift_norm", False), p.get("resblock_updown", False), p.get(
            "use_new_attention_order", False)
        attn = set(p["attention_resolutions"])
        heads = (lambda c: c // p["num_head_channels"]) if p.get("num_head_channels", -1) != -1 else (
            lambda c: p["num_heads"])
        self.mc, ted = mc, 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(p["in_channels"], mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, m in enumerate(mult):
            for _ in range(r):
                layers = [ResBlock(ch, ted, m * mc, ss)]
                ch = m * mc
                if ds in attn:
                    layers.append(AttentionBlock(ch, heads(ch), new))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(
                    ResBlock(ch, ted, ch, ss, down=True) if updown else Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, ted, ch, ss), AttentionBlock(ch, heads(ch), new),
                                                    ResBlock(ch, ted, ch, ss))
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(r + 1):
                layers = [ResBlock(ch + chans.pop(), ted, mc * m, ss)]
                ch = mc * m
                if ds in attn:
                    layers.append(AttentionBlock(ch, heads(ch), new))
                if level and i == r:
                    layers.append(ResBlock(ch, ted, ch, ss, up=True) if updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, p["out_channels"], 3, padding=1))

    def forward(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.mc))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# --- reference: taming's Decoder (first stage) ---------------------------------------------------------
class TResnet(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(32, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class TAttn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        w = torch.softmax(torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c ** -0.5, dim=2)
        out = torch.bmm(v.reshape(b, c, -1), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class TMid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = TResnet(c, c), TAttn(c), TResnet(c, c)


class TEncoder(nn.Module):
    def __init__(self, dd):
        super().__init__()
        ch, mult, r = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
        self.conv_in = nn.Conv2d(dd["in_channels"], ch, 3, padding=1)
        self.down, cin = nn.ModuleList(), ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(r):
                level.block.append(TResnet(cin, ch * m))
                cin = ch * m
            level.attn = nn.ModuleList()
            if i != len(mult) - 1:
                level.downsample = nn.Module()
                level.downsample.conv = nn.Conv2d(cin, cin, 3, stride=2)
            self.down.append(level)
        self.mid = TMid(cin)
        self.norm_out = nn.GroupNorm(32, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 2 * dd["z_channels"] if dd["double_z"] else dd["z_channels"], 3, padding=1)


class TDecoder(nn.Module):
    def __init__(self, dd):
        super().__init__()
        ch, mult, r = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(dd["z_channels"], cin, 3, padding=1)
        self.mid = TMid(cin)
        self.up = nn.ModuleList()
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(r + 1):
                level.block.append(TResnet(cin, ch * mult[i]))
                cin = ch * mult[i]
            level.attn = nn.ModuleList()
            if i != 0:
                level.upsample = nn.Module()
                level.upsample.conv = nn.Conv2d(cin, cin, 3, padding=1)
            self.up.insert(0, level)
        self.norm_out = nn.GroupNorm(32, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, dd["out_ch"], 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class TFirstStage(nn.Module):
    def __init__(self, fs):
        super().__init__()
        p, dd = fs["params"], fs["params"]["ddconfig"]
        self.encoder, self.decoder = TEncoder(dd), TDecoder(dd)
        z, e = dd["z_channels"], p["embed_dim"]
        kl = fs["target"].endswith("AutoencoderKL")
        self.quant_conv = nn.Conv2d(2 * z if kl else z, 2 * e if kl else e, 1)
        self.post_quant_conv = nn.Conv2d(e, z, 1)
        if not kl:
            self.quantize = nn.Module()
            self.quantize.embedding = nn.Embedding(p["n_embed"], e)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


# --- tiny configs ------------------------------------------------------------------------------------------
def _dd(**kw):
    return {"double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0, **kw}


def ldm4_params(**unet):
    """LDM-VQ-4 (CelebA-HQ / Bedrooms) in miniature: num_head_channels, conv resampling, legacy qkv order."""
    return {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
            "unet_config": {"params": {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                                       "attention_resolutions": [2], "num_res_blocks": 2, "channel_mult": [1, 2],
                                       "num_head_channels": 16, **unet}},
            "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                                   "params": {"embed_dim": 3, "n_embed": 16, "ddconfig": _dd()}}}


def ldm8_params():
    """LDM-KL-8 (Churches) in miniature: num_heads, scale-shift norm, ResBlock resampling, a level without
    attention, KL first stage with a stored scale_factor."""
    return {"linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "scale_by_std": True,
            "unet_config": {"params": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                                       "attention_resolutions": [1, 2], "num_res_blocks": 1, "channel_mult": [1, 2, 2],
                                       "num_heads": 2, "use_scale_shift_norm": True, "resblock_updown": True}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                   "params": {"embed_dim": 4, "ddconfig": _dd(double_z=True, z_channels=4)}}}


def _randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        scale = 0.02 if name.endswith("embedding.weight") else 0.15
        p.data.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if ".norm" in f".{name}" and name.endswith(
            "weight") else 0.0))


def ldm_checkpoint(params: dict, seed: int = 0, ema: bool = False):
    """(state_dict in the release layout, reference U-Net, reference first stage)."""
    unet, fs = RefUNet(params["unet_config"]["params"]), TFirstStage(params["first_stage_config"])
    _randomize(unet, seed)
    _randomize(fs, seed + 1)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in fs.state_dict().items()})
    betas = ldm_betas(scheduler_config(params)).float()
    abar = torch.cumprod(1 - betas, 0)
    sd.update({"betas": betas, "alphas_cumprod": abar, "sqrt_alphas_cumprod": abar.sqrt(), "logvar": torch.zeros(1000)})
    if params.get("scale_by_std"):
        sd["scale_factor"] = torch.tensor(0.3)
    if ema:  # LitEma: the shadow copies, under the parameter names without dots
        sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10, dtype=torch.int)
        for k, v in unet.state_dict().items():
            sd["model_ema." + f"diffusion_model.{k}".replace(".", "")] = v
            sd[f"model.diffusion_model.{k}"] = torch.zeros_like(v)  # the raw weights differ from the EMA ones
    return sd, unet, fs


def _converted_unet(conv):
    from ditq.models.convert_ldm import _load_strict, build_unet

    unet = build_unet(conv["unet_arch"], conv["num_heads"])
    _load_strict(unet, conv["unet"], "unet")
    return unet.eval()


@pytest.mark.parametrize("params", [ldm4_params(), ldm4_params(use_new_attention_order=True), ldm8_params()],
                         ids=["ldm4_legacy_qkv", "ldm4_new_qkv_order", "ldm8_heads_scaleshift_updown"])
def test_converted_unet_reproduces_ldm_forward(params):
    sd, ref, _ = ldm_checkpoint(params)
    conv = convert_state_dict(sd, params)
    unet = _converted_unet(conv)
    p = params["unet_config"]["params"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, p["in_channels"], 8, 8, generator=g)
    t = torch.tensor([999, 500, 1])
    with torch.no_grad():
        want, got = ref.eval()(x, t), unet(x, timestep=t).sample
    assert want.abs().max() > 0.1  # the random weights make a non-trivial function
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_converted_first_stage_decoder_matches_taming():
    from ditq.models.convert_ldm import _load_strict, build_first_stage

    for params in (ldm4_params(), ldm8_params()):
        sd, _, ref = ldm_checkpoint(params)
        conv = convert_state_dict(sd, params)
        vae = build_first_stage(conv["vae_arch"])
        _load_strict(vae, conv["first_stage"], "first stage")
        z = torch.randn(2, params["first_stage_config"]["params"]["embed_dim"], 4, 4, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            want = ref.eval().decode(z)
            got = (vae.decode(z, force_not_quantize=True) if conv["vae_arch"]["_class"] == "VQModel"
                   else vae.decode(z)).sample
        assert got.shape == want.shape == (2, 3, 8, 8)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_unconsumed_key_fails_naming_it():
    params = ldm4_params()
    sd, _, _ = ldm_checkpoint(params)
    sd["model.diffusion_model.extra_block.weight"] = torch.zeros(2)
    sd["cond_stage_model.proj.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError) as err:
        convert_state_dict(sd, params)
    assert "model.diffusion_model.extra_block.weight" in str(err.value)
    assert "cond_stage_model.proj.weight" in str(err.value) and "not consumed" in str(err.value)


def test_missing_key_and_wrong_config_fail():
    params = ldm4_params()
    sd, _, _ = ldm_checkpoint(params)
    del sd["model.diffusion_model.middle_block.1.qkv.bias"]
    with pytest.raises(ConversionError, match=r"middle_block\.1\.qkv\.bias"):
        convert_state_dict(sd, params)
    sd, _, _ = ldm_checkpoint(params)
    with pytest.raises(ConversionError, match="betas"):  # Churches' schedule against a Bedrooms checkpoint
        convert_state_dict(sd, {**params, "linear_end": 0.0155})


def test_ema_weights_are_used_when_present():
    params = ldm4_params()
    sd, ref, _ = ldm_checkpoint(params, ema=True)
    conv = convert_state_dict(sd, params)
    assert conv["ema"] is True
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        assert torch.allclose(_converted_unet(conv)(x, timestep=t).sample, ref.eval()(x, t), atol=1e-5)
    raw = convert_state_dict(sd, params, ema="no")  # the EMA shadow keys are consumed (dropped) knowingly
    assert raw["ema"] is False and torch.count_nonzero(raw["unet"]["conv_in.weight"]) == 0


def test_convert_writes_loadable_directory_atomically(tmp_path):
    from ditq.config.schema import ModelConfig
    from ditq.models import load_adapter

    params = ldm8_params()
    sd, ref, fs = ldm_checkpoint(params)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, ckpt)
    cfg_yaml = tmp_path / "config.yaml"
    cfg_yaml.write_text(json.dumps({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}))
    out = tmp_path / "church"
    convert(ckpt, str(cfg_yaml), out)
    assert sorted(p.name for p in out.iterdir()) == ["ldm_conversion.json", "scheduler", "unet", "vae"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".church")]  # no temp dir left behind
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["beta_end"] == 0.0155 and sched["steps_offset"] == 1
    from diffusers import DDIMScheduler

    assert torch.allclose(DDIMScheduler.from_config(sched).betas.double(), ldm_betas(sched), atol=1e-7)
    meta = json.loads((out / "ldm_conversion.json").read_text())
    assert meta["scale_factor"] == pytest.approx(0.3) and meta["num_attention_heads"] == 2
    with pytest.raises(ConversionError, match="exists"):
        convert(ckpt, str(cfg_yaml), out)

    base = dict(name="church_tiny", family="unet", weights="local", path=str(out), resolution=16, num_classes=1,
                vae="vae", cfg_channels=None)
    with pytest.raises(ValueError, match="vae_scale=0.3"):  # the checkpoint's learned latent scale is enforced
        load_adapter(OmegaConf.structured(ModelConfig(**base, vae_scale=1.0)))
    adapter = load_adapter(OmegaConf.structured(ModelConfig(**base, vae_scale=0.3)))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([900, 3])
    with torch.no_grad():
        assert torch.allclose(adapter.denoise(x, t, torch.zeros(2, dtype=torch.long)), ref.eval()(x, t), atol=1e-5)
        img = adapter.decode(torch.randn(1, 4, 8, 8))
    assert img.dtype == torch.uint8 and img.shape == (1, 3, 16, 16)
    assert {i.role for i in adapter.layers()} >= {"conv", "qkv", "proj", "adaln", "embed", "final"}


def test_write_failure_leaves_existing_output(tmp_path, monkeypatch):
    params = ldm4_params()
    sd, _, _ = ldm_checkpoint(params)
    conv = convert_state_dict(sd, params)
    out = tmp_path / "m"
    write_converted(conv, out, {"ckpt": "x"})
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def boom(*a, **k):
        raise OSError("disk full")

    from diffusers import VQModel

    monkeypatch.setattr(VQModel, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        write_converted(conv, out, {"ckpt": "x"}, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_presets_and_refusals():
    from ditq.models.convert_ldm import PRESETS, load_ldm_config, unet_arch

    assert load_ldm_config("lsun_bedrooms") == PRESETS["lsun_beds256"]
    with pytest.raises(ConversionError, match="neither a preset"):
        load_ldm_config("no_such_model")
    with pytest.raises(ConversionError, match="context_dim"):
        unet_arch({**ldm4_params()["unet_config"]["params"], "context_dim": 512})
    with pytest.raises(ConversionError, match="eps"):
        scheduler_config({**ldm4_params(), "parameterization": "x0"})


def test_cli_reports_errors(tmp_path, capsys):
    from ditq.models.convert_ldm import main

    assert main(["--ckpt", str(tmp_path / "none.ckpt"), "--config", "celebahq", "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
