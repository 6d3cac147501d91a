"""Grids of every family, hand-computed steps, and property tests (hypothesis) of Format.quantize."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditq.quant import QuantizerConfig, build_quantizer
from ditq.quant.formats import FloatFormat, get_format
from ditq.quant.spec import available_formats, parse_format

SCALED_FP = [n for n in available_formats() if parse_format(n).family == "fp"]
UFP = [n for n in available_formats() if parse_format(n).family == "ufp"]
PROPERTY_FORMATS = [
    "int2", "int4", "int8", "uint3", "uint8", "fp3_e1m1", "fp4_e2m1", "fp4_e3m0", "fp4_e1m2", "fp6_e3m2",
    "fp8_e4m3", "fp8_e5m2", "fp8_e7m0", "fp16_e5m10", "ufp4_e3m1", "ufp4_e4m0", "ufp8_e7m1", "ocp_e2m1",
    "ocp_e4m3", "ocp_e5m2", "mxint8", "nvfp4",
]


@pytest.mark.parametrize("name", SCALED_FP)
def test_signed_scaled_fp_grid_has_2n_minus_1_symmetric_values(name):
    spec, fmt = parse_format(name), get_format(name)
    g = fmt.grid()
    assert g.numel() == 2**spec.bits - 1  # +0 and -0 coincide
    assert torch.equal(g, -g.flip(0))
    assert g.max().item() == fmt.max_value
    e, m = spec.exponent_bits, spec.mantissa_bits
    bias = 2 ** (e - 1) - 1
    assert fmt.max_value == 2.0 ** (2**e - 1 - bias) * (2 - 2.0**-m)  # all codes finite


@pytest.mark.parametrize("name", UFP)
def test_unsigned_fp_grid_has_2n_values(name):
    g = get_format(name).grid()
    assert g.numel() == 2 ** parse_format(name).bits
    assert g.min().item() == 0.0 and bool((g[1:] > g[:-1]).all())


@pytest.mark.parametrize("name, values", [
    ("fp4_e2m1", [0, 0.5, 1, 1.5, 2, 3, 4, 6]),
    ("fp4_e3m0", [0, 0.25, 0.5, 1, 2, 4, 8, 16]),
    ("fp4_e1m2", [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]),  # E1 is a uniform grid
    ("fp3_e1m1", [0, 1, 2, 3]),
    ("ufp4_e3m1", [0, 0.125, 0.25, 0.375, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24]),
    ("ufp4_e2m2", [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7]),
    ("int3", [0, 1, 2, 3]),
    ("uint2", [0, 1, 2, 3]),
])
def test_hand_written_grids(name, values):
    g = get_format(name).grid().tolist()
    pos = [v for v in g if v >= 0]
    assert pos == values
    if parse_format(name).signed:
        assert g == [-v for v in reversed(values) if v > 0] + values


@pytest.mark.parametrize("name, u, step", [
    ("fp4_e2m1", [0.0, 0.3, 0.99, 1.0, 1.9, 2.0, 3.5, 4.0, 5.9, 6.0, 100.0, -2.5], [0.5, 0.5, 0.5, 0.5, 0.5, 1, 1, 2, 2, 2, 2, 1]),
    ("fp4_e3m0", [0.1, 0.3, 0.6, 1.5, 9.0, 16.0], [0.25, 0.25, 0.5, 1, 8, 16]),
    ("ocp_e4m3", [0.001, 0.02, 1.0, 300.0, 448.0], [2.0**-9, 2.0**-9, 0.125, 32, 32]),
    ("ufp4_e3m1", [0.0, 0.2, 0.3, 5.0, 20.0, -1.0], [0.125, 0.125, 0.125, 2, 8, 0.125]),
    ("int4", [0.3, 100.0], [1, 1]),
    ("mxint8", [0.3, 1.9], [2.0**-6, 2.0**-6]),
])
def test_step_by_hand(name, u, step):
    assert get_format(name).step(torch.tensor(u)).tolist() == step


def test_fp4dit_formula_equivalence():
    """FP4DiT/LLM-FP4: bias = 2^E - log2(maxval) + log2(2 - 2^-M) - 1, e = max(floor(log2|x| + bias), 1),
    s = 2^(e - M - bias), x_hat = round(clamp(x) / s) s (floor over the sum, as in the LLM-FP4 code).
    Equal to ditq's scaled grid where the scale is a power of two, and to float32 rounding otherwise."""

    def ref(x, e_bits, m_bits, maxval):
        x = x.double()
        bias = 2**e_bits - math.log2(maxval) + math.log2(2 - 2.0**-m_bits) - 1
        xc = x.clamp(-maxval, maxval)
        e = torch.clamp(torch.floor(torch.log2(xc.abs()) + bias), min=1)
        s = 2.0 ** (e - m_bits - bias)
        return torch.round(xc / s) * s

    gen = torch.Generator().manual_seed(0)
    for e_bits, m_bits in [(2, 1), (3, 0), (1, 2), (4, 3), (5, 2), (3, 2)]:
        name = f"fp{1 + e_bits + m_bits}_e{e_bits}m{m_bits}"
        mv = get_format(name).max_value
        q = build_quantizer(QuantizerConfig(name, "per_tensor"), "weight")
        for maxval, exact in [(mv * 2.0**-3, True), (mv * 4.0, True), (0.3712, False), (5.123, False)]:
            x = (torch.randn(1, 50_000, generator=gen) * maxval / 2).clamp(-maxval, maxval)
            x[0, 0] = maxval
            out = q(x).double()
            expected = ref(x, e_bits, m_bits, maxval)
            # power-of-two scales: equal up to the reference's own float64 log2 rounding
            torch.testing.assert_close(out, expected, rtol=1e-12 if exact else 1e-6, atol=0)


@pytest.mark.parametrize("name", ["fp4_e2m1", "fp4_e3m0", "fp6_e2m3", "fp8_e4m3", "fp3_e1m1"])
@pytest.mark.parametrize("maxval", [1.0, 0.3712, 1234.5])
def test_scaled_grid_at_a_maxval(name, maxval):
    """Scaled by a quantizer whose range is maxval: 2^n - 1 distinct symmetric values, the largest
    equal to maxval up to the float32 rounding of the scale maxval / max_value (<= 1 ulp)."""
    fmt = get_format(name)
    q = build_quantizer(QuantizerConfig(name, "per_tensor"), "weight")
    params = q.compute_params(torch.tensor([[maxval, -0.5 * maxval]]))
    scale = params.scale
    sweep = torch.linspace(-1.5, 1.5, 200_001).view(1, -1) * maxval  # every grid cell, and saturation
    x = torch.cat([sweep, (fmt.grid() * scale).view(1, -1)], dim=1)
    vals = torch.unique(q.quantize_with(x, params))
    assert vals.numel() == 2 ** parse_format(name).bits - 1
    assert torch.equal(vals, -vals.flip(0))
    m32 = np.float32(maxval)
    top = np.float32(vals.max().item())
    assert abs(float(top) - float(m32)) <= float(np.spacing(m32))
    assert top == np.float32(np.float32(m32 / np.float32(fmt.max_value)) * np.float32(fmt.max_value))


# ----------------------------------------------------------------------------- hypothesis properties
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


def _in_range(fmt, vals):
    return [v for v in vals if fmt.min_value <= v <= fmt.max_value]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(PROPERTY_FORMATS), vals=st.lists(finite32, min_size=1, max_size=64))
def test_quantize_is_idempotent(name, vals):
    fmt = get_format(name)
    q = fmt.quantize(torch.tensor(vals))
    assert torch.equal(fmt.quantize(q), q)
    assert torch.isin(q, fmt.grid()).all()  # lands on the grid


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(PROPERTY_FORMATS), vals=st.lists(finite32, min_size=2, max_size=64))
def test_quantize_is_monotone(name, vals):
    x = torch.tensor(sorted(vals))
    q = get_format(name).quantize(x)
    assert bool((q[1:] >= q[:-1]).all())


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(PROPERTY_FORMATS), vals=st.lists(finite32, min_size=1, max_size=64), scale_exp=st.integers(-3, 3))
def test_error_at_most_half_the_local_step_in_range(name, vals, scale_exp):
    fmt = get_format(name)
    x = torch.tensor(vals) * 2.0 ** (scale_exp - 40)  # bring arbitrary floats near the grid
    x = torch.cat([x, torch.tensor(vals).remainder(2 * fmt.max_value + 1) - fmt.max_value])
    x = x[(x >= fmt.min_value) & (x <= fmt.max_value)]
    err = (fmt.quantize(x).double() - x.double()).abs()
    assert bool((err <= fmt.step(x).double() / 2).all())


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(PROPERTY_FORMATS), vals=st.lists(finite32, min_size=1, max_size=32))
def test_quantize_returns_the_nearest_grid_value(name, vals):
    fmt = get_format(name)
    x = torch.tensor(vals).clamp(fmt.min_value, fmt.max_value)
    grid = fmt.grid().double()
    best = (x.double().view(-1, 1) - grid.view(1, -1)).abs().min(dim=1).values
    assert torch.equal((fmt.quantize(x).double() - x.double()).abs(), best)


def test_float_format_internals_stay_in_float32_normal_range():
    for name in SCALED_FP + UFP + ["fp16_e5m10", "fp16_e7m8", "ufp16_e7m9"]:
        fmt = get_format(name)
        assert isinstance(fmt, FloatFormat)
        tiny = fmt.grid().abs()
        assert tiny[tiny > 0].min().item() >= 2.0**-126
        assert math.isfinite(fmt.max_value)
