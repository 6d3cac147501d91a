"""Quantizer: granularities, range methods, QParams / quantize_with, STE, step(), bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditq.quant import NonFiniteError, QParams, QuantizerConfig, build_quantizer, round_ste
from ditq.quant.formats import get_format


def Q(fmt="int8", gran="per_tensor", **kw):
    return QuantizerConfig(format=fmt, granularity=gran, **kw)


def qdit_reference(w: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    """Q-DiT's asymmetric group rule (seed-methods.md), one group of columns at a time."""
    out = torch.empty_like(w)
    qmax = 2**bits - 1
    for s in range(0, w.shape[1], gs):
        g = w[:, s : s + gs]
        mx, mn = g.amax(1, keepdim=True), g.amin(1, keepdim=True)
        scale = (mx - mn).clamp(min=1e-5) / qmax
        zp = (-torch.round(mn / scale)).clamp(0, qmax)
        q = torch.clamp(torch.round(g / scale) + zp, 0, qmax)
        out[:, s : s + gs] = (q - zp) * scale
    return out


def sym_reference(x: torch.Tensor, fmt: str, dim=-1) -> torch.Tensor:
    f = get_format(fmt)
    scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-5) / f.max_value
    return f.quantize(x / scale) * scale


@pytest.fixture
def w():
    torch.manual_seed(0)
    return torch.randn(24, 100) * torch.linspace(0.1, 3, 24).view(-1, 1)


# ----------------------------------------------------------------------------- weights
def test_weight_per_tensor_and_per_channel(w):
    qt = build_quantizer(Q("int8"), "weight")
    p = qt.compute_params(w)
    assert p.scale.shape == (1, 1) and p.scale.item() == (w.abs().max() / 127).item()
    assert torch.equal(qt(w), sym_reference(w, "int8", dim=(0, 1)))
    qc = build_quantizer(Q("fp4_e2m1", "per_channel"), "weight")
    assert qc.compute_params(w).scale.shape == (24, 1)
    assert torch.equal(qc(w), sym_reference(w, "fp4_e2m1"))


@pytest.mark.parametrize("gs", [4, 20, 32, 64, 100])
def test_weight_per_group_matches_qdit_rule_including_a_short_last_group(w, gs):
    q = build_quantizer(Q("int4", "per_group", group_size=gs, symmetric=False), "weight")
    p = q.compute_params(w)
    assert p.scale.shape == (24, -(-100 // gs)) and p.group_size == gs
    assert torch.equal(q(w), qdit_reference(w, 4, gs))


def test_group_size_larger_than_the_width_is_one_group_per_row(w):
    """Documented: group_size >= width spans the whole row, i.e. per-channel."""
    big = build_quantizer(Q("int4", "per_group", group_size=256, symmetric=False), "weight")
    assert big.compute_params(w).scale.shape == (24, 1)
    assert torch.equal(big(w), qdit_reference(w, 4, 100))
    per_channel = build_quantizer(Q("int4", "per_channel", symmetric=False), "weight")
    assert torch.equal(big(w), per_channel(w))
    assert big.bits_per_weight(w.shape) == per_channel.bits_per_weight(w.shape)


def test_conv_weight_is_treated_as_out_by_in_kh_kw(w):
    conv_w = w[:, :99].reshape(24, 11, 3, 3)
    q = build_quantizer(Q("int4", "per_group", group_size=32, symmetric=False), "weight")
    out = q(conv_w)
    assert out.shape == conv_w.shape
    assert torch.equal(out.reshape(24, -1), qdit_reference(conv_w.reshape(24, -1), 4, 32))


# ----------------------------------------------------------------------------- activations
def test_static_act_per_tensor_and_per_channel():
    torch.manual_seed(1)
    calib = torch.randn(64, 16) * torch.linspace(0.5, 4, 16)
    qt = build_quantizer(Q("int8"), "act")
    qt.fit(calib)
    assert qt.scale.shape == () and qt.scale.item() == (calib.abs().max() / 127).item()
    qc = build_quantizer(Q("int8", "per_channel"), "act")
    qc.fit(calib.view(4, 16, 16))  # [..., C]: leading dims are flattened into tokens
    assert qc.scale.shape == (16,)
    torch.testing.assert_close(qc.scale, calib.abs().amax(0) / 127, rtol=0, atol=0)
    x = torch.randn(2, 5, 16)
    assert torch.equal(qc(x), get_format("int8").quantize(x / qc.scale) * qc.scale)


@pytest.mark.parametrize("cfg", [
    Q("int8", "per_tensor", dynamic=True),
    Q("fp4_e2m1", "per_tensor", dynamic=True),
    Q("int8", "per_token", dynamic=True, symmetric=False),
    Q("int4", "per_token_group", group_size=24, dynamic=True, symmetric=False),
    Q("mxfp4", "per_block", dynamic=True),
    Q("nvfp4", "per_block", dynamic=True),
])
def test_dynamic_activations_never_mix_samples_of_a_batch(cfg):
    torch.manual_seed(2)
    x = torch.randn(4, 7, 80) * torch.tensor([1.0, 50.0, 0.02, 3.0]).view(4, 1, 1)
    q = build_quantizer(cfg, "act")
    full = q(x)
    for i in range(4):
        assert torch.equal(full[i], q(x[i : i + 1])[0])


def test_dynamic_per_tensor_reduces_per_sample():
    x = torch.randn(3, 5, 8)
    p = build_quantizer(Q("int8", "per_tensor", dynamic=True), "act").compute_params(x)
    assert p.scale.shape == (3, 1, 1)
    assert torch.equal(p.scale.view(3), x.abs().amax(dim=(1, 2)) / 127)


def test_per_token_and_per_token_group():
    torch.manual_seed(3)
    x = torch.randn(2, 6, 100)
    tok = build_quantizer(Q("fp4_e2m1", "per_token", dynamic=True), "act")
    assert torch.equal(tok(x), sym_reference(x, "fp4_e2m1"))
    grp = build_quantizer(Q("int8", "per_token_group", group_size=32, dynamic=True, symmetric=False), "act")
    p = grp.compute_params(x)
    assert p.scale.shape == (2, 6, 4)
    assert torch.equal(grp(x).view(12, 100), qdit_reference(x.view(12, 100), 8, 32))


def test_unsigned_fp_with_zero_point_keeps_zero_exact():
    torch.manual_seed(4)
    x = torch.nn.functional.gelu(torch.randn(8, 64) * 3)  # asymmetric: min about -0.17
    x[0, 0] = 0.0
    q = build_quantizer(Q("ufp4_e3m1", "per_token", dynamic=True, symmetric=False), "act")
    p = q.compute_params(x)
    fmt = get_format("ufp4_e3m1")
    assert bool(torch.isin(p.zero_point, fmt.grid()).all())  # zero point is a grid value
    out = q(x)
    assert out[0, 0].item() == 0.0
    ref = (fmt.quantize(x / p.scale + p.zero_point) - p.zero_point) * p.scale
    assert torch.equal(out, ref)


def test_range_includes_zero_switch():
    x = torch.rand(4, 32) + 1.0  # all positive: Q-DiT's rule clips the top (zp clamps to 0)
    qdit = build_quantizer(Q("int4", "per_channel", symmetric=False), "weight")
    gptq = build_quantizer(Q("int4", "per_channel", symmetric=False, range_includes_zero=True), "weight")
    assert torch.equal(qdit(x), qdit_reference(x, 4, 32))
    assert qdit(x).max() < x.max() - 0.5  # values above max - min saturate
    assert (gptq(x) - x).abs().max() <= gptq.compute_params(x).scale.max() / 2 + 1e-6


def test_static_act_used_before_fit_raises():
    q = build_quantizer(Q("int8"), "act")
    with pytest.raises(RuntimeError, match="call fit"):
        q(torch.randn(2, 4))


def test_bf16_and_fp16_inputs_keep_their_dtype():
    x = torch.randn(4, 64)
    for dtype in (torch.float16, torch.bfloat16):
        q = build_quantizer(Q("fp4_e2m1", "per_token", dynamic=True), "act")
        out = q(x.to(dtype))
        assert out.dtype == dtype
        assert torch.equal(out, q(x.to(dtype).float()).to(dtype))


# ----------------------------------------------------------------------------- range methods
def _outlier_data(seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 20_000, generator=g)
    x[0, :5] = 30.0 * torch.sign(torch.randn(5, generator=g))  # few, large: clipping them pays off at 4 bits
    return x


def _err(a, b):
    return float(((a - b) ** 2).sum())


def test_percentile_is_the_nearest_rank_value_and_clips_outliers():
    x = _outlier_data()
    q = build_quantizer(Q("int4", range="percentile", percentile=99.9), "weight")
    p = q.compute_params(x)
    k = -(-999 * 20_000 // 1000)  # ceil(0.999 * n)
    expected = x.abs().view(-1).kthvalue(k).values / 7
    assert p.scale.item() == expected.item()
    minmax = build_quantizer(Q("int4"), "weight")
    assert p.scale.item() < minmax.compute_params(x).scale.item()
    assert _err(q(x), x) < _err(minmax(x), x)


def test_asymmetric_percentile_takes_both_tails():
    x = torch.arange(1, 1001, dtype=torch.float32).view(1, -1)
    q = build_quantizer(Q("int8", range="percentile", percentile=99.0, symmetric=False), "weight")
    lo_hi = q._row_range(x)
    assert lo_hi[0].item() == 11.0 and lo_hi[1].item() == 990.0


@pytest.mark.parametrize("fmt, sym", [("int4", True), ("int4", False), ("fp4_e2m1", True), ("ufp4_e3m1", False)])
def test_mse_search_clips_outliers_and_never_loses_to_minmax(fmt, sym):
    x = _outlier_data()
    mse = build_quantizer(Q(fmt, symmetric=sym, range="mse", clip_search_points=40, clip_min_ratio=0.05), "weight")
    minmax = build_quantizer(Q(fmt, symmetric=sym), "weight")
    assert mse.compute_params(x).scale.item() < minmax.compute_params(x).scale.item()
    assert _err(mse(x), x) < _err(minmax(x), x)
    y = torch.rand(1, 1000)  # no outliers: still never worse than minmax
    assert _err(mse(y), y) <= _err(minmax(y), y)


def test_mse_search_per_group_with_a_short_group_and_lp_norm(w):
    q = build_quantizer(Q("int3", "per_group", group_size=32, range="mse", clip_norm=2.4), "weight")
    minmax = build_quantizer(Q("int3", "per_group", group_size=32), "weight")
    p, pm = q.compute_params(w), minmax.compute_params(w)
    assert p.scale.shape == pm.scale.shape == (24, 4)
    assert bool((p.scale <= pm.scale).all())
    for s in range(0, 100, 32):  # per group, the Lp error never increases
        a = (q(w) - w)[:, s : s + 32].abs().pow(2.4).sum(1)
        b = (minmax(w) - w)[:, s : s + 32].abs().pow(2.4).sum(1)
        assert bool((a <= b + 1e-6).all())


def test_single_point_search_is_minmax(w):
    q = build_quantizer(Q("int4", "per_channel", range="mse", clip_search_points=1), "weight")
    assert torch.equal(q(w), build_quantizer(Q("int4", "per_channel"), "weight")(w))


def test_static_act_mse_on_calibration_data():
    x = _outlier_data().view(-1, 8)
    q = build_quantizer(Q("int8", range="mse", clip_min_ratio=0.1, clip_search_points=30), "act")
    q.fit(x)
    assert q.scale.item() < x.abs().max().item() / 127


# ----------------------------------------------------------------------------- QParams / quantize_with
@pytest.mark.parametrize("cfg, role", [
    (Q("int4", "per_group", group_size=32, symmetric=False, range="mse"), "weight"),
    (Q("fp4_e2m1", "per_channel"), "weight"),
    (Q("mxfp4", "per_block"), "weight"),
    (Q("nvfp4", "per_block"), "weight"),
    (Q("int8", "per_token_group", group_size=16, dynamic=True), "act"),
    (Q("ufp4_e2m2", "per_token", dynamic=True, symmetric=False), "act"),
])
def test_forward_equals_quantize_with_compute_params(cfg, role, w):
    q = build_quantizer(cfg, role)
    assert torch.equal(q(w), q.quantize_with(w, q.compute_params(w)))


@pytest.mark.parametrize("cfg", [
    Q("int4", "per_group", group_size=32, symmetric=False),
    Q("fp4_e2m1", "per_group", group_size=32),
    Q("ufp4_e3m1", "per_group", group_size=32, symmetric=False),
    Q("mxfp4", "per_block"),
    Q("nvfp4", "per_block"),
    Q("int4", "per_channel"),
])
def test_gptq_style_column_by_column_use(cfg, w):
    """GPTQ: params from a slice of columns (one group, all rows), then single columns quantized."""
    q = build_quantizer(cfg, "weight")
    if cfg.format == "nvfp4":
        q.fit(w)  # the fp32 tensor scale must come from the whole weight, not from a slice
    gs = q.group_size or w.shape[1]
    cols, parts = [], []
    for s in range(0, w.shape[1], gs):
        params = q.compute_params(w[:, s : s + gs])
        assert params.scale.shape == (24, 1)
        parts.append(params)
        for j in range(s, min(s + gs, w.shape[1])):
            cols.append(q.quantize_with(w[:, j : j + 1], params))
    assert torch.equal(torch.cat(cols, dim=1), q(w))
    if q.group_size:
        q.set_params(QParams.cat(parts))
        assert torch.equal(q(w), torch.cat(cols, dim=1))


def test_set_params_pins_the_grid_after_the_weight_changes(w):
    q = build_quantizer(Q("int4", "per_group", group_size=32, symmetric=False), "weight")
    q.fit(w)
    w_hat = q(w)
    assert torch.equal(q(w_hat), w_hat)  # stored params: re-quantizing is exact
    shrunk = w.clone()
    shrunk[:, :32] *= 0.5  # a GPTQ-like update after which the old grid no longer spans the data
    assert torch.equal(q(shrunk), q.quantize_with(shrunk, q.compute_params(w)))  # the stored grid is used
    assert not torch.equal(q(shrunk), build_quantizer(Q("int4", "per_group", group_size=32, symmetric=False), "weight")(shrunk))
    q.reset()
    assert not q.is_fitted
    assert torch.equal(q(shrunk), q.quantize_with(shrunk, q.compute_params(shrunk)))


def test_quantize_with_rejects_group_mismatch(w):
    q = build_quantizer(Q("int4", "per_group", group_size=32), "weight")
    params = q.compute_params(w)
    with pytest.raises(ValueError, match="4 groups of 32 but the tensor's last dim is 64"):
        q.quantize_with(w[:, :64], params)


def test_stored_params_for_another_weight_shape_raise(w):
    q = build_quantizer(Q("int4", "per_channel"), "weight")
    q.fit(w)
    with pytest.raises(ValueError, match="stored parameters are for 24 output channels"):
        q(torch.randn(10, 100))


def test_static_per_channel_act_on_another_width_raises():
    q = build_quantizer(Q("int8", "per_channel"), "act")
    q.fit(torch.randn(32, 16))
    with pytest.raises(ValueError, match="calibrated for 16 channels, the input has 8"):
        q(torch.randn(2, 8))


def test_set_params_checks_zero_point_presence(w):
    sym = build_quantizer(Q("int4", "per_channel"), "weight")
    asym = build_quantizer(Q("int4", "per_channel", symmetric=False), "weight")
    with pytest.raises(ValueError, match="needs parameters with no zero point"):
        sym.set_params(asym.compute_params(w))
    with pytest.raises(ValueError, match="needs parameters with a zero point"):
        asym.set_params(sym.compute_params(w))
    with pytest.raises(ValueError, match="per-group"):
        QParams.cat([sym.compute_params(w)])


def test_state_dict_round_trip(w):
    q = build_quantizer(Q("int4", "per_group", group_size=32, symmetric=False, range="mse"), "weight")
    q.fit(w)
    fresh = build_quantizer(Q("int4", "per_group", group_size=32, symmetric=False, range="mse"), "weight")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.scale, q.scale) and torch.equal(fresh.zero_point, q.zero_point)
    assert torch.equal(fresh(w * 1.1), q(w * 1.1))


def test_config_may_be_a_mapping(w):
    q = build_quantizer({"format": "int4", "granularity": "per_channel"}, "weight")
    assert torch.equal(q(w), build_quantizer(Q("int4", "per_channel"), "weight")(w))
    with pytest.raises(ValueError, match="unknown quantizer config keys"):
        build_quantizer({"format": "int4", "bits": 4}, "weight")


# ----------------------------------------------------------------------------- STE and step
def test_clipped_ste_gradient():
    q = build_quantizer(Q("int4"), "act")
    q.fit(torch.tensor([[-1.0, 1.0]]))  # range [-1, 1]
    x = torch.tensor([[-3.0, -0.5, 0.2, 0.99, 1.5]], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


def test_identity_ste_gradient_and_round_ste():
    q = build_quantizer(Q("int4", ste="identity"), "act")
    q.fit(torch.tensor([[-1.0, 1.0]]))
    x = torch.tensor([[-3.0, 0.2, 1.5]], requires_grad=True)
    (q(x) * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    assert x.grad.tolist() == [[1.0, 2.0, 3.0]]
    y = torch.tensor([0.4, 1.6], requires_grad=True)
    out = round_ste(y)
    out.sum().backward()
    assert out.tolist() == [0.0, 2.0] and y.grad.tolist() == [1.0, 1.0]


def test_ste_with_zero_point_and_groups():
    torch.manual_seed(0)
    cfg = Q("int4", "per_token_group", group_size=4, dynamic=True, symmetric=False, range_includes_zero=True)
    q = build_quantizer(cfg, "act")
    x = torch.randn(3, 10, requires_grad=True)
    out = q(x)
    out.sum().backward()
    assert torch.equal(out, q(x.detach()))
    assert torch.equal(x.grad, torch.ones_like(x))  # dynamic minmax containing 0: nothing saturates
    # Q-DiT's rule on an all-positive group: zp clamps to 0, values above max - min saturate (gradient 0)
    qdit = build_quantizer(Q("int4", "per_token", dynamic=True, symmetric=False), "act")
    y = torch.tensor([[1.0, 1.5, 2.0, 3.0]], requires_grad=True)
    qdit(y).sum().backward()
    assert y.grad.tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_step_by_hand():
    x = torch.tensor([[0.3, 1.2, 2.5, 5.0, 9.0, 11.0, -7.0, 100.0]])
    q = build_quantizer(Q("fp4_e2m1"), "act")
    q.fit(torch.tensor([[12.0]]))  # scale 2: grid 0, 1, 2, 3, 4, 6, 8, 12; u = x / 2
    # u = 0.15, 0.6 (subnormal step 0.5), 1.25 ([1, 2): 0.5), 2.5 ([2, 4): 1), 4.5, 5.5 ([4, 6]: 2), -3.5 (1), 50 (saturates: 2)
    assert q.step(x).tolist() == [[1.0, 1.0, 1.0, 2.0, 4.0, 4.0, 2.0, 4.0]]
    qi = build_quantizer(Q("int4", "per_token_group", group_size=2, dynamic=True, symmetric=False), "act")
    y = torch.tensor([[0.0, 1.5, -3.0, 12.0]])
    assert qi.step(y)[0].tolist() == pytest.approx([0.1, 0.1, 1.0, 1.0], rel=1e-6)
    qm = build_quantizer(Q("mxfp4", "per_block"), "weight")
    z = torch.zeros(1, 32)
    z[0, :3] = torch.tensor([3.0, 0.2, 1.1])  # X = 1/2; u = 6, 0.4, 2.2 have element steps 2, 0.5, 1
    assert qm.step(z)[0, :3].tolist() == [1.0, 0.25, 0.5]


def test_step_bounds_the_error_for_scale_aware_rounding(w):
    q = build_quantizer(Q("fp4_e2m1", "per_group", group_size=32), "weight")
    err = (q(w) - w).abs()
    assert bool((err <= q.step(w) / 2 * (1 + 1e-6)).all())


# ----------------------------------------------------------------------------- non-finite input
def test_fit_on_non_finite_data_raises():
    x = torch.randn(4, 8)
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), float("-inf")
    for cfg, role in [(Q("int8"), "act"), (Q("int4", "per_channel"), "weight"), (Q("nvfp4", "per_block"), "weight")]:
        with pytest.raises(NonFiniteError, match="holds 1 NaN and 2 Inf values"):
            build_quantizer(cfg, role).fit(x)


@pytest.mark.parametrize("cfg", [
    Q("int8", "per_token", dynamic=True),
    Q("int8", "per_tensor", dynamic=True, symmetric=False),
    Q("fp4_e2m1", "per_token_group", group_size=4, dynamic=True),
    Q("mxfp4", "per_block", dynamic=True),
    Q("nvfp4", "per_block", dynamic=True),
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_dynamic_forward_on_non_finite_input_raises(cfg, bad):
    x = torch.randn(2, 3, 32)
    x[1, 2, 5] = bad
    with pytest.raises(NonFiniteError, match="1 of .* ranges contain NaN or Inf"):
        build_quantizer(cfg, "act")(x)


def test_unchecked_dynamic_forward_confines_nan_to_the_row():
    x = torch.randn(3, 16)
    x[1, 4] = float("nan")
    out = build_quantizer(Q("int8", "per_token", dynamic=True, check_finite=False), "act")(x)
    assert bool(torch.isnan(out[1]).all())
    assert bool(torch.isfinite(out[[0, 2]]).all())


def test_static_forward_keeps_nan_and_saturates_inf():
    q = build_quantizer(Q("int8"), "act")
    q.fit(torch.tensor([[-2.0, 2.0]]))
    out = q(torch.tensor([[float("nan"), float("inf"), float("-inf"), 1.0]]))
    assert torch.isnan(out[0, 0]) and out[0, 1].item() == 2.0 and out[0, 2].item() == -2.0


# ----------------------------------------------------------------------------- properties
finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(["int4", "int8", "fp4_e2m1", "fp6_e3m2", "fp8_e4m3", "fp4_e1m2"]),
    sym=st.booleans(),
    vals=st.lists(finite, min_size=8, max_size=8 * 12).filter(lambda v: len(v) % 8 == 0),
)
def test_quantizer_idempotent_with_fixed_params(fmt, sym, vals):
    if not sym and fmt.startswith("fp"):
        fmt = {"fp4_e2m1": "ufp4_e3m1", "fp6_e3m2": "ufp6_e4m2", "fp8_e4m3": "ufp8_e5m3", "fp4_e1m2": "ufp4_e2m2"}[fmt]
    x = torch.tensor(vals).view(-1, 8)
    q = build_quantizer(Q(fmt, "per_channel", symmetric=sym), "weight")
    p = q.compute_params(x)
    once = q.quantize_with(x, p)
    assert torch.equal(q.quantize_with(once, p), once)


@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(["int4", "int8", "fp4_e2m1", "fp4_e3m0", "fp8_e5m2", "mxfp4", "nvfp4", "mxint8"]),
    vals=st.lists(finite, min_size=32, max_size=32 * 4).filter(lambda v: len(v) % 32 == 0),
)
def test_dynamic_error_at_most_half_the_local_step(fmt, vals):
    x = torch.tensor(vals).view(-1, 32)
    gran = "per_block" if fmt[:2] in ("mx", "nv") else "per_token"
    q = build_quantizer(Q(fmt, gran, dynamic=True), "act")
    err = (q(x).double() - x.double()).abs()
    bound = q.step(x).double() / 2 * (1 + 1e-6) + 1e-30
    if fmt.startswith("mx"):
        # The OCP MX scale 2^(floor(log2 amax) - emax) can leave a block's absmax above the element's
        # largest value; such elements saturate (see test_block.py). The bound is for values in range.
        top = q.format.max_value * q.compute_params(x).scale.double()
        in_range = x.double().abs() <= top + bound
        assert in_range.any()
        err, bound = err[in_range], bound[in_range]
    assert bool((err <= bound).all())


@settings(max_examples=30, deadline=None)
@given(vals=st.lists(finite, min_size=2, max_size=64))
def test_quantizer_is_monotone(vals):
    x = torch.tensor(sorted(vals)).view(1, -1)
    for cfg in (Q("int4", "per_channel"), Q("fp4_e2m1", "per_channel"), Q("ufp4_e3m1", "per_channel", symmetric=False)):
        out = build_quantizer(cfg, "weight")(x)
        assert bool((out[0, 1:] >= out[0, :-1]).all())


@pytest.mark.parametrize("cfg", [
    Q("int8", "per_token", dynamic=True),
    Q("int4", "per_token", dynamic=True, symmetric=False),
    Q("fp4_e2m1", "per_token_group", group_size=4, dynamic=True),
    Q("ufp4_e3m1", "per_token", dynamic=True, symmetric=False),
    Q("nvfp4", "per_block", dynamic=True),
])
def test_all_zero_rows_stay_zero(cfg):
    x = torch.randn(3, 32)
    x[1] = 0.0
    out = build_quantizer(cfg, "act")(x)
    assert bool(torch.isfinite(out).all()) and bool((out[1] == 0).all())
