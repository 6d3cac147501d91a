"""Hunyuan-DiT adapter (ditq.models.hunyuan) on a tiny random architecture (4 blocks: the smallest
depth with a long skip connection, block 3 <- block 0)."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ditq.conditioning import PromptConditions, TextBank
from ditq.conditioning.encoder import TextEncoderMismatchError
from ditq.config.schema import ModelConfig
from ditq.models import MissingCheckpointError, load_adapter
from ditq.models.hunyuan import (
    HUNYUAN_SCHEDULE,
    BlockwiseUnsupportedError,
    build_random_text_encoders,
    get_resize_crop_region_for_grid,
)

ARCH = dict(num_attention_heads=2, attention_head_dim=8, hidden_size=16, in_channels=4, patch_size=2, sample_size=4,
            num_layers=4, mlp_ratio=2.0, cross_attention_dim=24, cross_attention_dim_t5=32, pooled_projection_dim=16,
            text_len=6, text_len_t5=7, use_style_cond_and_image_meta_size=True)
PROMPTS = ["a cat", "a dog", "two red birds"]
HUB = "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers"


def tiny_cfg(**kw):
    base = dict(name="tiny_hunyuan", family="hunyuan", weights="random", arch=dict(ARCH), resolution=4, num_classes=1)
    base.update(kw)
    return OmegaConf.structured(ModelConfig(**base))


def bank_for(adapter, prompts=PROMPTS):
    enc = adapter.text_encoder()
    out = enc.encode([""] + list(prompts))
    enc.release()
    index = torch.arange(-1, len(prompts))
    return TextBank(index, out["embeds"], out["mask"], {"embeds_t5": out["embeds_t5"], "mask_t5": out["mask_t5"]},
                    enc.fingerprint())


@pytest.fixture(scope="module")
def adapter():
    a = load_adapter(tiny_cfg())
    a.set_text_bank(bank_for(a))
    a.set_conditions(PromptConditions("tiny", PROMPTS))
    return a


def save_layout(adapter, root, clip_width=None):
    """The tiny random model in diffusers' pipeline layout (as `huggingface-cli download` writes it)."""
    tc = adapter.transformer.config
    tok, bert, tok2, t5 = build_random_text_encoders(clip_width or tc.cross_attention_dim, tc.cross_attention_dim_t5,
                                                     tc.text_len, tc.text_len_t5)
    adapter.transformer.save_pretrained(root / "transformer")
    bert.save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    t5.save_pretrained(root / "text_encoder_2")
    tok2.save_pretrained(root / "tokenizer_2")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler",
                                                                          **HUNYUAN_SCHEDULE}))


# ----------------------------------------------------------------------------- roles
def test_roles_cover_every_linear(adapter):
    infos = adapter.layers()
    names = {i.name for i in infos}
    quantizable = {n for n, m in adapter.denoiser.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert names == quantizable and len(infos) == len(names)
    roles: dict[str, list[str]] = {}
    for i in infos:
        roles.setdefault(i.role, []).append(i.name)
    n = ARCH["num_layers"]
    assert len(roles["qkv"]) == 3 * n and len(roles["cross_attn"]) == 4 * n
    assert len(roles["fc1"]) == len(roles["fc2"]) == len(roles["adaln"]) == n
    assert sorted(roles["proj"]) == sorted([f"blocks.{k}.attn1.to_out.0" for k in range(n)] + ["blocks.3.skip_linear"])
    assert sorted(roles["caption"]) == sorted(["text_embedder.linear_1", "text_embedder.linear_2"]
                                              + [f"time_extra_emb.pooler.{p}_proj" for p in "qkvc"])
    assert "pos_embed.proj" in roles["embed"] and len(roles["embed"]) == 5
    assert sorted(roles["final"]) == ["norm_out.linear", "proj_out"]
    assert {i.block for i in infos if i.name.startswith("blocks.")} == set(range(n))
    assert all(i.block is None for i in infos if not i.name.startswith("blocks."))


def test_unmatched_linear_is_an_error():
    a = load_adapter(tiny_cfg())
    a.transformer.blocks[0].extra = nn.Linear(16, 16)
    with pytest.raises(RuntimeError, match=r"blocks\.0\.extra .*has no role"):
        a.layers()


# ----------------------------------------------------------------------------- denoise
def test_denoise_with_own_encoder_bank(adapter):
    torch.manual_seed(0)
    x = torch.randn(4, 4, 4, 4)
    y = torch.tensor([-1, 0, 1, 2])
    out = adapter.denoise(x, torch.full((4,), 500), y)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    same = adapter.denoise(x[:1].expand(4, -1, -1, -1), torch.full((4,), 500), y)
    assert all(not torch.allclose(same[0], same[k]) for k in (1, 2, 3))  # the prompt matters
    later = adapter.denoise(x, torch.full((4,), 10), y)
    assert not torch.allclose(out, later)  # so does the timestep
    with pytest.raises(KeyError, match="prompt indices"):
        adapter.denoise(x[:1], torch.tensor([5]), torch.tensor([7]))


def test_denoise_matches_the_pipeline_inputs(adapter):
    """The transformer called with the inputs HunyuanDiTPipeline builds gives denoise's output."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid as pipeline_crop

    for grid in [(4, 4), (6, 4), (3, 5)]:
        assert get_resize_crop_region_for_grid(grid, 32) == pipeline_crop(grid, 32)
    torch.manual_seed(1)
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([999, 3]), torch.tensor([0, -1])
    e, m, extra = adapter.bank.lookup(y)
    rope = get_2d_rotary_pos_embed(8, pipeline_crop((2, 2), 512 // 8 // 2), (2, 2), output_type="pt")
    ref = adapter.transformer(x, t.float(), encoder_hidden_states=e, text_embedding_mask=m,
                              encoder_hidden_states_t5=extra["embeds_t5"], text_embedding_mask_t5=extra["mask_t5"],
                              image_meta_size=torch.tensor([[1024.0, 1024, 4, 4, 0, 0]]).repeat(2, 1),
                              style=torch.zeros(2, dtype=torch.long), image_rotary_emb=rope).sample[:, :4]
    assert torch.equal(adapter.denoise(x, t, y), ref)
    assert adapter.scheduler_config()["prediction_type"] == "v_prediction"


def test_pooler_uses_its_modules_and_equals_diffusers(adapter):
    from diffusers.models.embeddings import HunyuanDiTAttentionPool

    pooler = adapter.transformer.time_extra_emb.pooler
    h = torch.randn(3, ARCH["text_len_t5"], ARCH["cross_attention_dim_t5"])
    assert torch.allclose(pooler(h), HunyuanDiTAttentionPool.forward(pooler, h), atol=1e-6)
    seen = []
    handle = pooler.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    try:
        pooler(h)
    finally:
        handle.remove()
    assert seen == [torch.Size([1, 3, ARCH["cross_attention_dim_t5"]])]  # a wrapped/hooked layer is not bypassed


# ----------------------------------------------------------------------------- calibration
def test_blockwise_calibration_is_refused_before_any_work(adapter):
    from ditq.calibration.blocks import BlockRunner
    from ditq.calibration.engine import BlockwiseEngine

    with pytest.raises(BlockwiseUnsupportedError, match="long skip connections.*layer-wise method"):
        BlockRunner(adapter)
    calls = []
    adapter_denoise = adapter.denoise
    adapter.denoise = lambda *a: calls.append(1) or adapter_denoise(*a)
    try:
        with pytest.raises(BlockwiseUnsupportedError, match="rtn"):
            BlockwiseEngine(adapter, {}, {"x": torch.zeros(1, 4, 4, 4), "t": torch.zeros(1), "y": torch.zeros(1)},
                            include_uncond=False)
    finally:
        del adapter.denoise
    assert not calls


def test_layer_wise_calibration_reaches_every_layer(adapter):
    from ditq.calibration.layer_inputs import collect_layer_inputs
    from ditq.quant.modules import QuantLinear
    from ditq.quant.quantizer import build_quantizer
    from ditq.quant.spec import QuantizerConfig

    names = [i.name for i in adapter.layers()]
    calib = {"x": torch.randn(3, 4, 4, 4), "t": torch.tensor([900, 500, 20]), "y": torch.tensor([0, 1, 2])}
    rec = collect_layer_inputs(adapter, calib, names, max_tokens=64, include_uncond=True, batch_size=2,
                               progress=False)
    assert set(rec) == set(names)
    assert rec["blocks.3.skip_linear"]["rows"].shape[1] == 32
    assert rec["time_extra_emb.pooler.k_proj"]["rows"].shape[1] == ARCH["cross_attention_dim_t5"]
    # a quantized pooler projection changes the output (the stock pooler would read the FP weight)
    x, t, y = calib["x"], calib["t"], calib["y"]
    before = adapter.denoise(x, t, y)
    pooler = adapter.transformer.time_extra_emb.pooler
    original = pooler.v_proj
    pooler.v_proj = QuantLinear(original, build_quantizer(QuantizerConfig(format="int2"), "weight"), None)
    try:
        assert not torch.allclose(adapter.denoise(x, t, y), before)
    finally:
        pooler.v_proj = original


# ----------------------------------------------------------------------------- text encoders
def test_truncation_is_counted_per_encoder(caplog):
    a = load_adapter(tiny_cfg())
    enc = a.text_encoder()
    # CLIP: [CLS] chars [SEP] (limit 6); mT5: chars </s> (limit 7)
    with caplog.at_level(logging.WARNING, logger="ditq.conditioning.encoder"):
        out = enc.encode(["abcd", "abcde", "abcdefg"])
    msgs = [r.getMessage() for r in caplog.records]
    assert any("CLIP" in m and "2 of 3 prompts" in m and "6 tokens" in m for m in msgs)
    assert any("mT5" in m and "1 of 3 prompts" in m and "7 tokens" in m for m in msgs)
    assert out["mask"].tolist()[0] == [1] * 6 and out["mask"][1].sum() == 6
    assert out["mask_t5"][0].sum() == 5 and out["mask_t5"][2].sum() == 7
    assert out["embeds"].shape == (3, 6, 24) and out["embeds_t5"].shape == (3, 7, 32)
    assert out["embeds"].dtype == torch.float32
    enc.release()
    with pytest.raises(RuntimeError, match="release"):
        enc.encode(["x"])


def test_local_layout_round_trip_and_fingerprint(adapter, tmp_path):
    save_layout(adapter, tmp_path)
    local = load_adapter(tiny_cfg(weights="local", path=str(tmp_path), hub_id=HUB))
    enc = local.text_encoder()
    fp = enc.fingerprint()
    want = {"text_encoder/config.json", "tokenizer_2/tokenizer.json", "text_encoder_2/model.safetensors"}
    assert want <= set(fp["files"])
    assert "text_encoder_2/model.safetensors" in local.fingerprint()["files"]
    local.set_text_bank(bank_for(local))
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([100, 800]), torch.tensor([1, -1])
    assert torch.allclose(local.denoise(x, t, y), adapter.denoise(x, t, y), atol=1e-6)  # same weights, same encoders


def test_missing_text_encoder_2_says_what_to_download(adapter, tmp_path):
    save_layout(adapter, tmp_path)
    shutil.rmtree(tmp_path / "text_encoder_2")
    with pytest.raises(MissingCheckpointError) as err:
        load_adapter(tiny_cfg(weights="local", path=str(tmp_path), hub_id=HUB))
    msg = str(err.value)
    assert "text_encoder_2/" in msg and f"huggingface-cli download {HUB}" in msg and "model.path" in msg


def test_text_encoder_width_mismatch(adapter, tmp_path):
    save_layout(adapter, tmp_path, clip_width=20)
    with pytest.raises(TextEncoderMismatchError, match=r"20-wide .*cross_attention_dim=24.*same Hunyuan-DiT release"):
        load_adapter(tiny_cfg(weights="local", path=str(tmp_path), hub_id=HUB))  # from config.json, before loading


def test_bank_from_another_encoder_is_refused(adapter):
    other = TextBank(torch.tensor([-1, 0]), torch.zeros(2, 6, 24), torch.ones(2, 6))
    with pytest.raises(TextEncoderMismatchError, match="embeds_t5"):
        adapter.set_text_bank(other)
    wrong = TextBank(torch.tensor([-1, 0]), torch.zeros(2, 6, 24), torch.ones(2, 6),
                     {"embeds_t5": torch.zeros(2, 5, 32), "mask_t5": torch.ones(2, 5)})
    with pytest.raises(TextEncoderMismatchError, match=r"embeds_t5 is \[P, 5, 32\].*\[P, 7, 32\]"):
        adapter.set_text_bank(wrong)


# ----------------------------------------------------------------------------- config
def test_config_of_the_real_model_validates(compose):
    from ditq.config import ConfigError, validate_config

    base = ["model=hunyuan_dit_1024", "model.weights=random", "dataset=hpsv2"]
    cfg = compose(base)
    arch = validate_config(cfg).model.arch
    assert (arch.hidden_size, arch.num_layers, arch.cross_attention_dim_t5, arch.sample_size) == (1408, 40, 2048, 128)
    with pytest.raises(ConfigError, match=r"hidden_size=1400 must equal .* 16 x 88 = 1408"):
        validate_config(compose(base + ["model.arch.hidden_size=1400"]))
    with pytest.raises(ConfigError, match=r"sample_size=64 gives 512px"):
        validate_config(compose(base + ["model.arch.sample_size=64"]))
    with pytest.raises(ConfigError, match=r"model.text.max_tokens=100 but model.arch.text_len=77"):
        validate_config(compose(base + ["model.text.max_tokens=100"]))


def test_text_settings_are_checked():
    with pytest.raises(TextEncoderMismatchError, match=r"model.text.max_tokens_t5=9 .* takes exactly 7 tokens"):
        load_adapter(tiny_cfg(text={"max_tokens_t5": 9}))
    with pytest.raises(ValueError, match=r"model.text.tokens is not a Hunyuan-DiT text setting"):
        load_adapter(tiny_cfg(text={"tokens": 9}))
    with pytest.raises(TextEncoderMismatchError, match=r"40-wide .*cross_attention_dim_t5=32"):
        load_adapter(tiny_cfg(text={"arch": {"t5": {"d_model": 40}}}))


# ----------------------------------------------------------------------------- methods end to end
def _method_ctx(compose, tmp_path, method, bits):
    from ditq.calibration.layer_inputs import collect_layer_inputs
    from ditq.calibration.lazy import Lazy
    from ditq.config import validate_config
    from ditq.methods.base import QuantContext
    from ditq.methods.wrap import full_precision, wrap_layers

    run = validate_config(compose(["model=hunyuan_dit_1024", "model.weights=random", "dataset=hpsv2",
                                   f"method={method}", f"bits={bits}", f"paths.cache_dir={tmp_path}/cache"]))
    a = load_adapter(tiny_cfg())
    a.set_text_bank(bank_for(a))
    a.set_conditions(PromptConditions("tiny", PROMPTS))
    torch.manual_seed(3)
    calib = {"x": torch.randn(4, 4, 4, 4), "t": torch.tensor([999, 600, 300, 20]), "y": torch.tensor([0, 1, 2, 0])}
    fp = a.denoise(calib["x"], calib["t"], calib["y"])
    qlayers, roles = wrap_layers(a, run)

    def record():
        with full_precision(qlayers):
            return collect_layer_inputs(a, calib, list(qlayers), 256, include_uncond=True, progress=False)

    ctx = QuantContext(adapter=a, run=run, qlayers=qlayers, roles=roles, layer_inputs=Lazy(record, "layer inputs"),
                       calib_records=lambda: calib, timesteps=[999, 600, 300, 20], progress=False)
    return a, ctx, calib, fp


def test_rtn_quantizes_hunyuan_layer_wise(compose, tmp_path):
    from ditq.methods.registry import build_steps

    a, ctx, calib, fp = _method_ctx(compose, tmp_path, "rtn", "w8a8")
    assert any(n.endswith("skip_linear") for n in ctx.qlayers) and any(".attn1.to_q" in n for n in ctx.qlayers)
    for step in build_steps([{"name": "rtn"}]):
        step.apply(ctx)
    q = a.denoise(calib["x"], calib["t"], calib["y"])
    err = float((q - fp).norm() / fp.norm())
    assert 0 < err < 0.1, err


def test_gptq_step_is_refused_with_the_long_skip_error(compose, tmp_path):
    from ditq.methods.registry import build_steps

    a, ctx, calib, fp = _method_ctx(compose, tmp_path, "rtn", "w4a8")
    (gptq,) = build_steps([{"name": "gptq", "sequential": False}])
    with pytest.raises(BlockwiseUnsupportedError, match="long skip connections"):
        gptq.apply(ctx)
    assert all(not q.weight_quantizer.frozen for q in ctx.qlayers.values())  # nothing was quantized


def test_cost_counts_condition_layers_once_per_sample(adapter):
    from ditq.methods.cost import layer_tokens

    tokens = layer_tokens(adapter)
    assert tokens["blocks.2.norm1.linear"] == tokens["norm_out.linear"] == 1
    assert tokens["time_extra_emb.extra_embedder.linear_1"] == tokens["time_extra_emb.pooler.q_proj"] == 1
    assert tokens["blocks.0.attn1.to_q"] == tokens["blocks.3.skip_linear"] == tokens["proj_out"] == 4  # 2 x 2 patches


def test_prepare_text_caches_both_encoders_outputs(tmp_path):
    from ditq.conditioning.text import prepare_text
    from ditq.utils.cache import DiskCache

    a = load_adapter(tiny_cfg())
    conditions = PromptConditions("tiny", PROMPTS)
    cache = DiskCache(tmp_path / "cache")
    bank = prepare_text(a, conditions, [2, 0], cache=cache, progress=False)
    assert bank.index.tolist() == [-1, 0, 2] and bank.stats["encoder_loaded"]
    assert bank.extra["embeds_t5"].shape == (3, 7, 32) and bank.extra["mask_t5"].shape == (3, 7)
    again = prepare_text(load_adapter(tiny_cfg()), conditions, [2, 0], cache=cache, progress=False)
    assert again.stats["cached"] and not again.stats["encoder_loaded"]  # the fingerprint hook: no encoder load
    assert torch.equal(again.extra["embeds_t5"], bank.extra["embeds_t5"])
    other = load_adapter(tiny_cfg(text={"dtype": "bfloat16"}))
    assert other.text_encoder_fingerprint() != a.text_encoder_fingerprint()
