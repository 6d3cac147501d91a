"""OCP element formats match ml_dtypes (and torch's float8 types) bit for bit."""
import ml_dtypes
import numpy as np
import pytest
import torch

from ditq.quant.formats import get_format

ORACLES = {
    "ocp_e2m1": ml_dtypes.float4_e2m1fn,
    "ocp_e2m3": ml_dtypes.float6_e2m3fn,
    "ocp_e3m2": ml_dtypes.float6_e3m2fn,
    "ocp_e4m3": ml_dtypes.float8_e4m3fn,
    "ocp_e5m2": ml_dtypes.float8_e5m2,
}
# formats whose ml_dtypes conversion overflows to NaN/Inf instead of saturating
NON_SATURATING = {"ocp_e4m3", "ocp_e5m2"}


def ours(name: str, x: np.ndarray) -> np.ndarray:
    return get_format(name).quantize(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()


def oracle(name: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(ORACLES[name]).astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a.view(np.uint32), b.view(np.uint32))


def all_codes(name: str) -> np.ndarray:
    bits = ml_dtypes.finfo(ORACLES[name]).bits
    return np.arange(2**bits, dtype=np.uint8).view(ORACLES[name]).astype(np.float32)


def finite_values(name: str) -> np.ndarray:
    codes = all_codes(name)
    return np.unique(codes[np.isfinite(codes)])


@pytest.mark.parametrize("name", ORACLES)
def test_grid_is_every_finite_code(name):
    assert np.array_equal(get_format(name).grid().numpy(), finite_values(name))
    assert get_format(name).max_value == float(ml_dtypes.finfo(ORACLES[name]).max)


@pytest.mark.parametrize("name", ORACLES)
def test_every_code_is_a_fixed_point_with_its_sign(name):
    codes = all_codes(name)
    codes = codes[np.isfinite(codes)]  # includes -0.0 and all subnormals
    assert same_bits(ours(name, codes), codes)


@pytest.mark.parametrize("name", ORACLES)
def test_midpoints_tie_to_even_and_neighbours(name):
    g = finite_values(name)
    mids = ((g[1:].astype(np.float64) + g[:-1]) / 2).astype(np.float32)
    assert np.array_equal(mids.astype(np.float64), (g[1:].astype(np.float64) + g[:-1]) / 2)  # exact midpoints
    up = np.nextafter(mids, np.float32(np.inf))
    down = np.nextafter(mids, np.float32(-np.inf))
    for x in (mids, up, down):
        assert same_bits(ours(name, x), oracle(name, x))
    # ties go to the code with an even mantissa: for E2M1, 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 2.5 -> 2, 5 -> 4
    if name == "ocp_e2m1":
        np.testing.assert_array_equal(ours(name, [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]), [0, 1, 1, 2, 2, 4, 4])


@pytest.mark.parametrize("name", ORACLES)
def test_random_values_across_the_full_range(name):
    rng = np.random.default_rng(0)
    mx = get_format(name).max_value
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    bits = bits[np.isfinite(bits)]  # every float32 binade, subnormals included
    x = np.concatenate([bits, rng.uniform(-1.2 * mx, 1.2 * mx, 100_000).astype(np.float32)])
    x = x[np.abs(x) <= mx]
    assert same_bits(ours(name, x), oracle(name, x))


@pytest.mark.parametrize("name", ORACLES)
def test_subnormals(name):
    g = finite_values(name)
    tiny = g[g > 0][0]  # smallest subnormal
    rng = np.random.default_rng(1)
    x = (rng.uniform(-8, 8, 50_000) * tiny).astype(np.float32)
    assert same_bits(ours(name, x), oracle(name, x))


@pytest.mark.parametrize("name", ORACLES)
def test_signed_zero(name):
    tiny = finite_values(name)
    tiny = tiny[tiny > 0][0]
    x = np.array([0.0, -0.0, -tiny / 4, tiny / 4, -tiny / 2, -1e-30, 1e-30], dtype=np.float32)
    out = ours(name, x)
    assert same_bits(out, oracle(name, x))
    assert list(np.signbit(out)) == [False, True, True, False, True, True, False]


@pytest.mark.parametrize("name", ORACLES)
def test_saturation(name):
    mx = get_format(name).max_value
    x = np.array([mx, np.nextafter(np.float32(mx), np.float32(np.inf)), 1.5 * mx, 1e30, 3e38, np.inf], dtype=np.float32)
    x = np.concatenate([x, -x])
    out = ours(name, x)
    np.testing.assert_array_equal(out, np.sign(x) * mx)
    # we saturate; ml_dtypes agrees on clipped input, and saturates too where the format has no Inf/NaN
    assert same_bits(out, oracle(name, np.clip(x, -mx, mx)))
    if name not in NON_SATURATING:
        assert same_bits(out, oracle(name, x))


def test_documented_difference_to_ml_dtypes_on_overflow():
    # ml_dtypes turns overflow into NaN (E4M3FN) or Inf (E5M2); ditq saturates to +-max
    assert np.isnan(oracle("ocp_e4m3", [1000.0])[0]) and ours("ocp_e4m3", [1000.0])[0] == 448.0
    assert np.isinf(oracle("ocp_e5m2", [1e6])[0]) and ours("ocp_e5m2", [1e6])[0] == 57344.0


@pytest.mark.parametrize("name", ORACLES)
def test_nan_propagates(name):
    assert np.isnan(ours(name, [np.nan])[0])


@pytest.mark.parametrize("name, dtype", [("ocp_e4m3", torch.float8_e4m3fn), ("ocp_e5m2", torch.float8_e5m2)])
def test_matches_torch_float8(name, dtype):
    mx = get_format(name).max_value
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    codes = codes[torch.isfinite(codes)]
    g = torch.unique(codes)
    mids = (g[1:] + g[:-1]) / 2
    rng = torch.Generator().manual_seed(2)
    rand = (torch.rand(200_000, generator=rng) * 2 - 1) * mx
    x = torch.cat([codes, mids, mids.nextafter(torch.tensor(float("inf"))), rand])
    ref = x.clamp(-mx, mx).to(dtype).float()
    assert torch.equal(get_format(name).quantize(x).view(torch.int32), ref.view(torch.int32))


def test_mx_and_nvfp4_elements_are_the_ocp_grids():
    for block, elem in [("mxfp4", "ocp_e2m1"), ("nvfp4", "ocp_e2m1"), ("mxfp6_e2m3", "ocp_e2m3"),
                        ("mxfp6_e3m2", "ocp_e3m2"), ("mxfp8_e4m3", "ocp_e4m3"), ("mxfp8_e5m2", "ocp_e5m2")]:
        assert torch.equal(get_format(block).grid(), get_format(elem).grid())
    g = get_format("mxint8").grid()
    assert torch.equal(g, torch.arange(-127, 128, dtype=torch.float32) / 64)
