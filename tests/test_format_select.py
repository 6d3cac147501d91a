"""HQ-DiT's format selection step (ditq.methods.format_select): per layer and side the (ExMy split,
clip ratio) with the least calibration error, recorded in the plan, refused after fitting steps."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from ditq.config import ConfigError, validate_config
from ditq.methods.base import QuantContext
from ditq.methods.format_select import FormatSelect, WeightError, act_error, auto_formats
from ditq.methods.options import FormatSelectOptions
from ditq.methods.plan import LayerPlan, QuantPlan
from ditq.methods.registry import parse_step
from ditq.quant.modules import QuantLinear
from ditq.quant.quantizer import build_quantizer
from ditq.quant.spec import QuantizerConfig
from tests.conftest import SHRINK
from tests.helpers import run_pipeline

FP4 = ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"]
_SHARED: dict = {}  # calibration records and FP layer inputs of the embedded model (read only)


def _run(compose, *overrides):
    return validate_config(compose(SHRINK + ["method=rtn", "bits=w4a4_fp4", *overrides]))


def _setup(compose, *overrides, output_dir=None):
    """The embedded model wrapped for rtn at W4A4 FP4, its plan and a QuantContext (layer inputs shared
    between tests: they are the FP model's and no step here changes them)."""
    from ditq.calibration import collect_layer_inputs, collect_trajectory_inputs
    from ditq.methods.plan import plan_for_run
    from ditq.methods.wrap import full_precision, wrap_layers
    from ditq.models import load_adapter
    from ditq.sampling import Sampler

    run = _run(compose, *overrides)
    adapter = load_adapter(run.model)
    plan = plan_for_run(run, adapter)
    qlayers, roles = wrap_layers(adapter, run, plan)
    key = tuple(sorted(qlayers))
    if key not in _SHARED:
        sampler = Sampler(adapter, run.sampler, clip_sample=run.model.clip_sample)
        with full_precision(qlayers):
            calib = collect_trajectory_inputs(sampler, run.calib, adapter.num_classes, progress=False)
            _SHARED[key] = collect_layer_inputs(adapter, calib, list(qlayers), 512, include_uncond=True,
                                                progress=False)
    inputs = _SHARED[key]
    ctx = QuantContext(adapter=adapter, run=run, qlayers=qlayers, roles=roles, layer_inputs=lambda: inputs,
                       progress=False, plan=plan, output_dir=None if output_dir is None else str(output_dir))
    return run, adapter, plan, ctx


def _weight_mse(cfg: QuantizerConfig, w: torch.Tensor) -> float:
    q = build_quantizer(cfg, "weight")
    q.fit(w)
    return float((q(w) - w).pow(2).mean())


def _replace(cfg: QuantizerConfig, **kw) -> QuantizerConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ----------------------------------------------------------------------------- options and candidates
def test_auto_formats():
    assert auto_formats("fp4_e2m1") == ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"]
    assert auto_formats("fp4_e3m0")[0] == "fp4_e3m0" and sorted(auto_formats("fp4_e3m0")) == sorted(FP4)
    assert auto_formats("fp6_e3m2") == ["fp6_e3m2", "fp6_e1m4", "fp6_e2m3", "fp6_e4m1", "fp6_e5m0"]
    assert auto_formats("fp8_e4m3") == ["fp8_e4m3"] + [f"fp8_e{e}m{7 - e}" for e in (1, 2, 3, 5, 6, 7)]
    assert auto_formats("ocp_e2m1") == ["ocp_e2m1", "fp4_e1m2", "fp4_e3m0"]  # fp4_e2m1 is the same grid
    assert auto_formats("ocp_e4m3")[:2] == ["ocp_e4m3", "fp8_e1m6"] and "fp8_e4m3" in auto_formats("ocp_e4m3")
    assert len(auto_formats("fp16_e5m10")) == 7  # at most 7 exponent bits are emulated exactly
    assert auto_formats("ufp4_e3m1") == ["ufp4_e3m1", "ufp4_e1m3", "ufp4_e2m2", "ufp4_e4m0"]
    assert auto_formats("int4") == ["int4"] and auto_formats("mxfp4") == [] and auto_formats("nvfp4") == []


@pytest.mark.parametrize("spec,match", [
    ({"formats": ["fp4_e2m1", "fp5_e2m2"]}, r"mixes bit widths \(4 bits: fp4_e2m1; 5 bits: fp5_e2m2\)"),
    ({"formats": ["auto", "fp4_e2m1"]}, "cannot be combined"),
    ({"formats": []}, "formats is empty"),
    ({"formats": ["mxfp4"]}, "block format"),
    ({"formats": ["fp4_e9m9"]}, "bad format"),
    ({"clip_ratios": [1.0, 0.0]}, r"clip_ratios: 0.0 must lie in \(0, 1\]"),
    ({"clip_ratios": [1.2]}, r"must lie in \(0, 1\]"),
    ({"clip_ratios": []}, "clip_ratios is empty"),
    ({"sides": ["bias"]}, "unknown side 'bias'"),
    ({"weight_error": "l1"}, "weight_error='l1'"),
    ({"max_rows": 0}, "max_rows=0"),
])
def test_options_are_checked(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_step({"name": "format_select", **spec})


def test_options_defaults_and_config_validation(compose):
    _, o = parse_step({"name": "format_select"})
    assert o.formats == ["auto"] and o.sides == ["weight", "act"] and o.weight_error == "mse" and o.max_rows == 4096
    assert o.clip_ratios == [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
    with pytest.raises(ConfigError, match="method.steps.*format_select.*mixes bit widths"):
        _run(compose, "method.steps=[{name:format_select,formats:[fp4_e2m1,fp5_e2m2]},{name:rtn}]")


# ----------------------------------------------------------------------------- errors of candidates
def test_weight_output_error_both_ways_agree():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 16, generator=g)
    q = build_quantizer(QuantizerConfig(format="fp4_e2m1", granularity="per_channel"), "weight")
    for n in (8, 200):  # fewer rows than the width (|| X dW^T ||) and more (tr(dW H dW^T))
        x = torch.randn(n, 16, generator=g)
        got = WeightError(w, "output", x)(q)
        dw = q(w) - w
        assert math.isclose(got, float((x @ dw.t()).pow(2).sum()) / (n * 12), rel_tol=1e-4)
    assert math.isclose(WeightError(w, "mse")(q), float((q(w) - w).pow(2).mean()), rel_tol=1e-6)


def test_act_error_of_dynamic_per_tensor_scores_rows_as_one_sample():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(64, 8, generator=g)
    rec = {"rows": rows, "min": rows.amin(0), "max": rows.amax(0)}
    q = build_quantizer(QuantizerConfig(format="fp4_e2m1", dynamic=True), "act")
    assert act_error(q, rec, rows) == float((q(rows[None]) - rows[None]).pow(2).mean())


# ----------------------------------------------------------------------------- synthetic layers
def _synthetic_ctx(weights: dict[str, torch.Tensor], fmt: str = "fp4_e2m1"):
    cfg = QuantizerConfig(format=fmt, granularity="per_tensor")
    layers, qlayers = {}, {}
    for name, w in weights.items():
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        layers[name] = LayerPlan("fc1", tuple(w.shape), cfg, None)
        qlayers[name] = QuantLinear(lin, build_quantizer(cfg, "weight"), None, name=name)
    plan = QuantPlan(layers, model="synthetic", created_by="test")
    return QuantContext(adapter=None, run=None, qlayers=qlayers, roles={n: "fc1" for n in weights},
                        layer_inputs=lambda: {}, progress=False, plan=plan)


def test_gaussian_and_outlier_weights_pick_different_splits():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(64, 64, generator=g)
    heavy = torch.randn(64, 64, generator=g) * 0.05
    heavy.view(-1)[:: 211] = torch.randn(20, generator=g).sign() * torch.linspace(1.0, 4.0, 20)  # a few large weights
    ctx = _synthetic_ctx({"gauss": gauss, "heavy": heavy})
    base = ctx.plan.layers["gauss"].weight
    best = {}
    for name, w in (("gauss", gauss), ("heavy", heavy)):  # the splits' errors, computed here
        errors = {f: _weight_mse(_replace(base, format=f), w) for f in FP4}
        best[name] = min(errors, key=errors.get)
    assert best["gauss"] != best["heavy"], best  # precondition: the data separates the splits

    FormatSelect(FormatSelectOptions(sides=["weight"], clip_ratios=[1.0])).apply(ctx)
    for name in best:
        assert ctx.plan.layers[name].weight.format == best[name]
        assert ctx.qlayers[name].weight_quantizer.cfg.format == best[name]
        assert ctx.qlayers[name].weight_quantizer.frozen_by is None  # rebuilt: later steps fit it
        assert ctx.qlayers[name].weight_quantizer.name == f"{name}.weight_quantizer"
    print("picked", best)


def test_qkv_share_one_act_choice_from_the_first():
    """q, k and v read one tensor; here k's record is made different so that a choice of its own would
    differ: all three must still take the one computed from q's record."""
    g = torch.Generator().manual_seed(5)
    gauss = torch.randn(400, 16, generator=g)
    heavy = torch.randn(400, 16, generator=g) * 0.05
    heavy[::37, ::5] = 3.0
    recs = {n: {"rows": r, "min": r.amin(0), "max": r.amax(0)} for n, r in
            (("b.attn1.to_q", gauss), ("b.attn1.to_k", heavy), ("b.attn1.to_v", gauss), ("b.ff", heavy))}
    act = QuantizerConfig(format="fp4_e2m1")
    layers, qlayers = {}, {}
    for name in recs:
        role = "fc1" if name == "b.ff" else "qkv"
        layers[name] = LayerPlan(role, (16, 16), None, act)
        qlayers[name] = QuantLinear(nn.Linear(16, 16), None, build_quantizer(act, "act"), name=name)
    ctx = QuantContext(adapter=None, run=None, qlayers=qlayers, roles={n: lp.role for n, lp in layers.items()},
                       layer_inputs=lambda: recs, progress=False, plan=QuantPlan(layers, created_by="test"))
    ratios = FormatSelectOptions().clip_ratios

    def best(rec):
        errors = {(f, r): act_error(build_quantizer(_replace(act, format=f, clip_ratio=r), "act"), rec, rec["rows"])
                  for f in FP4 for r in ratios}
        return min(errors, key=errors.get)

    own_q, own_k = best(recs["b.attn1.to_q"]), best(recs["b.attn1.to_k"])
    assert own_q != own_k  # precondition: k alone would choose otherwise
    FormatSelect(FormatSelectOptions(sides=["act"])).apply(ctx)
    for name in ("b.attn1.to_q", "b.attn1.to_k", "b.attn1.to_v"):
        cfg = ctx.plan.layers[name].act
        assert (cfg.format, cfg.clip_ratio) == own_q, name
        assert ctx.qlayers[name].act_quantizer.cfg == cfg
    ff = ctx.plan.layers["b.ff"].act  # not a qkv layer: its own choice
    assert (ff.format, ff.clip_ratio) == best(recs["b.ff"])


def test_int_side_selects_clipping_only(caplog):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 32, generator=g)
    w[0, 0] = 25.0  # one outlier: clipping it lowers the MSE
    ctx = _synthetic_ctx({"l": w}, fmt="int4")
    with caplog.at_level("INFO", logger="ditq.methods.format_select"):
        FormatSelect(FormatSelectOptions(sides=["weight"])).apply(ctx)
    cfg = ctx.plan.layers["l"].weight
    assert cfg.format == "int4" and cfg.clip_ratio < 1.0
    errors = {r: _weight_mse(_replace(cfg, clip_ratio=r), w) for r in FormatSelectOptions().clip_ratios}
    assert cfg.clip_ratio == min(errors, key=errors.get)
    assert "INT format: clipping only: weight int4" in caplog.text


def test_quantizers_a_fitting_step_worked_on_are_refused():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 16, generator=g)
    ctx = _synthetic_ctx({"l": w})
    ctx.qlayers["l"].refresh()  # a weight grid fitted at first use (apply_plan does this): replaced freely
    FormatSelect(FormatSelectOptions(sides=["weight"], clip_ratios=[1.0, 0.8])).apply(ctx)
    ctx = _synthetic_ctx({"l": w})
    ctx.qlayers["l"].set_weight_source(w * 0.9)  # rounded values of an algorithm (GPTQ)
    with pytest.raises(ValueError, match=r"l weight \(rounded values from an algorithm\).*must come before"):
        FormatSelect(FormatSelectOptions(sides=["weight"])).apply(ctx)
    ctx = _synthetic_ctx({"l": w})
    ctx.qlayers["l"].refresh()
    ctx.qlayers["l"].weight_quantizer.freeze("gptq")
    with pytest.raises(ValueError, match=r"l weight \(frozen by gptq\)"):
        FormatSelect(FormatSelectOptions(sides=["weight"])).apply(ctx)
    assert ctx.plan.layers["l"].weight.clip_ratio == 1.0  # unchanged


def test_ties_keep_the_first_candidate():
    w = torch.tensor([[0.0, 1.0, -1.0, 0.0]] * 4)  # every split rounds these exactly at ratio 1.0: a tie
    ctx = _synthetic_ctx({"l": w})
    FormatSelect(FormatSelectOptions(sides=["weight"], clip_ratios=[1.0, 0.5])).apply(ctx)
    assert (ctx.plan.layers["l"].weight.format, ctx.plan.layers["l"].weight.clip_ratio) == ("fp4_e2m1", 1.0)


# ----------------------------------------------------------------------------- the embedded model
def test_embedded_choices_never_worse_and_recorded(compose, tmp_path):
    from ditq.methods.rtn import RTN

    run, adapter, plan0, ctx = _setup(compose, output_dir=tmp_path)
    inputs = ctx.layer_inputs()
    FormatSelect(FormatSelectOptions()).apply(ctx)
    plan = ctx.plan
    improved = 0
    for name, q in ctx.qlayers.items():
        w = q.weight.detach()
        own_w = _replace(plan0.layers[name].weight, format="fp4_e2m1", clip_ratio=1.0)
        chosen_w = plan.layers[name].weight
        assert q.weight_quantizer.cfg == chosen_w
        e_own, e_chosen = _weight_mse(own_w, w), _weight_mse(chosen_w, w)
        assert e_chosen <= e_own, (name, chosen_w.format, chosen_w.clip_ratio)
        rec = inputs[name]
        own_a = _replace(plan0.layers[name].act, format="fp4_e2m1", clip_ratio=1.0)
        chosen_a = plan.layers[name].act
        assert q.act_quantizer.cfg == chosen_a and not q.act_quantizer.is_fitted  # static: rtn fits it
        a_own = act_error(build_quantizer(own_a, "act"), rec, rec["rows"])
        a_chosen = act_error(build_quantizer(chosen_a, "act"), rec, rec["rows"])
        assert a_chosen <= a_own, (name, chosen_a.format, chosen_a.clip_ratio)
        improved += (e_chosen < e_own) + (a_chosen < a_own)
    assert improved > 0  # at W4A4 some layer gains from another split or clipping

    # q, k and v read one tensor: one act choice per attention
    for k in range(len(adapter.blocks())):
        acts = [plan.layers[f"transformer_blocks.{k}.attn1.to_{s}"].act for s in "qkv"]
        assert acts[0] == acts[1] == acts[2]

    # the CSV: one row per layer and side, chosen error <= own error
    rows = list(csv.DictReader(open(tmp_path / "format_select.csv")))
    assert len(rows) == 2 * len(ctx.qlayers)
    assert all(float(r["error"]) <= float(r["own_error"]) for r in rows)
    assert all((r["format"], float(r["clip_ratio"])) == (getattr(plan.layers[r["layer"]], r["side"]).format,
                                                          getattr(plan.layers[r["layer"]], r["side"]).clip_ratio)
               for r in rows)
    info = ctx.diagnostics["format_select"]
    assert info["seconds"] > 0 and set(info["roles"]) == set(ctx.roles.values())
    qkv = info["roles"]["qkv"]["weight"]
    assert sum(qkv["formats"].values()) == qkv["layers"] == 3 * len(adapter.blocks())
    assert qkv["ratio_min"] <= qkv["ratio_mean"] <= qkv["ratio_max"]

    # the plan round-trips, and the later steps fit the chosen quantizers
    again = QuantPlan.load(plan.save(tmp_path / "plan.yaml"))  # expanded: loads on its own
    assert again == plan
    RTN(None).apply(ctx)
    assert all(q.weight_quantizer.is_fitted and q.act_quantizer.is_fitted for q in ctx.qlayers.values())


def test_wrong_width_formats_error_at_check_plan(compose):
    run, adapter, plan, _ = _setup(compose)
    step = FormatSelect(FormatSelectOptions(formats=["fp5_e2m2", "fp5_e3m1"]))
    with pytest.raises(ValueError, match=r"format_select: fp5_e2m2 has 5 bits but the weight format of layer "
                                         r"\S+ \(\w+\) has 4 \(fp4_e2m1\); list formats of 4 bits"):
        step.check_plan(run, adapter, plan)
    FormatSelect(FormatSelectOptions(formats=["fp4_e3m0", "fp4_e2m1"])).check_plan(run, adapter, plan)
    # w4a8: an fp4 list cannot serve the fp8 activations
    from ditq.methods.plan import plan_for_run
    from ditq.models import load_adapter

    run8 = _run(compose, "bits=w4a8_fp4")
    adapter8 = load_adapter(run8.model)
    plan8 = plan_for_run(run8, adapter8)
    with pytest.raises(ValueError, match=r"fp4_e2m1 has 4 bits but the act format .* has 8 \(fp8_e4m3\)"):
        FormatSelect(FormatSelectOptions(formats=["fp4_e2m1"])).check_plan(run8, adapter8, plan8)
    FormatSelect(FormatSelectOptions(formats=["fp4_e2m1"], sides=["weight"])).check_plan(run8, adapter8, plan8)


def test_output_error_refuses_conv_layers(compose):
    from ditq.methods.plan import plan_for_run
    from ditq.models import load_adapter

    run = _run(compose, "method.layers=[qkv,embed]")
    adapter = load_adapter(run.model)
    with pytest.raises(ValueError, match="weight_error=output .* conv layers .*pos_embed.proj"):
        FormatSelect(FormatSelectOptions(weight_error="output")).check_plan(run, adapter, plan_for_run(run, adapter))


def test_step_order_and_fitted_quantizers_refused(compose):
    from ditq.methods.rtn import RTN

    run = _run(compose, "method.steps=[{name:rtn},{name:format_select}]")
    with pytest.raises(ValueError, match="format_select must come before rtn"):
        FormatSelect(FormatSelectOptions()).check_plan(run, None, None)
    _, _, plan, ctx = _setup(compose)
    RTN(None).apply(ctx)
    with pytest.raises(ValueError,
                       match=r"were already fitted: .*act \(ranges fitted\).*format_select must come before rtn/gptq"):
        FormatSelect(FormatSelectOptions()).apply(ctx)
    assert ctx.plan is plan  # nothing changed


def test_end_to_end_format_select_then_rtn(compose, paths, tmp_path):
    import yaml

    row = run_pipeline(compose, paths + ["method=rtn", "bits=w4a4_fp4",
                                         "method.steps=[{name:format_select},{name:rtn}]"], tmp_path / "run")
    assert row["metrics"] and all(math.isfinite(v) for v in row["metrics"].values())
    info = row["diagnostics"]["format_select"]
    assert info["changed_layers"] > 0 and info["seconds"] > 0
    saved = yaml.safe_load(open(tmp_path / "run" / "plan.yaml"))
    chosen = {(e["weight"]["format"], e["weight"]["clip_ratio"]) for e in saved["layers"].values() if e["weight"]}
    assert chosen != {("fp4_e2m1", 1.0)}  # the plan records the choices
    assert (tmp_path / "run" / "format_select.csv").is_file()
    print("end to end:", {r: s for r, s in info["roles"].items()}, info["seconds"], "s")
