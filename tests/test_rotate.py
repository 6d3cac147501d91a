"""HQ-DiT's identity transform: online Hadamard rotations folded into the weights and per-head
rotations of V / proj (ditq.methods.rotate), exact for the FP model; calibration sees the rotated
inputs; order and structure errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ditq.calibration.lazy import Lazy
from ditq.calibration.stats import LayerStats
from ditq.config import ConfigError, validate_config
from ditq.methods.base import QuantContext
from ditq.methods.fold import FoldError, fold_input_scale
from ditq.methods.options import RotateOptions
from ditq.methods.rotate import Rotate, rotate_heads, rotate_input, shared_inputs
from ditq.methods.wrap import full_precision, wrap_layers
from ditq.quant import QuantizerConfig, QuantLinear, build_quantizer
from ditq.quant.hadamard import Rotation, RotationError
from tests.conftest import SHRINK
from tests.helpers import denoise_inputs, random_dit, rel_max_err, run_pipeline


def _cfg(compose, *overrides):
    return validate_config(compose(SHRINK + ["method=rtn_dynamic", "bits=w4a4_fp4", *overrides]))


def _rotated(adapter, run, **options):
    qlayers, roles = wrap_layers(adapter, run)
    ctx = QuantContext(adapter=adapter, run=run, qlayers=qlayers, roles=roles, layer_inputs=Lazy(dict, "unused"),
                       progress=False)
    step = Rotate(RotateOptions(**options))
    step.apply(ctx)
    return qlayers, roles, ctx


@pytest.mark.parametrize("options", [{}, {"roles": ["qkv", "proj", "fc1", "fc2", "adaln", "embed", "final"],
                                          "head_rotation": False}])
def test_rotated_embedded_dit_is_the_same_function(compose, options):
    run = _cfg(compose, "method.layers=[qkv,proj,fc1,fc2,adaln,embed,final]")
    from ditq.models import load_adapter

    adapter = load_adapter(run.model)
    inputs = denoise_inputs()
    with torch.no_grad():
        ref = adapter.denoise(*inputs)
        before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    qlayers, roles, ctx = _rotated(adapter, run, **options)
    d = ctx.diagnostics["rotate"]
    assert d["online_layers"] > 0 and d["kinds"] == {"hadamard": sum(d["kinds"].values())}
    rotated = [n for n, q in qlayers.items() if q.input_transform is not None]
    assert len(rotated) == d["online_layers"]
    assert all(not torch.equal(qlayers[n].weight, before[f"{n}.weight"]) for n in rotated
               if qlayers[n].weight.shape[1] > 1)  # (a 1-channel conv input has a rotation of +-1)
    with torch.no_grad(), full_precision(qlayers):
        out = adapter.denoise(*inputs)
    assert rel_max_err(out, ref) < 1e-5  # float32 rounding of the online rotation and the folded weights
    with torch.no_grad():  # and the quantized model runs on the rotated inputs
        q = adapter.denoise(*inputs)
    assert torch.isfinite(q).all() and not torch.allclose(q, ref)


def test_qkv_share_one_rotation_and_the_rest_one_each(compose):
    run = _cfg(compose)
    from ditq.models import load_adapter

    adapter = load_adapter(run.model)
    qlayers, roles = wrap_layers(adapter, run)
    groups = shared_inputs(adapter, qlayers, list(qlayers))
    qkv = [g for g in groups if roles[g[0]] == "qkv"]
    assert all(len(g) == 3 for g in qkv) and len(qkv) == 6  # one per block of the embedded model
    assert all(len(g) == 1 for g in groups if roles[g[0]] != "qkv")
    ctx = QuantContext(adapter=adapter, run=run, qlayers=qlayers, roles=roles, layer_inputs=Lazy(dict, "unused"))
    Rotate(RotateOptions()).apply(ctx)
    b = "transformer_blocks.0.attn1"
    rots = {n: qlayers[f"{b}.{n}"].input_transform for n in ("to_q", "to_k", "to_v")}
    assert rots["to_q"] is rots["to_k"] is rots["to_v"]
    assert qlayers[f"{b}.to_out.0"].input_transform is None  # proj: per-head rotation, no online cost
    fc1 = qlayers["transformer_blocks.0.ff.net.0.proj"].input_transform
    fc1_next = qlayers["transformer_blocks.1.ff.net.0.proj"].input_transform
    assert not torch.equal(fc1.matrix(), fc1_next.matrix())  # signs seeded per layer


def _xl_block(dtype=torch.float32):
    """One DiT-XL/2 transformer block (hidden 1152, 16 heads of 72, MLP 4608) with random weights."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(1152, 16, 72, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
                                  activation_fn="gelu-approximate").to(dtype).eval()
    for p in block.parameters():  # adaLN-Zero starts at zero: give every weight a value
        nn.init.normal_(p, std=0.02)
    return block


def _wrap_block(block):
    names = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear"]
    wrapped = {}
    for n in names:
        q = QuantLinear(block.get_submodule(n), name=n)
        block.set_submodule(n, q)
        wrapped[n] = q
    return wrapped


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_rotated_dit_xl_block_is_exact(dtype, tol):
    block = _xl_block(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 1152, generator=g).to(dtype)
    t, y = torch.tensor([10, 700]), torch.tensor([3, 999])
    with torch.no_grad():
        ref = block(x, timestep=t, class_labels=y)
        w = _wrap_block(block)
        qkv = Rotation(1152, seed=1).to(dtype)
        assert qkv.kind == "hadamard"
        for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
            rotate_input(w[n], qkv, n)
        rotate_input(w["ff.net.0.proj"], Rotation(1152, seed=2).to(dtype))
        rotate_input(w["ff.net.2"], Rotation(4608, seed=3).to(dtype))
        rotate_input(w["norm1.linear"], Rotation(1152, seed=4).to(dtype))
        rotate_heads(block.attn1, Rotation(72, seed=5).to(dtype), "attn1")
        out = block(x, timestep=t, class_labels=y)
    assert rel_max_err(out, ref) < tol


def test_layer_statistics_see_the_rotated_input():
    lin = nn.Linear(12, 5)
    q = QuantLinear(lin, name="l")
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    rot = Rotation(12, seed=3)
    rotate_input(q, rot, "l")
    with LayerStats({"l": q}) as stats:
        stats.new_batch()
        q(x)
    r = rot.matrix(torch.float32)
    xr = x @ r
    torch.testing.assert_close(stats.hessian("l"), 2 * xr.t() @ xr / len(x), rtol=1e-5, atol=1e-5)


def test_rotation_refuses_fitted_quantizers_and_folds_refuse_rotated_layers():
    q = QuantLinear(nn.Linear(8, 4), build_quantizer(QuantizerConfig("fp4_e2m1", "per_channel"), "weight"), name="l")
    q.refresh()  # the weight grid is fitted
    with pytest.raises(FoldError, match="before the scale folding|fitted"):
        rotate_input(q, Rotation(8), "l")
    plain = nn.Linear(8, 4)
    with pytest.raises(FoldError, match="plain Linear"):
        rotate_input(plain, Rotation(8), "l")
    adapter = random_dit()
    block = adapter.denoiser.transformer_blocks[0]
    for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
        block.set_submodule(n, QuantLinear(block.get_submodule(n), name=n))
    rot = Rotation(block.attn1.to_q.in_features)
    for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
        rotate_input(block.get_submodule(n), rot, n)
    with pytest.raises(FoldError, match="rotates its input online"):
        fold_input_scale(adapter, 0, "attn", torch.ones(rot.n) * 2)


def test_rotate_after_a_fitting_step_is_a_config_error(compose):
    with pytest.raises(ConfigError, match="rotate comes after rtn"):
        _cfg(compose, "method.steps=[{name: rtn}, {name: rotate}]")
    ok = _cfg(compose, "method.steps=[{name: rotate}, {name: rtn}]")
    assert [s["name"] for s in ok.method.steps] == ["rotate", "rtn"]
    with pytest.raises(ConfigError, match="fallback"):
        _cfg(compose, "method.steps=[{name: rotate, fallback: maybe}, {name: rtn}]")
    with pytest.raises(ConfigError, match="unknown role"):
        _cfg(compose, "method.steps=[{name: rotate, roles: [qkvx]}, {name: rtn}]")


def _fp_wrapped(adapter, roles=("qkv", "proj", "fc1", "fc2", "adaln")):
    """The layers of `roles` as QuantLinears without quantizers (the FP model), and a plan stand-in
    with what Rotate.check_plan reads (each quantized layer's role)."""
    qlayers, role_of = {}, {}
    for info in adapter.layers():
        if info.role in roles:
            qlayers[info.name] = QuantLinear(adapter.denoiser.get_submodule(info.name), name=info.name)
            adapter.denoiser.set_submodule(info.name, qlayers[info.name])
            role_of[info.name] = info.role

    class _Plan:
        def quantized(self):
            return {n: type("LP", (), {"role": r})() for n, r in role_of.items()}

    return qlayers, role_of, _Plan()


def test_dit_xl_widths_have_hadamard_rotations_end_to_end():
    """A one-block DiT-XL/2 (random weights): every width (1152, 4608, heads of 72) has a Hadamard
    construction, so fallback=error passes check_plan, and the rotated model is the same function."""
    adapter = random_dit(dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                              num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([5, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        ref = adapter.denoise(x, t, y)
    qlayers, roles, plan = _fp_wrapped(adapter)
    step = Rotate(RotateOptions(fallback="error"))
    step.check_plan(None, adapter, plan)
    ctx = QuantContext(adapter=adapter, run=None, qlayers=qlayers, roles=roles, layer_inputs=Lazy(dict, "unused"))
    step.apply(ctx)
    d = ctx.diagnostics["rotate"]
    assert d["kinds"] == {"hadamard": 5} and d["online_inputs"] == {"qkv": 1, "fc1": 1, "fc2": 1, "adaln": 1}
    assert d["rotations"]["input 1152"].startswith("hadamard 36x32")
    assert d["rotations"]["input 4608"].startswith("hadamard 36x128")
    assert d["rotations"]["heads 72"].startswith("hadamard 36x2")
    with torch.no_grad():
        assert rel_max_err(adapter.denoise(x, t, y), ref) < 1e-5


def test_width_without_hadamard_construction_falls_back_or_errors_before_sampling(caplog):
    # heads of 6 channels: no Hadamard matrix of order 6 exists
    adapter = random_dit(dict(num_attention_heads=4, attention_head_dim=6, in_channels=1, out_channels=1,
                              num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10))
    _, _, plan = _fp_wrapped(adapter, roles=("qkv", "proj"))
    with pytest.raises(RotationError, match=r"6 \(input of transformer_blocks.0.attn1 \(heads\)\)"):
        Rotate(RotateOptions(roles=[], fallback="error")).check_plan(None, adapter, plan)
    x = torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([5, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        ref = adapter.denoise(x, t, y)
        caplog.set_level("WARNING")
        rotate_heads(adapter.denoiser.transformer_blocks[0].attn1, Rotation(6, seed=0), "attn1")
        assert "random orthogonal" in caplog.text
        assert rel_max_err(adapter.denoise(x, t, y), ref) < 1e-5


def test_hqdit_rtn_pipeline_records_rotated_inputs_under_their_own_key(compose, tmp_path):
    common = [f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results", "bits=w4a4_fp4"]
    plain = run_pipeline(compose, common + ["method=hqdit_rtn", "method.steps=[{name: format_select}, {name: rtn}]"],
                         tmp_path / "a")
    rotated = run_pipeline(compose, common + ["method=hqdit_rtn"], tmp_path / "b")
    assert rotated["diagnostics"]["rotate"]["online_layers"] > 0
    import json

    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "layer_inputs").glob("*.json")]
    # one entry of the plain model and one keyed by the rotation (the same calibration otherwise)
    assert sorted("transforms" in m["spec"] for m in manifests) == [False, True]
    keyed = next(m["spec"] for m in manifests if "transforms" in m["spec"])
    assert keyed["transforms"][0]["step"] == "rotate"
    assert plain["metrics"]["psnr"] > 0 and rotated["metrics"]["psnr"] > 0
