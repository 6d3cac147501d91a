"""QuantizerConfig.clip_ratio: the range rule's range times the ratio before the scale (static and
dynamic, fit and compute_params), validated, shown by describe(), kept by plan files."""
from __future__ import annotations

import math

import pytest
import torch

from ditq.config import ConfigError, validate_config
from ditq.methods.plan import LayerPlan, PlanSpec, QuantPlan
from ditq.quant.affine import scale_from_range
from ditq.quant.quantizer import QParams, build_quantizer
from ditq.quant.spec import FormatError, QuantizerConfig
from tests.conftest import SHRINK


def _heavy(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x.view(-1)[:: 97] *= 12.0  # outliers: clipping matters
    return x


def _q(role, **kw):
    return build_quantizer(QuantizerConfig(**kw), role)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "int4", "fp6_e3m2"])
@pytest.mark.parametrize("ratio", [0.5, 0.85])
def test_dynamic_per_token_clip_equals_shrunk_range(fmt, ratio):
    x = _heavy((3, 7, 64))
    clipped = _q("act", format=fmt, granularity="per_token", dynamic=True, clip_ratio=ratio)
    plain = _q("act", format=fmt, granularity="per_token", dynamic=True)
    absmax = x.abs().amax(-1, keepdim=True)
    scale, _ = scale_from_range(plain.format, None, absmax * ratio, plain.cfg.eps)
    want = plain.quantize_with(x, QParams(scale))
    assert torch.equal(clipped(x), want)
    if ratio == 0.5:  # halving is exact in binary: the scale is the unclipped scale halved
        assert torch.equal(clipped.compute_params(x).scale, plain.compute_params(x).scale * 0.5)
    # values beyond the clipped range saturate at the grid's end
    top = (scale * plain.format.max_value).expand_as(x)
    assert torch.equal(clipped(x).abs().amax(-1, keepdim=True), top[..., :1])
    assert not torch.equal(clipped(x), plain(x))


@pytest.mark.parametrize("fmt,symmetric", [("fp4_e2m1", True), ("int4", False), ("ufp4_e3m1", False)])
def test_static_per_channel_weight_clip_equals_shrunk_range(fmt, symmetric):
    w = _heavy((16, 48), seed=1)
    clipped = _q("weight", format=fmt, granularity="per_channel", symmetric=symmetric, clip_ratio=0.5)
    plain = _q("weight", format=fmt, granularity="per_channel", symmetric=symmetric)
    clipped.fit(w)
    if symmetric:
        lo, hi = None, w.abs().amax(1) * 0.5
    else:
        lo, hi = w.amin(1) * 0.5, w.amax(1) * 0.5
    scale, zp = scale_from_range(plain.format, lo, hi, plain.cfg.eps)
    want = QParams(scale.reshape(-1, 1), None if zp is None else zp.reshape(-1, 1))
    assert torch.equal(clipped.scale, want.scale)
    assert (clipped.zero_point is None) == (want.zero_point is None)
    if want.zero_point is not None:
        assert torch.equal(clipped.zero_point, want.zero_point)
    assert torch.equal(clipped(w), plain.quantize_with(w, want))
    # GPTQ's path (compute_params on the weight or on a slice of columns) applies the ratio too
    p = clipped.compute_params(w)
    assert torch.equal(p.scale, clipped.scale)
    plain.fit(w)
    assert torch.equal(clipped.scale, plain.scale * 0.5)  # a halved range halves the scale exactly


@pytest.mark.parametrize("symmetric,fmt", [(True, "fp4_e2m1"), (False, "int4")])
def test_per_group_weight_and_gptq_slices_are_clipped(symmetric, fmt):
    w = _heavy((8, 64), seed=3)
    kw = dict(format=fmt, granularity="per_group", group_size=16, symmetric=symmetric)
    clipped, plain = _q("weight", clip_ratio=0.5, **kw), _q("weight", **kw)
    for cols in (slice(None), slice(16, 48)):  # the whole weight, and a block of columns as GPTQ passes it
        pc, pp = clipped.compute_params(w[:, cols]), plain.compute_params(w[:, cols])
        assert torch.equal(pc.scale, pp.scale * 0.5)
        if not symmetric:
            assert torch.equal(pc.zero_point, pp.zero_point)  # both ends halved: the same zero point


def test_static_act_ranges_and_search_rules_are_clipped():
    x = _heavy((256, 32), seed=2)
    lo, hi = x.amin(0) - 1.0, x.amax(0) + 1.0  # the full data's exact range (wider than the sample)
    for kw in (dict(granularity="per_tensor", symmetric=True),
               dict(granularity="per_channel", symmetric=True),
               dict(granularity="per_tensor", range="percentile", percentile=99.0),
               dict(granularity="per_tensor", range="mse")):
        clipped = _q("act", format="fp4_e2m1", clip_ratio=0.75, **kw)
        plain = _q("act", format="fp4_e2m1", **kw)
        clipped.fit(x, data_range=(lo, hi))
        plain.fit(x, data_range=(lo, hi))
        want = plain.scale * 0.75  # the rule's range (minmax of data_range / percentile / MSE result) x 0.75
        assert torch.allclose(clipped.scale, want, rtol=1e-6, atol=0), kw


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), True])
def test_clip_ratio_out_of_range_is_refused(bad):
    with pytest.raises(FormatError, match=r"clip_ratio=.*must lie in \(0, 1\]"):
        _q("weight", format="int4", clip_ratio=bad)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_block_formats_refuse_clipping(fmt):
    with pytest.raises(FormatError, match=rf"clip_ratio=0.9: {fmt} fixes its scales.*set clip_ratio: 1.0"):
        _q("weight", format=fmt, granularity="per_block", clip_ratio=0.9)
    _q("weight", format=fmt, granularity="per_block", clip_ratio=1.0)  # the default is fine


def test_clip_ratio_in_method_config(compose):
    run = validate_config(compose(SHRINK + ["method=rtn", "bits=w4a4_fp4", "+method.weight.clip_ratio=0.8"]))
    assert run.method.weight.clip_ratio == 0.8
    with pytest.raises(ConfigError, match=r"method.weight.*clip_ratio=1.5.*\(0, 1\]"):
        validate_config(compose(SHRINK + ["method=rtn", "bits=w4a4_fp4", "+method.weight.clip_ratio=1.5"]))
    with pytest.raises(ConfigError, match="clip_ratio.*set clip_ratio: 1.0"):
        validate_config(compose(SHRINK + ["method=rtn", "bits=w4a4_mxfp4", "+method.weight.clip_ratio=0.8"]))


def test_describe_shows_clip_only_when_set():
    assert "clip" not in _q("weight", format="int4").describe()
    assert _q("weight", format="int4", clip_ratio=0.85).describe() == "weight:int4 per_tensor minmax clip 0.85"


def test_plan_yaml_round_trip_keeps_clip_ratio(tmp_path):
    w = QuantizerConfig(format="fp4_e2m1", granularity="per_channel")
    a = QuantizerConfig(format="fp4_e2m1", clip_ratio=0.6)
    plan = QuantPlan({"l0": LayerPlan("fc1", (8, 4), w, a), "l1": LayerPlan("fc2", (4, 8), w, None)},
                     model="m", structure="s", created_by="test")
    plan = plan.with_layer("l1", weight={"format": "fp4_e3m0", "clip_ratio": 0.7})
    assert plan.layers["l1"].weight.clip_ratio == 0.7 and plan.layers["l1"].weight.format == "fp4_e3m0"
    path = plan.save(tmp_path / "plan.yaml")
    assert "clip_ratio: 0.6" in path.read_text()
    again = QuantPlan.load(path)
    assert again == plan
    assert again.layers["l0"].act.clip_ratio == 0.6 and again.layers["l1"].weight.clip_ratio == 0.7
    assert again.layers["l0"].weight.clip_ratio == 1.0
    # a hand-written plan may set it per role; a bad value is an error naming the field
    spec = PlanSpec.parse({"default": {"weight": "int4", "act": None},
                           "roles": {"fc1": {"weight": {"clip_ratio": 0.9}}}})
    assert spec.resolve("x", "fc1", None).weight.clip_ratio == 0.9
    with pytest.raises(ConfigError, match="clip_ratio=2"):
        PlanSpec.parse({"default": {"weight": {"format": "int4", "clip_ratio": 2}, "act": None}}).check()
    assert math.isclose(plan.compact()["groups"][0]["act"]["clip_ratio"], 0.6)
