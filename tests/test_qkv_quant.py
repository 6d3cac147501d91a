"""Q, K, V (and softmax) quantization inside diffusers' attentions (ditq.quant.qkv, method.attn): per-token
online absmax grids, gated by the attention's quantized layers (full precision = the stock model bit for bit),
on DiT's self-attention and PixArt's self- and cross-attention, and the config checks."""
from __future__ import annotations

import pytest
import torch

from ditq.config import ConfigError, validate_config
from tests.conftest import SHRINK
from tests.helpers import denoise_inputs, random_dit

STEPS_OFF = "method.steps=[]"  # the quantizers only: AdaRound is tested with its step
GROUP = "method.group_size=16"  # the random models are 32 wide (FP4DiT's 128 is wider than their layers)


def _run(compose, *overrides, model=()):
    return validate_config(compose([*SHRINK, *model, "method=fp4dit", STEPS_OFF, GROUP, *overrides]))


def _dit_out(adapter, x, t, y):
    with torch.no_grad():
        return adapter.denoise(x, t, y)


# ----------------------------------------------------------------------------- the per-token quantizer
def test_tensor_quantizer_keeps_each_tokens_absmax_and_follows_the_format():
    from ditq.quant.qkv import TensorQuantizer

    fmt = ["fp8_e3m4"]
    q = TensorQuantizer(lambda: fmt[0])
    x = torch.randn(2, 16, 64) * torch.linspace(0.1, 10, 16)[None, :, None]  # tokens of very different ranges
    out = q(x)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)
    # maxval = the token's absmax: the largest element of every row is on the grid (exact)
    assert torch.allclose(out.abs().amax(-1), x.abs().amax(-1), rtol=0, atol=1e-6)
    err8 = (out - x).abs().max()
    fmt[0] = "fp4_e2m1"  # a step changed the projection's act format: the next call uses it
    err4 = (q(x) - x).abs().max()
    assert err4 > 2 * err8
    fmt[0] = None
    assert torch.equal(q(x), x)


def test_per_head_ranges_are_per_token_and_head():
    from ditq.quant.qkv import TensorQuantizer

    q = TensorQuantizer(lambda: "fp4_e2m1", per_head_dim=8)
    assert q.quantizer().cfg.granularity == "per_token_group" and q.quantizer().cfg.group_size == 8
    x = torch.randn(3, 5, 32)
    x[..., 8:16] *= 100  # one loud head
    out = q(x).view(3, 5, 4, 8)
    assert torch.allclose(out.abs().amax(-1), x.view(3, 5, 4, 8).abs().amax(-1), atol=1e-5)


# ----------------------------------------------------------------------------- DiT (self-attention)
def test_dit_qkv_quantizers_change_the_output_slightly_and_vanish_in_full_precision(compose):
    from ditq.methods.wrap import full_precision, wrap_layers
    from ditq.quant.qkv import qkv_hooks, remove_qkv

    x, t, y = denoise_inputs(4)
    adapter = random_dit()
    stock = _dit_out(adapter, x, t, y)
    run = _run(compose, "bits=w4a8_fp4dit", "bits.weight=null")  # activations only: Q/K/V's effect alone
    qlayers, _ = wrap_layers(adapter, run)
    hooks = qkv_hooks(adapter.denoiser)
    assert len(hooks) == 3 * len(adapter.blocks())
    with full_precision(qlayers):
        assert torch.equal(_dit_out(adapter, x, t, y), stock)  # inactive: bit-identical to the stock processor
    assert sum(h.quant.calls for h in hooks.values()) == 0
    with_qkv = _dit_out(adapter, x, t, y)
    assert all(h.quant.calls > 0 for h in hooks.values())
    remove_qkv(adapter.denoiser)
    inputs_only = _dit_out(adapter, x, t, y)
    diff = (with_qkv - inputs_only).abs().max() / inputs_only.abs().max()
    assert 0 < diff < 0.05  # an 8-bit format: a small change


def test_method_attn_off_installs_nothing(compose):
    from ditq.methods.wrap import wrap_layers
    from ditq.quant.attention import installed
    from ditq.quant.qkv import qkv_hooks

    adapter = random_dit()
    wrap_layers(adapter, _run(compose, "bits=w4a8_fp4dit", "method.attn.qkv=false"))
    assert qkv_hooks(adapter.denoiser) == {} and installed(adapter.denoiser) == {}


# ----------------------------------------------------------------------------- PixArt (self + cross attention)
def _random_pixart():
    from omegaconf import OmegaConf

    from ditq.config.schema import ModelConfig
    from ditq.models import load_adapter

    arch = dict(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=2,
                cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24,
                norm_type="ada_norm_single", use_additional_conditions=False)
    text = {"max_tokens": 6, "arch": {"d_model": 24, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}}
    cfg = OmegaConf.structured(ModelConfig(name="tiny_pixart_digits", family="pixart", weights="random", arch=arch,
                                           text=text, resolution=8))
    a = load_adapter(cfg)
    g = torch.Generator().manual_seed(3)
    for p in a.denoiser.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return a


def _pixart_out(adapter):
    g = torch.Generator().manual_seed(0)
    x, cap = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 6, 24, generator=g)
    with torch.no_grad():
        return adapter.denoiser(x, encoder_hidden_states=cap, timestep=torch.tensor([900, 30]),
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def test_pixart_self_and_cross_attention_get_qkv_and_softmax_quantizers(compose):
    from ditq.methods.wrap import full_precision, wrap_layers
    from ditq.quant.attention import installed
    from ditq.quant.qkv import qkv_hooks

    pix = ["model=tiny_pixart_digits", "dataset=digits_captions", "eval=digits_t2i", "sampler=pixart_dpm20"]
    adapter = _random_pixart()
    stock = _pixart_out(adapter)
    run = _run(compose, "bits=w4a8_fp4dit", model=pix)
    qlayers, _ = wrap_layers(adapter, run)
    hooks = qkv_hooks(adapter.denoiser)
    assert {n.rsplit(".", 2)[-2] for n in hooks} == {"attn1", "attn2"} and len(hooks) == 2 * 3 * 2
    with full_precision(qlayers):
        assert torch.equal(_pixart_out(adapter), stock)
    qkv_only = _pixart_out(adapter)
    assert not torch.equal(qkv_only, stock)

    adapter2 = _random_pixart()
    run2 = _run(compose, "bits=w4a8_fp4dit", "method.attn.probs=fp8_e4m3", model=pix)
    qlayers2, _ = wrap_layers(adapter2, run2)
    procs = installed(adapter2.denoiser)
    assert len(procs) == 4  # attn1 and attn2 of both blocks
    with full_precision(qlayers2):
        assert torch.equal(_pixart_out(adapter2), stock)
    assert all(p.quantized_calls == 0 for p in procs.values())
    with_probs = _pixart_out(adapter2)
    assert all(p.quantized_calls > 0 for p in procs.values())
    assert not torch.equal(with_probs, qkv_only)
    assert (with_probs - qkv_only).abs().max() < 0.1 * stock.abs().max()


# ----------------------------------------------------------------------------- config checks
def test_qkv_follow_full_precision_activations_and_fp_runs_validate(compose):
    from ditq.methods.wrap import wrap_layers
    from ditq.quant.qkv import qkv_hooks

    adapter = random_dit()
    wrap_layers(adapter, _run(compose, "bits=w4a8_fp4dit", "bits.act=null"))  # weight-only: Q/K/V stay FP
    assert qkv_hooks(adapter.denoiser) == {}
    assert _run(compose, "bits=fp", "method.layers=[fc1]").method.attn.qkv  # the FP row of a sweep


@pytest.mark.parametrize("overrides, needle", [
    (["bits=w4a8_fp4dit", "+method.attn.rope=true"], "unknown key"),
    (["bits=w4a8_fp4dit", "method.attn.probs=fp9_e9m9"], "method.attn.probs"),
    (["bits=w4a8_fp4dit", "method.layers=[fc1,fc2]"], "no q/k/v projection"),
])
def test_bad_attn_settings_fail_at_config_time(compose, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        _run(compose, *overrides)


def _quantized_attention(processor):
    """A diffusers Attention with `processor`, its projections QuantLinear with FP8 per-token act quantizers."""
    from diffusers.models.attention_processor import Attention

    from ditq.config.schema import quantizer_config
    from ditq.quant.modules import QuantLinear
    from ditq.quant.quantizer import build_quantizer

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, processor=processor)
    cfg = quantizer_config({"granularity": "per_token", "dynamic": True}, "fp8_e3m4", "act", "test")
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        attn.set_submodule(name, QuantLinear(attn.get_submodule(name), None, build_quantizer(cfg, "act"), name=name))
    return attn


def test_qkv_hooks_work_with_any_processor_and_the_softmax_quantizer_refuses_other_processors():
    from diffusers.models.attention_processor import AttnProcessor

    from ditq.quant.qkv import QKVQuantError, _check_probs_processor, install_qkv, remove_qkv

    attn = _quantized_attention(AttnProcessor())  # not AttnProcessor2_0 (as Hunyuan-DiT's processor is not)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = attn(x)
        hooks = install_qkv({"a": attn})
        after = attn(x)
    assert set(hooks) == {"a.to_q", "a.to_k", "a.to_v"} and all(h.quant.calls == 1 for h in hooks.values())
    assert not torch.equal(before, after)
    assert remove_qkv({"a": attn}) == 3
    with torch.no_grad():
        assert torch.equal(attn(x), before)
    with pytest.raises(QKVQuantError, match="method.attn.probs=null"):
        _check_probs_processor({"a": attn})
