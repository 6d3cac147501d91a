"""MX (OCP Microscaling v1.0) and NVFP4 scale rules: hand-worked examples and an independent reference."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from ditq.quant import QuantizerConfig, build_quantizer
from ditq.quant.block import mx_block_scale, nvfp4_block_scale, nvfp4_tensor_scale
from ditq.quant.formats import get_format

MX_ELEMENTS = {  # name -> (ml_dtypes element or None for int8, emax of the element)
    "mxfp8_e4m3": (ml_dtypes.float8_e4m3fn, 8),
    "mxfp8_e5m2": (ml_dtypes.float8_e5m2, 15),
    "mxfp6_e2m3": (ml_dtypes.float6_e2m3fn, 2),
    "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 4),
    "mxfp4": (ml_dtypes.float4_e2m1fn, 2),
    "mxint8": (None, 0),
}


def wq(name: str) -> "torch.nn.Module":
    return build_quantizer(QuantizerConfig(name, "per_block"), "weight")


def one_block(name: str, values, width: int = 32) -> torch.Tensor:
    x = torch.zeros(1, width)
    x[0, : len(values)] = torch.tensor(values)
    return wq(name)(x)[0, : len(values)]


def test_element_emax_matches_the_spec_table():
    assert {n: get_format(n).emax for n in MX_ELEMENTS} == {n: e for n, (_, e) in MX_ELEMENTS.items()}
    assert get_format("nvfp4").emax == 2


# ----------------------------------------------------------------------------- hand-worked MX blocks
def test_mxfp4_block_by_hand():
    # absmax 3.0: X = 2^(floor(log2 3) - 2) = 2^-1; V/X = 6, 2.2, 0.6, 5.2, -0.4, -5.8 -> 6, 2, 0.5, 6, -0.5, -6
    out = one_block("mxfp4", [3.0, 1.1, 0.3, 2.6, -0.2, -2.9])
    assert out.tolist() == [3.0, 1.0, 0.25, 3.0, -0.25, -3.0]


def test_mxfp4_saturates_when_absmax_over_x_exceeds_the_element_max():
    # absmax 7.9: X = 2^(2 - 2) = 1; 7.9 clamps to 6; 5.0 is a tie between 4 and 6 -> 4 (even mantissa)
    out = one_block("mxfp4", [7.9, 5.0, -7.0, 0.74])
    assert out.tolist() == [6.0, 4.0, -6.0, 0.5]


def test_mxfp8_e4m3_block_by_hand():
    # absmax 1000: X = 2^(9 - 8) = 2; 1000/2 = 500 saturates to 448; 3.3/2 = 1.65 -> 1.625 (step 1/8);
    # -0.01/2 = -0.005 is below E4M3's smallest normal 2^-6: subnormal step 2^-9, 2.56 steps -> 3
    out = one_block("mxfp8_e4m3", [1000.0, 3.3, -0.01])
    assert out.tolist() == [896.0, 3.25, -3 * 2.0**-9 * 2]


def test_mxfp6_e3m2_block_by_hand():
    # absmax 0.1: X = 2^(-4 - 4) = 2^-8; 0.1 * 256 = 25.6 -> 24 (step 4 in [16, 32)) -> 0.09375
    out = one_block("mxfp6_e3m2", [0.1, 0.01])
    # 0.01 * 256 = 2.56 -> step 0.5 in [2, 4) -> 2.5 -> 2.5 / 256
    assert out.tolist() == [0.09375, 2.5 / 256]


def test_mxint8_block_by_hand():
    # absmax 0.8: X = 2^-1; elements k/64 with k = round(V/X * 64): 0.8 -> 102.4 -> 102; -0.3 -> -38.4 -> -38
    out = one_block("mxint8", [0.8, -0.3])
    assert out.tolist() == [102 / 64 * 0.5, -38 / 64 * 0.5]
    # absmax 1.99: X = 1; 1.99 * 64 = 127.36 -> 127 (the symmetric int8 range, -128 unused)
    assert one_block("mxint8", [1.99, -1.99]).tolist() == [127 / 64, -127 / 64]


def test_mx_zero_and_tiny_blocks():
    assert mx_block_scale(torch.tensor([0.0]), get_format("mxfp4")).item() == 2.0**-127
    assert mx_block_scale(torch.tensor([1e-40]), get_format("mxfp4")).item() == 2.0**-127  # clamped to E8M0 min
    assert mx_block_scale(torch.tensor([3e38]), get_format("mxfp4")).item() == 2.0 ** (127 - 2)
    out = one_block("mxfp4", [0.0] * 32)
    assert torch.equal(out, torch.zeros(32))


def test_mx_width_not_divisible_by_32_uses_a_short_last_block():
    x = torch.zeros(1, 40)
    x[0, 0], x[0, 32], x[0, 33] = 100.0, 0.75, 0.3  # second block: absmax 0.75 -> X = 2^(-1-2) = 1/8
    out = wq("mxfp4")(x)
    assert out[0, 32].item() == 0.75 and out[0, 33].item() == 0.25  # 0.3 * 8 = 2.4 -> 2 -> 0.25
    params = wq("mxfp4").compute_params(x)
    assert params.scale.tolist() == [[2.0 ** (6 - 2), 2.0**-3]]


def _mx_reference(x: np.ndarray, name: str) -> np.ndarray:
    """Straight from the spec text, one block at a time, with ml_dtypes doing the element rounding."""
    elem, emax = MX_ELEMENTS[name]
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 32):
            v = x[r, b : b + 32]
            amax = float(np.abs(v).max())
            e = max(math.floor(math.log2(amax)) - emax, -127) if amax > 0 else -127
            X = np.float32(2.0**e)
            u = v / X
            if elem is None:
                q = np.clip(np.round(u * 64), -127, 127) / 64  # np.round: ties to even
            else:
                mx = float(ml_dtypes.finfo(elem).max)
                q = np.clip(u, -mx, mx).astype(elem).astype(np.float32)
            out[r, b : b + 32] = q * X
    return out


@pytest.mark.parametrize("name", MX_ELEMENTS)
def test_mx_matches_a_spec_reference(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 128)).astype(np.float32)
    x *= (10.0 ** rng.uniform(-6, 6, (16, 4))).repeat(32, axis=1).astype(np.float32)  # very different block ranges
    x[3, :32] = 0.0
    ours = wq(name)(torch.from_numpy(x)).numpy()
    ref = _mx_reference(x, name)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


# ----------------------------------------------------------------------------- NVFP4
def test_nvfp4_by_hand():
    # tensor absmax 3 -> s_t = 3 / (6 * 448) = 1/896.
    # block A (absmax 3): s_b = (3/6) * 896 = 448 (E4M3 max) -> scale 0.5: 3 -> 6, 1.2 -> 2.4 -> 2
    # block B (absmax 1): (1/6) * 896 = 149.33 -> E4M3 rounds to 144 (step 16) -> scale 144/896 = 9/56;
    #   1 / (9/56) = 6.22 -> 6 (saturates); 0.5 -> 3.11 -> 3; 0.25 -> 1.56 -> 1.5; -0.7 -> -4.36 -> -4
    x = torch.zeros(1, 32)
    x[0, :2] = torch.tensor([3.0, 1.2])
    x[0, 16:20] = torch.tensor([1.0, 0.5, 0.25, -0.7])
    q = wq("nvfp4")
    params = q.compute_params(x)
    s_t = params.tensor_scale.item()
    assert s_t == pytest.approx(1 / 896, rel=1e-7)
    assert (params.scale / params.tensor_scale)[0].tolist() == pytest.approx([448.0, 144.0], rel=1e-6)
    out = q(x)[0]
    assert out[:2].tolist() == pytest.approx([3.0, 1.0], rel=1e-6)
    assert out[16:20].tolist() == pytest.approx([6 * 9 / 56, 3 * 9 / 56, 1.5 * 9 / 56, -4 * 9 / 56], rel=1e-6)


def test_nvfp4_block_scale_clamps_to_the_smallest_e4m3_subnormal():
    s_t = nvfp4_tensor_scale(torch.tensor(1000.0))
    s_b = nvfp4_block_scale(torch.tensor([1e-4, 0.0, 1e9]), s_t)
    assert s_b.tolist() == [2.0**-9, 2.0**-9, 448.0]
    assert nvfp4_tensor_scale(torch.tensor(0.0)).item() == 1.0  # all-zero tensor
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 16] = 1000.0, 1e-4
    out = wq("nvfp4")(x)
    assert out[0, 16].item() == 0.0 and out[0, 0].item() == pytest.approx(1000.0, rel=1e-6)


def _nvfp4_reference(x: np.ndarray) -> np.ndarray:
    t_scale = np.float32(np.abs(x).max()) / np.float32(6 * 448)
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 16):
            v = x[r, b : b + 16]
            s_b = (np.float32(np.abs(v).max()) / np.float32(6)) / t_scale
            s_b = np.clip(s_b, np.float32(2.0**-9), np.float32(448)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            eff = np.float32(s_b * t_scale)
            u = np.clip(v / eff, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
            out[r, b : b + 16] = u * eff
    return out


def test_nvfp4_matches_a_reference():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 96)) * 10.0 ** rng.uniform(-3, 3, (8, 1))).astype(np.float32)
    ours = wq("nvfp4")(torch.from_numpy(x)).numpy()
    assert np.array_equal(ours.view(np.uint32), _nvfp4_reference(x).view(np.uint32))


def test_nvfp4_activation_tensor_scale_is_per_sample_when_dynamic_and_calibrated_when_static():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.tensor([1.0, 100.0, 0.01]).view(3, 1, 1)
    dyn = build_quantizer(QuantizerConfig("nvfp4", "per_block", dynamic=True), "act")
    full = dyn(x)
    for i in range(3):
        assert torch.equal(full[i], dyn(x[i : i + 1])[0])
    static = build_quantizer(QuantizerConfig("nvfp4", "per_block"), "act")
    with pytest.raises(RuntimeError, match="call fit"):
        static(x)
    static.fit(x * 2)
    assert static.tensor_amax.item() == (x * 2).abs().max().item()
    p = static.compute_params(x)
    assert torch.equal(p.tensor_scale, nvfp4_tensor_scale(static.tensor_amax))
