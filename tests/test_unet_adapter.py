"""`UNetAdapter` / `UNetRunner` on tiny random `UNet2DModel`s: roles and blocks of every layer, exact
segment replay through the skip stack, conditioning-only inputs, GPTQ through the block-wise engine,
latent decoding, and the refusals of the unconditional U-Net (weights, guidance, prompts, class accuracy)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ditq.calibration.blocks import PRE, TAIL, BlockRunner
from ditq.config.schema import ModelConfig
from ditq.models import MissingCheckpointError, load_adapter
from tests.conftest import SHRINK

# attention at the second level and in the middle, two ResNets per level (several skips per block)
ATTN2 = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[32, 64], layers_per_block=2,
             down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
             attention_head_dim=16, norm_num_groups=8)
# LDM-KL-8 (Churches) style: scale-shift time conditioning, ResNet resampling, 2 heads at every width
LDM8 = dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=[16, 32, 32], layers_per_block=1,
            down_block_types=["AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
            up_block_types=["ResnetUpsampleBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"], attention_head_dim=None,
            norm_num_groups=8, resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8,
            downsample_type="resnet", upsample_type="resnet", ditq_num_attention_heads=2)
REAL = ["ddpm_cifar10_32", "ldm_celebahq_256", "ldm_lsun_bedroom_256", "ldm_lsun_church_256"]
DATASET = {"ddpm_cifar10_32": "cifar10", "ldm_celebahq_256": "celebahq", "ldm_lsun_bedroom_256": "lsun_bedroom",
           "ldm_lsun_church_256": "lsun_church"}


def tiny_unet(arch=ATTN2, seed=1, **kw):
    from ditq.conditioning.base import NoConditions

    cfg = OmegaConf.structured(ModelConfig(name="tiny_unet", family="unet", weights="random", arch=dict(arch),
                                           resolution=8, num_classes=1, cfg_channels=None, **kw))
    adapter = load_adapter(cfg)
    g = torch.Generator().manual_seed(seed)  # diffusers zero-inits nothing here, but make every weight matter
    for p in adapter.denoiser.parameters():
        p.data.add_(torch.randn(p.shape, generator=g) * 0.05)
    adapter.set_conditions(NoConditions())
    return adapter


def inputs(adapter, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = adapter.latent_shape[0], adapter.latent_shape[1]
    return (torch.randn(n, c, s, s, generator=g), torch.tensor([999, 500, 20, 1][:n]),
            torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("arch", [ATTN2, LDM8], ids=["attn_2_resnets", "ldm8_style"])
def test_every_layer_has_a_role_and_its_block(arch):
    adapter = tiny_unet(arch)
    infos = adapter.layers()
    convs_and_linears = [n for n, m in adapter.denoiser.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(i.name for i in infos) == sorted(convs_and_linears)
    roles = {i.name: i.role for i in infos}
    assert roles["conv_in"] == "embed" and roles["time_embedding.linear_1"] == "embed" and roles["conv_out"] == "final"
    assert roles["down_blocks.0.resnets.0.conv1"] == "conv" and roles["down_blocks.0.resnets.0.time_emb_proj"] == "adaln"
    assert roles["mid_block.attentions.0.to_q"] == "qkv" and roles["mid_block.attentions.0.to_out.0"] == "proj"
    if arch is LDM8:  # ResNets that resample: conv and time projection like any ResNet's
        assert roles["down_blocks.0.downsamplers.0.conv1"] == "conv"
        assert roles["up_blocks.0.upsamplers.0.time_emb_proj"] == "adaln"
    else:
        assert roles["down_blocks.0.downsamplers.0.conv"] == "conv" and roles["up_blocks.0.resnets.0.conv_shortcut"] == "conv"
    n_down = len(adapter.unet.down_blocks)
    runner = adapter.block_runner()
    segs = runner.segment_layers([i.name for i in infos])
    for i in infos:
        if i.name.startswith("down_blocks."):
            assert i.block == int(i.name.split(".")[1])
        elif i.name.startswith("mid_block."):
            assert i.block == n_down
        elif i.name.startswith("up_blocks."):
            assert i.block == n_down + 1 + int(i.name.split(".")[1])
        else:
            assert i.block is None
        want = i.block if i.block is not None else (PRE if i.name in adapter.pre_block_layers() else TAIL)
        assert i.name in segs[want]
    assert segs[TAIL] == ["conv_out"]


@pytest.mark.parametrize("arch", [ATTN2, LDM8], ids=["attn_2_resnets", "ldm8_style"])
def test_replay_equals_denoise_exactly(arch):
    adapter = tiny_unet(arch)
    x, t, y = inputs(adapter)
    runner = adapter.block_runner()
    assert runner.num_blocks == 2 * len(arch["down_block_types"]) + 1
    with torch.no_grad():
        want = adapter.denoise(x, t, y)
        got = runner.replay(x, t, y)
    assert torch.equal(got, want)
    # the skip stack really is carried: corrupting one skip tensor changes the output
    state, call = runner.capture(x, t, y)
    for k in range(len(adapter.unet.down_blocks)):
        state = runner.run_block(k, state, call)
    assert len(state) == 1 + 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in adapter.unet.down_blocks)
    bad = (state[0], state[1] + 1, *state[2:])
    for k in range(len(adapter.unet.down_blocks), runner.num_blocks):
        bad = runner.run_block(k, bad, call)
    assert not torch.equal(runner.finish(bad, call), want)


def test_unbalanced_skip_stack_is_an_error():
    adapter = tiny_unet()
    runner = adapter.block_runner()
    x, t, y = inputs(adapter)
    state, call = runner.capture(x, t, y)
    with pytest.raises(RuntimeError, match="skip tensors left"):
        runner.finish(state, call)


@pytest.mark.parametrize("arch", [ATTN2, LDM8], ids=["attn_2_resnets", "ldm8_style"])
def test_conditioning_inputs_equal_the_real_inputs(arch):
    adapter = tiny_unet(arch)
    x, t, y = inputs(adapter)
    cond = adapter.conditioning_layers()
    emb_projs = [n for n, _ in adapter.denoiser.named_modules() if n.endswith("time_emb_proj")]
    assert set(cond) == {"time_embedding.linear_1", "time_embedding.linear_2", *emb_projs}
    seen: dict[str, torch.Tensor] = {}
    hooks = [adapter.denoiser.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0].detach().clone())) for n in cond]
    try:
        with torch.no_grad():
            adapter.denoise(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    for segment in set(cond.values()):
        got = adapter.conditioning_inputs(segment, t, y)
        assert set(got) == {n for n, s in cond.items() if s == segment}
        for n, v in got.items():
            assert torch.allclose(v, seen[n], atol=1e-6, rtol=1e-6), n
    seg = adapter.block_runner().segment_layers(list(cond))
    for n, s in cond.items():
        assert n in seg[s]


def _records(adapter, n=8, timesteps=(999, 500, 20)):
    g = torch.Generator().manual_seed(7)
    c, s = adapter.latent_shape[0], adapter.latent_shape[1]
    t = torch.tensor([timesteps[i % len(timesteps)] for i in range(n)])
    return {"x": torch.randn(n, c, s, s, generator=g), "t": t, "y": torch.zeros(n, dtype=torch.long)}


def _wrap_all(adapter, fmt="int3"):
    from ditq.config.schema import quantizer_config
    from ditq.quant.modules import QuantConv2d, QuantLinear
    from ditq.quant.quantizer import build_quantizer

    qlayers = {}
    for info in adapter.layers():
        mod = adapter.denoiser.get_submodule(info.name)
        wq = build_quantizer(quantizer_config({"granularity": "per_channel"}, fmt, "weight", "w"), "weight")
        q = (QuantConv2d if isinstance(mod, torch.nn.Conv2d) else QuantLinear)(mod, wq, None, name=info.name)
        adapter.denoiser.set_submodule(info.name, q)
        qlayers[info.name] = q
    return qlayers


def _out_err(adapter, records):
    from ditq.methods.wrap import full_precision

    with torch.no_grad():
        q = adapter.denoise(records["x"], records["t"], records["y"])
        with full_precision(adapter.qlayers):
            fp = adapter.denoise(records["x"], records["t"], records["y"])
    return float(((q - fp) ** 2).mean() / (fp ** 2).mean())


def test_gptq_through_the_engine_reaches_every_conv_and_beats_rtn(compose, paths):
    from ditq.config import validate_config
    from ditq.methods.base import QuantContext
    from ditq.methods.registry import build_steps

    run = validate_config(compose(SHRINK + paths + ["model=tiny_unet_digits", "dataset=digits", "eval=digits_uncond",
                                                    "sampler=ddim25_uncond", "method=gptq", "bits=w4a8"]))
    small = dict(ATTN2, block_out_channels=[16, 32])
    records = _records(tiny_unet(small), n=6)
    rtn = tiny_unet(small)
    rtn.qlayers = _wrap_all(rtn)
    gptq = tiny_unet(small)
    gptq.qlayers = qlayers = _wrap_all(gptq)
    ctx = QuantContext(adapter=gptq, run=run, qlayers=qlayers, roles={}, layer_inputs=lambda: {},
                       calib_records=lambda: records, timesteps=[999, 500, 20], progress=False)
    build_steps([{"name": "gptq", "batch_size": 4}])[0].apply(ctx)
    rep = ctx.diagnostics["gptq"]
    assert set(rep["per_layer"]) == set(qlayers)  # convs, attention, time projections, conv_in/out
    assert rep["per_layer"]["down_blocks.1.attentions.0.to_k"]["hessian_shared_with"] is not None
    losses = [v["loss"] for v in rep["per_layer"].values()]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert all(q.weight_quantizer.frozen for q in qlayers.values())
    err_rtn, err_gptq = _out_err(rtn, records), _out_err(gptq, records)
    assert err_gptq < err_rtn, (err_gptq, err_rtn)


def test_chain_runner_refuses_the_unet_naming_its_own_runner():
    adapter = tiny_unet()
    assert isinstance(adapter.block_runner(), BlockRunner)  # UNetRunner: the skip stack between segments
    with pytest.raises(TypeError, match=r"not a chain of blocks.*block_runner\(\)"):
        BlockRunner(adapter)


@pytest.mark.parametrize("name", REAL)
def test_real_models_say_how_to_get_their_weights(compose, tmp_path, monkeypatch, name):
    from ditq.config import validate_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = validate_config(compose([f"model={name}", f"dataset={DATASET[name]}", "eval=adm", "sampler=ddim25_uncond",
                                   f"paths.models_dir={tmp_path}"]))
    with pytest.raises(MissingCheckpointError) as err:
        load_adapter(run.model)
    msg = str(err.value)
    assert name in msg and str(tmp_path) in msg
    if run.model.hub_id:
        assert f"huggingface-cli download {run.model.hub_id}" in msg
    else:
        assert "ommer-lab.com/files/latent-diffusion/" in msg and "python -m ditq.models.convert_ldm" in msg


def test_latent_unet_with_random_vqmodel_decodes_uint8():
    arch = dict(ATTN2, in_channels=3, out_channels=3)
    vae_arch = {"_class": "VQModel", "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16],
                "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                "layers_per_block": 1, "latent_channels": 3, "norm_num_groups": 8, "num_vq_embeddings": 16,
                "sample_size": 16, "vq_embed_dim": 3}
    adapter = tiny_unet(arch, vae="vqvae", vae_arch=vae_arch, vae_scale=1.0)
    x, t, y = inputs(adapter, n=2)
    with torch.no_grad():
        eps = adapter.denoise(x, t, y)
        img = adapter.decode(x)
    assert eps.shape == x.shape
    assert img.dtype == torch.uint8 and img.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("override,match", [
    (["sampler=ddim100"], "cfg_scale"),                                 # guidance of an unconditional model
    (["dataset=digits_captions"], "dataset"),                           # prompts for a model without text
    (["eval=digits"], "cls_acc"),                                       # class accuracy of unlabelled samples
])
def test_unconditional_unet_refuses_conditioning_work(compose, paths, override, match):
    from ditq.config import validate_config
    from ditq.config.schema import ConfigError

    base = SHRINK + paths + ["model=tiny_unet_digits", "dataset=digits", "eval=digits_uncond", "sampler=ddim25_uncond"]
    validate_config(compose(base))  # the base is valid
    with pytest.raises(ConfigError, match=match):
        validate_config(compose(base + override))


@pytest.mark.parametrize("name", REAL)
def test_real_architectures_build_with_random_weights(compose, name):
    """Parameter counts of the published models (DDPM CIFAR-10: 35.7M; LDM-4: 274M; LDM-8: 294M in the LDM
    paper); a few seconds each (the LDM U-Nets hold ~1.2 GB of float32 weights)."""
    from ditq.config import validate_config

    run = validate_config(compose([f"model={name}", f"dataset={DATASET[name]}", "eval=adm", "sampler=ddim25_uncond",
                                   "model.weights=random"]))
    adapter = load_adapter(run.model)
    n = sum(p.numel() for p in adapter.unet.parameters())
    want = {"ddpm_cifar10_32": 35_746_307, "ldm_celebahq_256": 274_056_163, "ldm_lsun_bedroom_256": 274_056_163,
            "ldm_lsun_church_256": 294_966_916}[name]
    assert n == want
    assert len({i.name for i in adapter.layers()}) == sum(
        isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in adapter.unet.modules())
    assert adapter.latent_shape[1] * (1 if adapter.vae is None else 2 ** (len(adapter.vae.config.block_out_channels) - 1)) \
        == run.model.resolution


def test_schedule_is_read_from_both_hub_layouts(tmp_path):
    """google/ddpm-cifar10-32 keeps config.json and scheduler_config.json at the repo root; pipeline repos in
    scheduler/. Either is read (private keys dropped); a directory with neither falls back to DDPM's."""
    import json

    from diffusers import UNet2DModel

    from ditq.models.unet import DDPM_SCHEDULE

    unet = UNet2DModel(**ATTN2)
    for layout in ("root", "pipeline"):
        root = tmp_path / layout
        unet.save_pretrained(root if layout == "root" else root / "unet")
        sched_dir = root if layout == "root" else root / "scheduler"
        sched_dir.mkdir(parents=True, exist_ok=True)
        conf = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": f"linear_{layout}"}
        (sched_dir / "scheduler_config.json").write_text(json.dumps(conf))
        cfg = OmegaConf.structured(ModelConfig(name="u", family="unet", weights="local", path=str(root),
                                               resolution=8, num_classes=1, cfg_channels=None))
        assert load_adapter(cfg).scheduler_config() == {"num_train_timesteps": 1000, "beta_schedule": f"linear_{layout}"}
    (tmp_path / "root" / "scheduler_config.json").unlink()
    cfg = OmegaConf.structured(ModelConfig(name="u", family="unet", weights="local", path=str(tmp_path / "root"),
                                           resolution=8, num_classes=1, cfg_channels=None))
    assert load_adapter(cfg).scheduler_config() == DDPM_SCHEDULE
