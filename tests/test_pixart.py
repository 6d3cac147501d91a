"""The PixArt adapter: hub-layout loading, text encoder, roles, block replay, block-wise GPTQ, random builds."""
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ditq.conditioning import TextBank
from ditq.conditioning.encoder import TextEncoderMismatchError
from ditq.config.schema import ModelConfig
from ditq.models.base import MissingCheckpointError

PROMPTS = ["a handwritten seven", "the digit 3", "a drawing of the number zero"]


def _randomize(module: nn.Module, seed: int = 1) -> None:
    """Random weights everywhere (PixArt's init zeroes the cross-attention output and the final layer,
    which would make outputs independent of the prompt and replay checks trivial)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _build_dir(root: Path, num_layers: int = 2, text_width: int | None = None) -> Path:
    """A tiny PixArt pipeline in the hub layout, from ditq.train.tiny_pixart's builders."""
    from diffusers import PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from ditq.train import tiny_pixart as tp

    torch.manual_seed(0)
    tok = tp.build_tokenizer()
    te = T5EncoderModel(T5Config(vocab_size=len(tok), **{**tp.TEXT_ARCH, **({"d_model": text_width} if text_width
                                                                              else {})}))
    tr = PixArtTransformer2DModel(**{**tp.ARCH, "num_layers": num_layers})
    _randomize(tr)
    tp.save(tp.Pair(te, tr), tok, root, meta={"test": True})
    return root


def _cfg(path=None, **kw):
    base = dict(name="tiny_pixart_test", family="pixart", path=str(path) if path else None, resolution=8,
                text={"max_tokens": 16})
    base.update(kw)
    return OmegaConf.structured(ModelConfig(**base))


def _bank(adapter, prompts=PROMPTS):
    enc = adapter.text_encoder()
    out = enc.encode([*prompts, ""])
    fp = enc.fingerprint()
    enc.release()
    return TextBank(torch.tensor([*range(len(prompts)), -1]), out["embeds"], out["mask"], encoder=fp)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _build_dir(tmp_path_factory.mktemp("tiny_pixart"))


@pytest.fixture
def adapter(tiny_dir):
    from ditq.models import load_adapter

    a = load_adapter(_cfg(tiny_dir))
    a.set_text_bank(_bank(a))
    return a


def _inputs(n=4, seed=0, shape=(1, 8, 8), prompts=len(PROMPTS)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    t = torch.tensor([999, 700, 300, 20, 500, 1][:n])
    y = torch.arange(n) % prompts
    y[-1] = -1  # the empty prompt (guidance branch)
    return x, t, y


# -- loading and the text encoder ------------------------------------------------------------------
def test_loads_the_hub_layout_and_denoises_with_its_own_text_bank(adapter, tiny_dir):
    assert adapter.conditioning == "text" and adapter.null_index == -1
    assert adapter.latent_shape == (1, 8, 8) and adapter.vae is None
    x, t, y = _inputs()
    with torch.no_grad():
        out = adapter.denoise(x, t, y)
        other = adapter.denoise(x, t, torch.tensor([1, 2, 0, 0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out[:3], other[:3])  # the prompt reaches the output
    assert adapter.scheduler_config()["num_train_timesteps"] == 1000
    fp = adapter.fingerprint()
    assert fp["family"] == "pixart" and "transformer/diffusion_pytorch_model.safetensors" in fp["files"]
    assert "text_encoder/model.safetensors" in fp["text"]["files"] and fp["text"]["max_tokens"] == 16
    images = adapter.decode(out)
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 8, 8)


def test_text_encoder_pads_to_max_tokens_and_masks(tiny_dir):
    from ditq.models import load_adapter

    a = load_adapter(_cfg(tiny_dir))
    enc = a.text_encoder()
    out = enc.encode(["the digit 3", ""])
    assert out["embeds"].shape == (2, 16, 64) and out["embeds"].dtype == torch.float32
    assert out["mask"].tolist()[1] == [1] + [0] * 15  # "" = the end-of-sequence token only
    assert int(out["mask"][0].sum()) == 4  # three words + </s>
    assert enc.fingerprint() == a.text_encoder_fingerprint()
    enc.release()
    with pytest.raises(RuntimeError, match="released"):
        enc.encode(["the digit 3"])


def test_prepare_text_caches_the_bank_and_never_reloads_the_encoder(tiny_dir, tmp_path):
    """The run's path: ditq.conditioning.prepare_text keys the cache by the fingerprint the adapter gives
    without loading the encoder, which equals the loaded encoder's."""
    from ditq.conditioning import PromptConditions
    from ditq.conditioning.text import prepare_text
    from ditq.models import load_adapter
    from ditq.utils.cache import DiskCache

    a = load_adapter(_cfg(tiny_dir))
    conditions = PromptConditions("test", PROMPTS)
    first = prepare_text(a, conditions, [0, 2], cache=DiskCache(tmp_path), progress=False)
    assert first.stats["encoder_loaded"] and not first.stats["cached"]
    assert first.index.tolist() == [-1, 0, 2] and a.bank is first
    again = prepare_text(a, conditions, [0, 2], cache=DiskCache(tmp_path), progress=False)
    assert again.stats["cached"] and not again.stats["encoder_loaded"]
    assert torch.equal(again.embeds, first.embeds)
    x, t, _ = _inputs(3)
    with torch.no_grad():
        assert a.denoise(x, t, torch.tensor([0, 2, -1])).shape == x.shape


def test_prompts_over_the_limit_warn_with_their_count(tiny_dir, caplog):
    from ditq.models import load_adapter

    enc = load_adapter(_cfg(tiny_dir)).text_encoder()
    long = " ".join(["the digit seven"] * 6)  # 18 words + </s> > 16 tokens
    with caplog.at_level(logging.WARNING):
        out = enc.encode([long, "the digit 3", long])
    assert "2 of 3 prompts are longer than the encoder's limit of 16 tokens" in caplog.text
    assert out["mask"][0].all()  # truncated to the limit


def test_denoise_without_a_text_bank_says_what_to_run(tiny_dir):
    from ditq.models import load_adapter

    a = load_adapter(_cfg(tiny_dir))
    x, t, y = _inputs()
    with pytest.raises(RuntimeError, match="prepare_text"):
        a.denoise(x, t, y)


def test_a_bank_of_another_width_is_refused(adapter):
    bank = TextBank(torch.tensor([0, -1]), torch.zeros(2, 16, 32), torch.ones(2, 16, dtype=torch.long))
    with pytest.raises(TextEncoderMismatchError, match="32.*caption_channels=64"):
        adapter.set_text_bank(bank)


def test_missing_text_encoder_names_model_path(tiny_dir, tmp_path):
    from ditq.models import load_adapter

    broken = tmp_path / "no_text"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    a = load_adapter(_cfg(broken, obtain_hint="rebuild with `python -m ditq.train.tiny_pixart --out <model.path>`"))
    with pytest.raises(MissingCheckpointError, match=r"text encoder.*model\.path=.*no_text.*ditq\.train\.tiny_pixart"):
        a.text_encoder()
    shutil.rmtree(broken / "tokenizer")
    hub = load_adapter(_cfg(broken, hub_id="PixArt-alpha/PixArt-XL-2-512x512"))
    with pytest.raises(MissingCheckpointError, match="huggingface-cli download PixArt-alpha/PixArt-XL-2-512x512"):
        hub.text_encoder()


def test_a_text_encoder_of_another_width_is_refused(tmp_path, monkeypatch):
    from ditq.models import load_adapter
    from ditq.models.pixart import PixArtAdapter

    root = _build_dir(tmp_path / "mismatch", text_width=32)
    with pytest.raises(TextEncoderMismatchError, match=r"32-wide.*caption_channels=64.*model\.path"):
        load_adapter(_cfg(root))  # from the config files, before any weights load
    monkeypatch.setattr(PixArtAdapter, "_check_files", lambda self: None)
    a = load_adapter(_cfg(root))
    with pytest.raises(TextEncoderMismatchError, match=r"32-wide.*caption_channels=64"):
        a.text_encoder()  # the loaded encoder is checked too


def test_parts_that_do_not_fit_fail_at_load_naming_the_key(tiny_dir, tmp_path):
    import json

    from ditq.models import load_adapter

    with pytest.raises(ValueError, match=r"model\.resolution=16.*set model\.resolution=8"):
        load_adapter(_cfg(tiny_dir, resolution=16))
    root = tmp_path / "with_vae"
    shutil.copytree(tiny_dir, root)
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps({"scaling_factor": 0.13025,
                                                          "block_out_channels": [128, 256, 512, 512]}))
    with pytest.raises(ValueError, match=r"model\.vae_scale=0\.18215.*scaling_factor=0\.13025"):
        load_adapter(_cfg(root, vae="vae", resolution=64))


# -- roles and block replay ------------------------------------------------------------------------
def test_every_linear_and_conv_has_its_role(adapter):
    infos = {li.name: li for li in adapter.layers()}
    expected = {n for n, m in adapter.denoiser.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(infos) == expected
    role = {n: li.role for n, li in infos.items()}
    assert role["transformer_blocks.0.attn1.to_k"] == "qkv"
    assert role["transformer_blocks.0.attn1.to_out.0"] == "proj"
    assert {role[f"transformer_blocks.1.attn2.{s}"] for s in ("to_q", "to_k", "to_v", "to_out.0")} == {"cross_attn"}
    assert role["transformer_blocks.1.ff.net.0.proj"] == "fc1" and role["transformer_blocks.1.ff.net.2"] == "fc2"
    assert role["adaln_single.linear"] == "adaln"
    assert role["adaln_single.emb.timestep_embedder.linear_1"] == role["pos_embed.proj"] == "embed"
    assert role["caption_projection.linear_1"] == role["caption_projection.linear_2"] == "caption"
    assert role["proj_out"] == "final"
    assert infos["transformer_blocks.1.ff.net.2"].block == 1 and infos["adaln_single.linear"].block is None
    adapter.text_cfg["max_tokens"] = 12
    tokens = adapter.layer_tokens()  # input rows per sample (cost accounting)
    assert tokens["caption_projection.linear_1"] == tokens["transformer_blocks.0.attn2.to_k"] == 12
    assert tokens["adaln_single.linear"] == 1 and tokens["transformer_blocks.0.attn2.to_q"] == 16  # 4x4 patches
    assert tokens["proj_out"] == tokens["pos_embed.proj"] == 16
    adapter.denoiser.stray = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="stray"):
        adapter.layers()


def test_block_replay_equals_denoise_exactly(adapter):
    from ditq.calibration.blocks import BlockRunner

    x, t, y = _inputs(4)
    runner = BlockRunner(adapter)
    with torch.no_grad():
        ref = adapter.denoise(x, t, y)
    assert torch.equal(runner.replay(x, t, y), ref)
    segs = runner.segment_layers([li.name for li in adapter.layers()])
    assert set(segs["pre"]) == {n for n in segs["pre"] if n.startswith(("pos_embed", "adaln_single", "caption"))}
    assert "caption_projection.linear_2" in segs["pre"] and "adaln_single.linear" in segs["pre"]
    assert segs["tail"] == ["proj_out"]


def test_replay_with_size_micro_conditions_equals_denoise():
    """PixArt-alpha 1024's resolution / aspect-ratio embedders (here at a tiny width)."""
    from ditq.calibration.blocks import BlockRunner
    from ditq.models import load_adapter

    arch = dict(num_attention_heads=3, attention_head_dim=32, in_channels=1, out_channels=2, num_layers=2,
                cross_attention_dim=96, sample_size=8, patch_size=2, caption_channels=24,
                use_additional_conditions=True)
    text = {"max_tokens": 12, "arch": {"d_model": 24, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}}
    a = load_adapter(_cfg(weights="random", arch=arch, text=text))
    _randomize(a.denoiser)
    a.set_text_bank(_bank(a, ["a cat", "a dog on a mat"]))
    assert a.transformer.use_additional_conditions
    assert "adaln_single.emb.resolution_embedder.linear_1" in {li.name for li in a.layers()}
    x, t, y = _inputs(3, prompts=2)
    with torch.no_grad():
        ref = a.denoise(x, t, y)
    assert torch.equal(BlockRunner(a).replay(x, t, y), ref)
    assert ref.shape == x.shape  # learned-sigma channel dropped
    assert "bytes" in a.text_encoder_fingerprint()["tokenizer"]
    # diffusers' PixArt preprocessing (lower case, stripped) before a case-sensitive tokenizer
    enc = a.text_encoder()
    e1, e2, e3 = (enc.encode([p]) for p in ("  A Cat ", "a cat", "a dog"))
    assert torch.equal(e1["embeds"], e2["embeds"]) and not torch.equal(e2["embeds"], e3["embeds"])


# -- block-wise GPTQ -------------------------------------------------------------------------------
def _wrap(adapter, wfmt="int4"):
    from ditq.config.schema import quantizer_config
    from ditq.quant.modules import QuantConv2d, QuantLinear
    from ditq.quant.quantizer import build_quantizer

    qlayers = {}
    for info in adapter.layers():
        mod = adapter.denoiser.get_submodule(info.name)
        wq = build_quantizer(quantizer_config({"granularity": "per_channel"}, wfmt, "weight", "w"), "weight")
        cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear
        q = cls(mod, wq, None, name=info.name)
        adapter.denoiser.set_submodule(info.name, q)
        qlayers[info.name] = q
    return qlayers


def test_blockwise_gptq_runs_with_the_conditioning_grid(adapter):
    from ditq.calibration.blocks import BlockRunner
    from ditq.calibration.engine import BlockwiseEngine
    from ditq.methods.gptq import gptq_layer

    qlayers = _wrap(adapter)
    x, t, y = _inputs(6, seed=3)
    y[-1] = 2
    records = {"x": x, "t": torch.tensor([999, 500, 20, 999, 500, 20]), "y": y}
    grid_t, grid_y = [999, 500, 20], [0, 1, 2, -1]
    hess, done = {}, []

    def on_segment(segment, names, stats):
        for n in names:
            hess[n] = stats.hessian(n).clone()
            gptq_layer(qlayers[n], stats.hessian(n), n, block_size=128, percdamp=0.01, act_order=False,
                       static_groups=False)
            done.append(n)

    engine = BlockwiseEngine(adapter, qlayers, records, include_uncond=True, batch_size=4, sequential=True,
                             grid_timesteps=grid_t, grid_labels=grid_y, progress=False)
    report = engine.run(on_segment)
    assert sorted(done) == sorted(qlayers)
    assert report["grid_rows"] == len(grid_t) * len(grid_y)
    # the caption projection's Hessian comes from the real tokens of every grid prompt
    emb, mask, _ = adapter.bank.lookup(torch.tensor(grid_y))
    rows = emb[mask.bool()].double()
    torch.testing.assert_close(hess["caption_projection.linear_1"].double(), 2 * rows.T @ rows / len(rows),
                               rtol=1e-4, atol=1e-6)
    # adaLN-single sees one row per timestep of the grid (x every prompt): rank = number of timesteps
    assert int(torch.linalg.matrix_rank(hess["adaln_single.linear"].double(), rtol=1e-6)) == len(grid_t)
    for q in qlayers.values():
        assert q.weight_quantizer.frozen
    with torch.no_grad():
        out = adapter.denoise(x, records["t"], y)
    assert torch.isfinite(out).all() and torch.equal(BlockRunner(adapter).replay(x, records["t"], y), out)


# -- random weights at the real size ----------------------------------------------------------------
def _config_file(name: str, **override):
    from ditq.paths import config_dir

    raw = OmegaConf.load(config_dir() / "model" / f"{name}.yaml")
    raw.path = None
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw, override)
    return merged


def test_random_pixart_alpha_512_shape_runs_one_forward():
    from ditq.models import load_adapter

    cfg = _config_file("pixart_alpha_512", weights="random")
    cfg.arch.num_layers = 2
    a = load_adapter(cfg)
    tc = a.transformer.config
    assert (tc.num_attention_heads * tc.attention_head_dim, tc.caption_channels, tc.sample_size) == (1152, 4096, 64)
    assert a.latent_shape == (4, 64, 64) and a.vae is not None and not a.transformer.use_additional_conditions
    bank = _bank(a, ["an astronaut riding a horse on the moon"])
    assert bank.embeds.shape == (2, 120, 4096)
    a.set_text_bank(bank)
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        out = a.denoise(x, torch.tensor([500]), torch.tensor([0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    fp = a.fingerprint()
    assert fp["random_arch"]["num_layers"] == 2 and "built by ditq" in fp["text"]["tokenizer"]


@pytest.mark.parametrize("name", ["tiny_pixart_digits", "pixart_alpha_256", "pixart_alpha_512", "pixart_alpha_1024",
                                  "pixart_sigma_1024"])
def test_model_configs_validate_and_match_their_architecture(name):
    from ditq.config.checks import _check_model

    for weights in ("local", "random"):
        cfg = _config_file(name, weights=weights)
        _check_model(OmegaConf.create({"model": cfg}))
    cfg = _config_file(name)
    a = cfg.arch
    side = a.sample_size * (8 if cfg.vae else 1)
    assert side == cfg.resolution
    assert cfg.text.arch.d_model == a.caption_channels
    if name.startswith("pixart"):
        assert cfg.text.max_tokens == (300 if "sigma" in name else 120)
        assert cfg.vae_scale == (0.13025 if "sigma" in name else 0.18215)
        assert a.use_additional_conditions == (name == "pixart_alpha_1024")


@pytest.mark.parametrize("model, dataset", [("tiny_pixart_digits", "digits_captions"), ("pixart_alpha_512", "hpsv2"),
                                            ("pixart_sigma_1024", "hpsv2")])
def test_model_configs_compose_and_validate_as_a_run(compose, model, dataset):
    from ditq.config import validate_config

    for weights in ("local", "random"):
        run = validate_config(compose([f"model={model}", f"dataset={dataset}", f"model.weights={weights}"]))
        assert run.model.family == "pixart" and run.model.text.max_tokens >= 16


@pytest.mark.parametrize("override, needle", [
    ({"text": {"max_len": 4}}, "model.text.max_len"),
    ({"text": {"max_tokens": 0}}, "model.text.max_tokens"),
    ({"weights": "random", "text": {"max_tokens": 16, "arch": {"d_model": 32}}}, "model.text.arch.d_model=32"),
    ({"weights": "random", "arch": {"sample_size": 4}}, "model.arch.sample_size=4"),
])
def test_bad_pixart_settings_fail_naming_the_key(override, needle):
    from ditq.config import ConfigError
    from ditq.config.checks import _check_model

    cfg = _config_file("tiny_pixart_digits", **override)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        _check_model(OmegaConf.create({"model": cfg}))
