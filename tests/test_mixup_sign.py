"""MSFP's mixup-sign FP step (ditq.methods.mixup_sign): AAL detection, unsigned FP with a searched zero
point where it beats signed FP, the signed-only ablation, bad input, and end-to-end runs on a tiny
random DiT and a tiny random diffusers U-Net (QuantConv2d / QuantLinear layers)."""
from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditq.config import ConfigError, validate_config
from ditq.methods.base import QuantContext
from ditq.methods.mixup_sign import (MixupSign, is_anomalous, sign_stats, signed_formats, unsigned_formats)
from ditq.methods.options import MixupSignOptions
from ditq.methods.plan import LayerPlan, QuantPlan
from ditq.methods.registry import parse_step
from ditq.quant.modules import QuantLinear
from ditq.quant.quantizer import build_quantizer
from ditq.quant.spec import QuantizerConfig
from tests.conftest import SHRINK

# the step's searches kept small: the tests check the logic, not the defaults' breadth
QUICK = dict(clip_ratios=[1.0, 0.8, 0.6], zero_point_ratios=[1.0, 0.5, 0.0], max_rows=512)
ACT = QuantizerConfig(format="fp4_e2m1", granularity="per_tensor", symmetric=True, dynamic=False)
WEIGHT = QuantizerConfig(format="fp4_e2m1", granularity="per_channel", symmetric=True)
UNET_ARCH = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=8)


def _rec(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"rows": rows, "min": rows.amin(0), "max": rows.amax(0)}


def _silu_rows(n=2000, c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.silu(torch.randn(n, c, generator=g) * 2.0)


def _gauss_rows(n=2000, c=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g)


def _ctx(recs: dict[str, dict], act: QuantizerConfig = ACT, role="fc2", output_dir=None, weight=True):
    """Synthetic linear layers reading the given records (one role), wrapped with the plan's quantizers."""
    layers, qlayers = {}, {}
    g = torch.Generator().manual_seed(7)
    for name, rec in recs.items():
        c = rec["rows"].shape[1]
        lin = nn.Linear(c, 8)
        lin.weight.data = torch.randn(8, c, generator=g) * 0.1
        w = WEIGHT if weight else None
        layers[name] = LayerPlan(role, (8, c), w, act)
        wq = None if w is None else build_quantizer(w, "weight")
        qlayers[name] = QuantLinear(lin, wq, build_quantizer(act, "act"), name=name)
    return QuantContext(adapter=None, run=None, qlayers=qlayers, roles={n: role for n in recs},
                        layer_inputs=lambda: recs, progress=False, plan=QuantPlan(layers, created_by="test"),
                        output_dir=None if output_dir is None else str(output_dir))


def _mse(q, rows):
    return float((q(rows) - rows).pow(2).mean())


# ----------------------------------------------------------------------------- options and candidates
@pytest.mark.parametrize("spec,match", [
    ({"rule": "neg_fraction"}, "rule='neg_fraction'; choose one of neg_ratio, neg_mass, both"),
    ({"threshold": 0.0}, r"threshold=0.0 must lie in \(0, 1\]"),
    ({"mass_threshold": 0.7}, r"mass_threshold=0.7 must lie in \(0, 0.5\]"),
    ({"unsigned_max_neg_ratio": 1.5}, "unsigned_max_neg_ratio=1.5"),
    ({"force_unsigned": True, "allow_unsigned": False}, "force_unsigned=true with allow_unsigned=false"),
    ({"splits": "all"}, "splits='all'; use auto"),
    ({"splits": [2, 0]}, "splits=.* exponent bit counts"),
    ({"splits": [2, 2]}, "lists an exponent width twice"),
    ({"clip_ratios": [1.0, 0.0]}, r"clip_ratios: 0.0 must lie in \(0, 1\]"),
    ({"zero_point_ratios": [1.0, -0.5]}, r"zero_point_ratios: -0.5 must lie in \[0, 1\]"),
    ({"zero_point_ratios": []}, "zero_point_ratios is empty"),
    ({"weight_error": "l1"}, "weight_error='l1'"),
    ({"max_rows": 0}, "max_rows=0"),
])
def test_options_are_checked(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_step({"name": "mixup_sign", **spec})


def test_defaults_and_candidates():
    _, o = parse_step({"name": "mixup_sign"})
    assert (o.rule, o.threshold, o.allow_unsigned, o.force_unsigned) == ("neg_ratio", 0.3, True, False)
    assert o.splits == "auto"
    assert o.zero_point_ratios[0] == 1.0 and o.clip_ratios[0] == 1.0 and o.search_weights
    assert parse_step({"name": "mixup_sign", "splits": [2, 3]})[1].splits == [2, 3]
    assert signed_formats("fp4_e2m1", "auto") == ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"]
    assert unsigned_formats("fp4_e2m1", "auto") == ["ufp4_e2m2", "ufp4_e1m3", "ufp4_e3m1", "ufp4_e4m0"]
    assert unsigned_formats("fp6_e3m2", [2, 3]) == ["ufp6_e3m3", "ufp6_e2m4"]
    assert signed_formats("ufp4_e4m0", "auto")[0] == "fp4_e3m0"  # a ufp plan format: the signed comparison


# ----------------------------------------------------------------------------- detection
def test_detection_silu_gelu_vs_gaussian():
    silu, gauss = sign_stats("a", _rec(_silu_rows())), sign_stats("b", _rec(_gauss_rows()))
    gelu = sign_stats("c", _rec(F.gelu(_gauss_rows() * 2)))
    assert silu.data_min >= -0.2785 and silu.neg_ratio < 0.1 and gelu.neg_ratio < 0.05
    assert gauss.neg_ratio > 0.8 and 0.4 < gauss.neg_mass < 0.6 and 0.4 < gauss.neg_fraction < 0.6
    for rule in ("neg_ratio", "neg_mass", "both"):
        assert is_anomalous(silu, rule, 0.3, 0.25) and is_anomalous(gelu, rule, 0.3, 0.25), rule
        assert not is_anomalous(gauss, rule, 0.3, 0.25), rule
    # a few large negative outliers: small negative mass, but a wide negative range
    rows = _silu_rows()
    rows[::97, 0] = -3.0
    outl = sign_stats("d", _rec(rows))
    assert not is_anomalous(outl, "neg_ratio", 0.3, 0.25) and is_anomalous(outl, "neg_mass", 0.3, 0.25)
    assert not is_anomalous(outl, "both", 0.3, 0.25)


def test_nan_inputs_name_the_layer():
    rows = _silu_rows()
    rows[3, 2] = float("nan")
    ctx = _ctx({"blk.ff": {"rows": rows, "min": torch.zeros(16) - 0.3, "max": torch.ones(16)}})
    with pytest.raises(ValueError, match=r"input of layer blk.ff holds 1 NaN/Inf value\(s\) \(in its 'rows'\)"):
        MixupSign(MixupSignOptions(**QUICK)).apply(ctx)


# ----------------------------------------------------------------------------- the choice
def test_unsigned_beats_signed_on_silu_and_is_pinned(tmp_path):
    from ditq.methods.rtn import RTN

    recs = {"silu": _rec(_silu_rows()), "gauss": _rec(_gauss_rows())}
    ctx = _ctx(recs, output_dir=tmp_path)
    MixupSign(MixupSignOptions(**QUICK)).apply(ctx)
    rows = {r["layer"]: r for r in csv.DictReader(open(tmp_path / "mixup_sign.csv"))}
    s, g = rows["silu"], rows["gauss"]
    assert s["aal"] == "yes" and s["act_format"].startswith("ufp4_")
    assert g["aal"] == "no" and g["act_format"].startswith("fp4_")
    assert float(s["unsigned_error"]) < 0.7 * float(s["signed_error"])  # the point of the method
    assert g["unsigned_format"] == "" and float(g["act_error"]) == float(g["signed_error"])
    # the plan records the choice; the unsigned grid is the searched one, frozen, and rtn keeps it
    cfg = ctx.plan.layers["silu"].act
    assert cfg.format == s["act_format"] and not cfg.symmetric and cfg.clip_ratio == float(s["act_clip_ratio"])
    aq = ctx.qlayers["silu"].act_quantizer
    assert aq.frozen_by == "mixup_sign" and aq.cfg == cfg
    assert float(aq.zero_point) == float(s["zero_point"]) and math.isclose(
        -float(aq.zero_point) * float(aq.scale), float(s["offset"]), rel_tol=1e-5)
    sample = recs["silu"]["rows"][torch.linspace(0, 1999, 512).round().long()]
    assert math.isclose(_mse(aq, sample), float(s["act_error"]), rel_tol=1e-5)
    RTN(None).apply(ctx)
    assert ctx.qlayers["silu"].act_quantizer.frozen_by == "mixup_sign" and ctx.qlayers["gauss"].act_quantizer.is_fitted
    # the best signed candidate, recomputed here, has the recorded error
    sc = dataclasses.replace(ACT, format=s["signed_format"], clip_ratio=float(s["signed_clip_ratio"]))
    q = build_quantizer(sc, "act")
    q.fit(sample, data_range=(recs["silu"]["min"], recs["silu"]["max"]))
    assert math.isclose(_mse(q, sample), float(s["signed_error"]), rel_tol=1e-5)
    info = ctx.diagnostics["mixup_sign"]
    assert info["aal_layers"] == 1 and info["unsigned_layers"] == 1 and info["aal_mse_ratio_mean"] < 0.7
    assert info["roles"]["fc2"]["act_formats"][s["act_format"]] == 1


def test_per_channel_static_unsigned_grid():
    act = dataclasses.replace(ACT, granularity="per_channel")
    recs = {"l": _rec(_silu_rows())}
    ctx = _ctx(recs, act=act)
    MixupSign(MixupSignOptions(**QUICK)).apply(ctx)
    aq = ctx.qlayers["l"].act_quantizer
    assert aq.cfg.format.startswith("ufp") and aq.frozen_by == "mixup_sign" and tuple(aq.zero_point.shape) == (16,)
    rows = recs["l"]["rows"][torch.linspace(0, 1999, 512).round().long()]
    assert _mse(aq, rows) < 0.7 * ctx.diagnostics["mixup_sign"]["aal_mse_signed_mean"]


def test_zero_point_search_picks_a_shrunk_offset_when_it_wins():
    """Most of the negative values sit near 0 and a few reach -0.28: clipping the negative side (a zero
    point ratio < 1) must then win over the data minimum."""
    g = torch.Generator().manual_seed(3)
    rows = torch.rand(3000, 8, generator=g) * 4.0
    rows[::2] = -torch.rand(1500, 8, generator=g) * 0.02
    rows[0, 0] = -0.28
    ctx = _ctx({"l": _rec(rows)})
    MixupSign(MixupSignOptions(clip_ratios=[1.0], zero_point_ratios=[1.0, 0.25, 0.1], max_rows=None)).apply(ctx)
    aq = ctx.qlayers["l"].act_quantizer
    assert aq.cfg.format.startswith("ufp") and -float(aq.zero_point) * float(aq.scale) > -0.28 * 0.5


def test_signed_only_and_force_unsigned():
    recs = {"silu": _rec(_silu_rows())}
    ctx = _ctx(recs)
    MixupSign(MixupSignOptions(allow_unsigned=False, **QUICK)).apply(ctx)
    assert ctx.plan.layers["silu"].act.format.startswith("fp4_") and not ctx.qlayers["silu"].act_quantizer.frozen
    assert ctx.diagnostics["mixup_sign"]["aal_layers"] == 1 and ctx.diagnostics["mixup_sign"]["unsigned_layers"] == 0
    # an AAL where signed wins (mass around 0, a few positive outliers: the unsigned grid, dense at the data
    # minimum, is coarse at 0): signed by default, unsigned with force_unsigned
    rows = (_gauss_rows() * 0.05).clamp(min=-0.25)
    rows[::50, 0] = 1.0
    for force, family in ((False, "fp4_"), (True, "ufp4_")):
        ctx = _ctx({"l": _rec(rows)})
        MixupSign(MixupSignOptions(force_unsigned=force, clip_ratios=[1.0], zero_point_ratios=[1.0])).apply(ctx)
        assert ctx.plan.layers["l"].act.format.startswith(family), (force, ctx.plan.layers["l"].act.format)


def test_constant_activations_fall_back_to_signed(caplog, tmp_path):
    recs = {"const": _rec(torch.full((64, 4), 0.5)), "zero": _rec(torch.zeros(64, 4))}
    ufp = dataclasses.replace(ACT, format="ufp4_e3m1", symmetric=False)
    ctx = _ctx(recs, act=ufp, output_dir=tmp_path)  # even a plan asking for unsigned falls back
    with caplog.at_level("WARNING", logger="ditq.methods.mixup_sign"):
        MixupSign(MixupSignOptions(**QUICK)).apply(ctx)
    assert "layer const (fc2): its calibration input is constant (0.5)" in caplog.text
    for n in recs:
        assert ctx.plan.layers[n].act.format.startswith("fp4_")
    rows = list(csv.DictReader(open(tmp_path / "mixup_sign.csv")))
    assert all(r["neg_ratio"] == "" and r["aal"] == "no" and r["note"].startswith("constant") for r in rows)
    assert ctx.diagnostics["mixup_sign"]["constant_layers"] == ["const", "zero"]


def test_forced_unsigned_on_large_negative_inputs_is_an_error():
    g = torch.Generator().manual_seed(2)
    rows = torch.rand(500, 8, generator=g) * 2.0  # in [0, 2), but for two values:
    rows[0, 0] = 3.0
    rows[1, 0] = -2.4  # neg_ratio 0.8
    ctx = _ctx({"blk.fc2": _rec(rows)})
    with pytest.raises(ValueError, match=r"layer blk.fc2 \(fc2\): neg_ratio=0.800 > unsigned_max_neg_ratio=0.5 .*"
                                         r"set force_unsigned=false"):
        MixupSign(MixupSignOptions(force_unsigned=True, threshold=0.9, **QUICK)).apply(ctx)
    ufp = dataclasses.replace(ACT, format="ufp4_e3m1", symmetric=False)
    ctx = _ctx({"blk.fc2": _rec(rows)}, act=ufp)
    with pytest.raises(ValueError, match=r"neg_ratio=0.800 .*give it a signed FP act format"):
        MixupSign(MixupSignOptions(**QUICK)).apply(ctx)
    assert ctx.plan.layers["blk.fc2"].act.format == "ufp4_e3m1"  # nothing changed


def test_fitted_quantizers_are_refused():
    ctx = _ctx({"l": _rec(_silu_rows())})
    rec = ctx.layer_inputs()["l"]
    ctx.qlayers["l"].act_quantizer.fit(rec["rows"], data_range=(rec["min"], rec["max"]))
    with pytest.raises(ValueError, match=r"l act \(ranges fitted\).*mixup_sign must come before rtn"):
        MixupSign(MixupSignOptions(**QUICK)).apply(ctx)


def test_qkv_share_one_act_choice():
    recs = {"b.attn1.to_q": _rec(_silu_rows()), "b.attn1.to_k": _rec(_gauss_rows()), "b.attn1.to_v": _rec(_silu_rows())}
    ctx = _ctx(recs, role="qkv")
    MixupSign(MixupSignOptions(**QUICK)).apply(ctx)
    acts = [ctx.plan.layers[n].act for n in recs]
    assert acts[0] == acts[1] == acts[2] and acts[0].format.startswith("ufp")  # from to_q's record
    zs = {float(ctx.qlayers[n].act_quantizer.zero_point) for n in recs}
    assert len(zs) == 1


def test_weights_get_their_best_signed_split():
    ctx = _ctx({"l": _rec(_gauss_rows())})
    w = ctx.qlayers["l"].weight.detach()
    MixupSign(MixupSignOptions(**QUICK)).apply(ctx)
    errs = {}
    for f in ("fp4_e2m1", "fp4_e1m2", "fp4_e3m0"):
        q = build_quantizer(dataclasses.replace(WEIGHT, format=f), "weight")
        q.fit(w)
        errs[f] = float((q(w) - w).pow(2).mean())
    assert ctx.plan.layers["l"].weight.format == min(errs, key=errs.get)
    ctx = _ctx({"l": _rec(_gauss_rows())})
    MixupSign(MixupSignOptions(search_weights=False, **QUICK)).apply(ctx)
    assert ctx.plan.layers["l"].weight.format == "fp4_e2m1"


# ----------------------------------------------------------------------------- configs and check_plan
def _run(compose, *overrides):
    return validate_config(compose(SHRINK + ["method=msfp_ptq", "bits=w4a4_fp4", *overrides]))


def test_method_configs_compose(compose):
    for method in ("msfp_ptq", "fp_signed_search"):
        for bits in ("w4a4_fp4", "w6a6_fp6"):
            run = _run(compose, f"method={method}", f"bits={bits}")
            names = [s["name"] for s in run.method.steps]
            assert names == ["mixup_sign", "rtn"] and run.method.act["dynamic"] is False
            assert run.method.act["granularity"] == "per_tensor" and run.method.weight["granularity"] == "per_channel"
            assert {"conv", "qkv", "proj", "fc1", "fc2", "adaln", "embed", "final"} <= set(run.method.layers)
            assert run.method.steps[0].get("allow_unsigned", True) is (method == "msfp_ptq")
    assert _run(compose, "bits=w6a6_fp6").bits.act == "fp6_e3m2"
    with pytest.raises(ConfigError, match="mixup_sign.*force_unsigned=true with allow_unsigned=false"):
        _run(compose, "method=fp_signed_search", "method.steps.0.force_unsigned=true")


def test_check_plan_refuses_int_and_block_bits_and_late_order(compose):
    from ditq.methods.plan import plan_for_run
    from ditq.models import load_adapter

    step = MixupSign(MixupSignOptions())
    adapter = load_adapter(_run(compose).model)
    for bits, fmt in (("w4a4", "int4"), ("w4a4_mxfp4", "mxfp4")):
        run = _run(compose, f"bits={bits}")
        plan = plan_for_run(run, adapter)
        with pytest.raises(ValueError, match=rf"mixup_sign: bits.weight \(bits={bits}\) gives layer \S+ \(\w+\) "
                                             rf"the weight format {fmt}.*use FP formats, e.g. bits=w4a4_fp4"):
            step.check_plan(run, adapter, plan)
        with pytest.raises(ValueError, match=rf"bits.act \(bits={bits}\) gives layer .* act format {fmt}"):
            MixupSign(MixupSignOptions(search_weights=False)).check_plan(run, adapter, plan)
    run = _run(compose, "+bits.overrides={fc2:{act:ufp4_e3m1}}")
    plan = plan_for_run(run, adapter)
    step.check_plan(run, adapter, plan)
    with pytest.raises(ValueError, match=r"allow_unsigned=false but bits.overrides.fc2.act .* ufp4_e3m1"):
        MixupSign(MixupSignOptions(allow_unsigned=False)).check_plan(run, adapter, plan)
    with pytest.raises(ValueError, match=r"splits=\[7\] leaves no signed 4-bit FP format"):
        MixupSign(MixupSignOptions(splits=[7])).check_plan(run, adapter, plan)
    run = _run(compose, "method.steps=[{name:rtn},{name:mixup_sign}]")
    with pytest.raises(ValueError, match="mixup_sign must come before rtn"):
        step.check_plan(run, None, None)


# ----------------------------------------------------------------------------- end to end on tiny models
def _model_ctx(compose, adapter, tmp_path, calib_n=6):
    """`adapter` wrapped by the msfp_ptq W4A4 FP4 plan, its FP layer inputs recorded, a QuantContext."""
    from ditq.calibration import collect_layer_inputs
    from ditq.methods.plan import QuantPlan
    from ditq.methods.wrap import full_precision, wrap_layers

    run = _run(compose)
    plan = QuantPlan.from_run(run, adapter)
    qlayers, roles = wrap_layers(adapter, run, plan)
    g = torch.Generator().manual_seed(0)
    c, s = adapter.latent_shape[0], adapter.latent_shape[-1]
    calib = {"x": torch.randn(calib_n, c, s, s, generator=g), "t": torch.linspace(999, 1, calib_n).long(),
             "y": torch.arange(calib_n) % max(1, adapter.num_classes)}
    with full_precision(qlayers):
        inputs = collect_layer_inputs(adapter, calib, list(qlayers), 256, include_uncond=False, progress=False)
    ctx = QuantContext(adapter=adapter, run=run, qlayers=qlayers, roles=roles, layer_inputs=lambda: inputs,
                       progress=False, plan=plan, output_dir=str(tmp_path))
    MixupSign(MixupSignOptions()).check_plan(run, adapter, plan)
    return ctx, calib, inputs


def _end_to_end(ctx, calib, inputs, tmp_path):
    from ditq.methods.rtn import RTN
    from ditq.methods.wrap import full_precision

    MixupSign(MixupSignOptions(**QUICK)).apply(ctx)
    RTN(None).apply(ctx)
    x, t, y = calib["x"][:2], calib["t"][:2], calib["y"][:2]
    with full_precision(ctx.qlayers):
        ref = ctx.adapter.denoise(x, t, y)
    out = ctx.adapter.denoise(x, t, y)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    rows = {r["layer"]: r for r in csv.DictReader(open(tmp_path / "mixup_sign.csv"))}
    assert set(rows) == set(ctx.qlayers)
    for n, r in rows.items():
        assert r["act_format"] == ctx.plan.layers[n].act.format == ctx.qlayers[n].act_quantizer.cfg.format
        assert float(r["act_error"]) <= float(r["signed_error"]) and r["weight_format"].startswith("fp4_")
        assert (r["aal"] == "yes") == (float(r["neg_ratio"]) < 0.3)
        if r["act_format"].startswith("ufp"):
            assert ctx.qlayers[n].act_quantizer.frozen_by == "mixup_sign" and r["aal"] == "yes"
    return rows, ctx.diagnostics["mixup_sign"]


def test_end_to_end_tiny_random_dit(compose, tmp_path):
    from tests.helpers import random_dit

    adapter = random_dit()
    for k in range(len(adapter.blocks())):  # a conditioning embedding of unit scale, as in a trained DiT
        emb = adapter.denoiser.transformer_blocks[k].norm1.emb
        for lin in (emb.timestep_embedder.linear_1, emb.timestep_embedder.linear_2):
            lin.weight.data *= 20.0
    ctx, calib, inputs = _model_ctx(compose, adapter, tmp_path)
    rows, info = _end_to_end(ctx, calib, inputs, tmp_path)
    # SiLU'd conditioning inputs (adaLN, timestep embedder linear_2, proj_out_1) are anomalous
    adaln = [r for r in rows.values() if r["role"] == "adaln"]
    assert adaln and all(r["aal"] == "yes" for r in adaln)
    assert all(r["aal"] == "no" for r in rows.values() if r["role"] == "qkv")
    assert info["unsigned_layers"] > 0 and info["aal_mse_ratio_mean"] < 1.0
    print("dit:", {k: info[k] for k in ("act_layers", "aal_layers", "unsigned_layers", "aal_mse_ratio_mean")})


def test_end_to_end_tiny_random_unet(compose, tmp_path):
    from omegaconf import OmegaConf

    from ditq.config.schema import ModelConfig
    from ditq.models import load_adapter
    from ditq.quant.modules import QuantConv2d

    adapter = load_adapter(OmegaConf.structured(ModelConfig(name="random_unet", family="unet", weights="random",
                                                            arch=UNET_ARCH, resolution=8, num_classes=1)))
    ctx, calib, inputs = _model_ctx(compose, adapter, tmp_path)
    assert any(isinstance(q, QuantConv2d) for q in ctx.qlayers.values())
    rows, info = _end_to_end(ctx, calib, inputs, tmp_path)
    # GroupNorm + SiLU before every ResNet conv: anomalous, and unsigned wins there
    conv1 = [r for n, r in rows.items() if n.endswith("conv1")]
    assert conv1 and all(r["aal"] == "yes" and r["act_format"].startswith("ufp4_") for r in conv1)
    assert rows["conv_in"]["aal"] == "no"  # the noisy image is symmetric
    assert info["roles"]["conv"]["unsigned"] >= len(conv1)
    print("unet:", {k: info[k] for k in ("act_layers", "aal_layers", "unsigned_layers", "aal_mse_ratio_mean")})


@pytest.mark.slow  # ~60 s on a busy CPU (sampling and scoring); the step-level end-to-end tests above run by default
def test_pipeline_msfp_ptq_on_the_embedded_dit(compose, paths, tmp_path):
    import yaml

    from tests.helpers import run_pipeline

    row = run_pipeline(compose, paths + ["method=msfp_ptq", "bits=w4a4_fp4", "method.layers=[qkv,proj,fc1,fc2,adaln]",
                                         "method.steps.0.clip_ratios=[1.0,0.8]",
                                         "method.steps.0.zero_point_ratios=[1.0,0.5]"], tmp_path / "run")
    assert row["metrics"] and all(math.isfinite(v) for v in row["metrics"].values())
    info = row["diagnostics"]["mixup_sign"]
    assert info["roles"]["fc2"]["unsigned"] == info["roles"]["fc2"]["layers"] > 0  # after GELU
    assert info["roles"]["qkv"]["unsigned"] == 0
    saved = yaml.safe_load(open(tmp_path / "run" / "plan.yaml"))
    assert {e["act"]["format"] for n, e in saved["layers"].items() if n.endswith("ff.net.2")} <= {
        f"ufp4_e{e}m{4 - e}" for e in range(1, 5)}
    assert (tmp_path / "run" / "mixup_sign.csv").is_file()
    print("pipeline:", {k: info[k] for k in ("act_layers", "aal_layers", "unsigned_layers", "aal_mse_ratio_mean")})
