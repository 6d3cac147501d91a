"""gptq_quantize against a plain float64, unblocked implementation of the paper's Algorithm 1.

What is asserted against the reference, and why:
  * float64 inputs: gptq_quantize then works in float64, and its blocked result must be EXACTLY the
    reference's (weights and parameters torch.equal, loss to 1e-12): lazy block updates only change
    the summation order, and in float64 that never moves a value across a rounding boundary here.
  * float32 inputs (the default working precision, like IST-DASLab/gptq): weights carry float32
    rounding (~1e-6 relative) through the error updates. Per-channel / block formats come out equal;
    per-group INT/FP ranges are computed on the updated weights, so a group's scale can differ in
    its last bits and its values by ~1e-5 of a step. We assert that >= 99.9% of the elements are
    on the same grid point (|diff| <= 1e-3 of the local step), that none is more than one step off
    (a float32 tie flip moves a value by one step), and the loss to 1e-5 relative.
"""
import logging
import math

import pytest
import torch

from ditq.algorithms import GPTQError, gptq_quantize
from ditq.quant import NonFiniteError, QParams, QuantizerConfig, build_quantizer

C = QuantizerConfig
FORMATS = {
    "int4_asym_per_channel": C("int4", "per_channel", symmetric=False),
    "int4_asym_group32": C("int4", "per_group", group_size=32, symmetric=False),
    "fp4_e2m1_group32": C("fp4_e2m1", "per_group", group_size=32),
    "fp8_e4m3_per_channel": C("ocp_e4m3", "per_channel"),
    "mxfp4": C("mxfp4", "per_block"),
    "nvfp4": C("nvfp4", "per_block"),
}
GROUPED = {"int4_asym_group32": C("int4", "per_group", group_size=32, symmetric=False),
           "fp4_e2m1_group32": C("fp4_e2m1", "per_group", group_size=32),
           "mxfp4": FORMATS["mxfp4"], "nvfp4": FORMATS["nvfp4"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- reference
def reference_gptq(weight, hessian, cfg, percdamp=0.01, act_order=False, static_groups=False):
    """Algorithm 1 of the GPTQ paper in float64, one column at a time, no lazy blocks: a group's
    parameters are computed when it starts, on the weights updated by all earlier columns."""
    q = build_quantizer(cfg, "weight")
    W, H = weight.double().clone(), hessian.double().clone()
    K = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if q.spec.family == "nvfp4":  # one tensor scale for all blocks, from the weight before the loop
        q.fit(W)
    gs = None if q.group_size is None else min(q.group_size, K)
    params = q.compute_params(W) if gs is None else None
    static = [q.compute_params(W[:, g : g + gs]) for g in range(0, K, gs)] if gs and static_groups else None
    perm = torch.arange(K)
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.diagonal(H).mean() * torch.eye(K, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q, loss, parts = torch.zeros_like(W), 0.0, []
    for j in range(K):
        if static is not None:
            params = static[int(perm[j]) // gs]
        elif gs is not None and j % gs == 0:
            params = q.compute_params(W[:, j : j + gs])
            parts.append(params)
        qj = q.quantize_with(W[:, j : j + 1], params)
        err = (W[:, j : j + 1] - qj) / U[j, j]
        loss += float((err**2).sum()) / 2
        W[:, j:] -= err * U[j : j + 1, j:]
        Q[:, j : j + 1] = qj
    Q = Q[:, torch.argsort(perm)]
    if static is not None:
        params = QParams.cat(static)
    elif parts:
        params = QParams.cat(parts)
    return Q, params, loss


def make_problem(out, k, seed=0, n=None):
    """Weight [out, k] and H = 2/N X^T X of correlated inputs (non-identity covariance)."""
    g = torch.Generator().manual_seed(seed)
    n = n or 4 * k
    mix = torch.randn(k, k, generator=g) / math.sqrt(k) + torch.eye(k)
    X = (torch.randn(n, k, generator=g) @ mix) * torch.linspace(0.2, 2.0, k)
    H = (2.0 / n) * X.T @ X
    return torch.randn(out, k, generator=g) * 0.05, ((H + H.T) / 2).float()


def output_error(W, Q, H):
    d = (W - Q).double()
    return float(torch.trace(d @ H.double() @ d.T))


def grid_distance(got, ref, cfg, ref_params):
    """|got - ref| in units of the local grid step at the reference values (reference params)."""
    q = build_quantizer(cfg, "weight")
    q.set_params(ref_params)
    return (got.double() - ref).abs() / q.step(ref.float()).double()


def assert_matches_reference(r, ref_q, ref_params, ref_loss, cfg, dtype):
    if dtype == torch.float64:
        assert torch.equal(r.weight, ref_q)
        assert torch.equal(r.params.scale, ref_params.scale)
        assert (r.params.zero_point is None) == (ref_params.zero_point is None)
        if ref_params.zero_point is not None:
            assert torch.equal(r.params.zero_point, ref_params.zero_point)
        assert r.loss == pytest.approx(ref_loss, rel=1e-12)
    else:
        d = grid_distance(r.weight, ref_q, cfg, ref_params)
        assert float((d <= 1e-3).double().mean()) >= 0.999, f"{int((d > 1e-3).sum())} elements off the grid point"
        assert float(d.max()) <= 1.0 + 1e-3
        assert r.params.scale.shape == ref_params.scale.shape
        torch.testing.assert_close(r.params.scale, ref_params.scale, rtol=1e-4, atol=0)
        assert r.loss == pytest.approx(ref_loss, rel=1e-5)


# ----------------------------------------------------------------------------- equality with the reference
@pytest.mark.parametrize("k", [128, 100], ids=["width128", "width100"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_matches_float64_algorithm1_for_block_sizes_below_and_above_the_group(fmt, k):
    cfg = FORMATS[fmt]
    W, H = make_problem(48, k, seed=k)
    ref_q, ref_params, ref_loss = reference_gptq(W, H, cfg)
    for block_size in (8, 48, 128):  # below / above the group (32) and NVFP4's block (16)
        for dtype in (torch.float64, torch.float32):
            q = build_quantizer(cfg, "weight")
            r = gptq_quantize(W.to(dtype), H.to(dtype), q, block_size=block_size, name="blocks.0.fc1")
            assert r.weight.dtype == dtype and r.weight.shape == W.shape
            assert_matches_reference(r, ref_q, ref_params, ref_loss, cfg, dtype)


@pytest.mark.parametrize("fmt", list(GROUPED) + ["int4_asym_per_channel"])
def test_act_order_with_static_groups_matches_the_reference_with_the_same_permutation(fmt):
    cfg = FORMATS[fmt]
    W, H = make_problem(32, 100, seed=5)
    ref_q, ref_params, ref_loss = reference_gptq(W, H, cfg, act_order=True, static_groups=True)
    for dtype in (torch.float64, torch.float32):
        r = gptq_quantize(W.to(dtype), H.to(dtype), build_quantizer(cfg, "weight"), block_size=48,
                          act_order=True, static_groups=True)
        assert_matches_reference(r, ref_q, ref_params, ref_loss, cfg, dtype)
    # act_order changes the result (the permutation is not the identity here)
    plain, _, _ = reference_gptq(W, H, cfg, static_groups=True)
    assert not torch.equal(plain, ref_q)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_returned_params_reproduce_the_weight_in_original_order(fmt):
    """The caller stores result.params with set_params; then the quantizer maps the GPTQ weight to itself."""
    cfg = FORMATS[fmt]
    W, H = make_problem(32, 100, seed=2)
    for kw in ({}, {"act_order": True, "static_groups": True}):
        q = build_quantizer(cfg, "weight")
        r = gptq_quantize(W, H, q, **kw)
        assert q.scale is None and q.zero_point is None  # nothing stored by gptq_quantize
        q.set_params(r.params)
        assert torch.equal(q(r.weight), r.weight)


def test_loss_is_half_the_output_error_under_the_damped_hessian():
    """sum_j ((w_j - q_j) / U_jj)^2 = tr(dW (H + damp I) dW^T) for the exact GPTQ updates."""
    W, H = make_problem(32, 96, seed=3)
    r = gptq_quantize(W.double(), H.double(), build_quantizer(FORMATS["int4_asym_group32"], "weight"))
    Hd = H.double() + r.damping * torch.eye(96, dtype=torch.float64)
    assert r.damping == pytest.approx(0.01 * float(torch.diagonal(H.double()).mean()), rel=1e-6)
    assert r.loss == pytest.approx(output_error(W, r.weight, Hd) / 2, rel=1e-9)


# ----------------------------------------------------------------------------- better than RTN
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_output_error_is_lower_than_rtn_on_correlated_inputs(fmt):
    cfg = FORMATS[fmt]
    W, H = make_problem(64, 128, seed=11)
    rtn_q = build_quantizer(cfg, "weight")
    rtn_q.fit(W)
    rtn = output_error(W, rtn_q(W), H)
    for kw in ({}, {"act_order": True, "static_groups": True}):
        gptq = output_error(W, gptq_quantize(W, H, build_quantizer(cfg, "weight"), **kw).weight, H)
        assert gptq < 0.9 * rtn, f"{fmt} {kw}: GPTQ {gptq:.4g} vs RTN {rtn:.4g}"


# ----------------------------------------------------------------------------- edge cases
def test_dead_columns_are_zeroed_and_counted_and_match_the_reference():
    W, H = make_problem(32, 64, seed=4)
    dead = [0, 5, 40, 63]
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    cfg = FORMATS["int4_asym_group32"]
    ref_q, ref_params, ref_loss = reference_gptq(W, H, cfg)
    r = gptq_quantize(W.double(), H.double(), build_quantizer(cfg, "weight"))
    assert r.dead_columns == 4
    assert torch.all(r.weight[:, dead] == 0)
    assert_matches_reference(r, ref_q, ref_params, ref_loss, cfg, torch.float64)


def test_inputs_are_not_modified():
    W, H = make_problem(16, 64, seed=6)
    H[3, :] = H[:, 3] = 0.0
    W0, H0 = W.clone(), H.clone()
    gptq_quantize(W, H, build_quantizer(FORMATS["fp4_e2m1_group32"], "weight"), act_order=True, static_groups=True)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_nvfp4_only_pins_the_tensor_range_on_the_quantizer():
    W, H = make_problem(16, 64, seed=7)
    q = build_quantizer(FORMATS["nvfp4"], "weight")
    gptq_quantize(W, H, q)
    assert q.scale is None and q.tensor_amax == W.abs().amax()


def _indefinite_hessian(k, neg, seed=0):
    """V diag(lambda) V^T with mean eigenvalue 1 and one eigenvalue `neg` (< 0)."""
    g = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    lam = torch.ones(k, dtype=torch.float64)
    lam[0] = neg
    lam *= k / lam.sum()
    H = (V * lam) @ V.T
    return ((H + H.T) / 2).float()


def test_non_positive_definite_hessian_is_retried_with_more_damping_and_logged(caplog):
    """A singular Hessian whose rounding made it slightly indefinite: 1% damping is not enough, 10% is."""
    H = _indefinite_hessian(64, -0.03)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="ditq.algorithms.gptq"):
        r = gptq_quantize(W, H, build_quantizer(FORMATS["int4_asym_per_channel"], "weight"), name="blocks.3.attn.qkv")
    mean_diag = float(torch.diagonal(H).mean())
    assert r.damping == pytest.approx(0.1 * mean_diag, rel=1e-5)
    text = caplog.text
    assert "blocks.3.attn.qkv" in text and "0.1" in text
    assert torch.isfinite(r.weight).all()


def test_hessian_that_no_damping_fixes_raises_naming_the_layer():
    H = _indefinite_hessian(64, -60.0)  # mean diag small, one huge negative eigenvalue
    W = torch.randn(16, 64)
    with pytest.raises(GPTQError, match=r"blocks\.7\.mlp.*not positive definite"):
        gptq_quantize(W, H, build_quantizer(FORMATS["int4_asym_per_channel"], "weight"), name="blocks.7.mlp")


def test_all_zero_hessian_raises_naming_the_layer():
    with pytest.raises(GPTQError, match=r"final_layer.*all 32 input columns dead"):
        gptq_quantize(torch.randn(8, 32), torch.zeros(32, 32), build_quantizer(FORMATS["mxfp4"], "weight"),
                      name="final_layer")


@pytest.mark.parametrize("where", ["weight", "hessian"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_or_hessian_raises_naming_the_layer(where, bad):
    W, H = make_problem(8, 32)
    (W if where == "weight" else H)[2, 3] = bad
    with pytest.raises(NonFiniteError, match=r"blocks\.1\.fc2.*NaN"):
        gptq_quantize(W, H, build_quantizer(FORMATS["int4_asym_group32"], "weight"), name="blocks.1.fc2")


def test_act_order_with_groups_needs_static_groups():
    W, H = make_problem(8, 64)
    for fmt in ("int4_asym_group32", "nvfp4"):
        with pytest.raises(GPTQError, match=r"blocks\.0\.proj.*static_groups"):
            gptq_quantize(W, H, build_quantizer(FORMATS[fmt], "weight"), act_order=True, name="blocks.0.proj")
    # per-channel parameters do not depend on the order: allowed
    gptq_quantize(W, H, build_quantizer(FORMATS["int4_asym_per_channel"], "weight"), act_order=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hessian": torch.eye(31)}, r"\[32, 32\]"),
        ({"weight": torch.randn(8, 4, 8)}, r"\[out, in\]"),
        ({"block_size": 0}, r"block_size"),
        ({"percdamp": -0.1}, r"percdamp"),
        ({"hessian": torch.eye(32) + torch.triu(torch.ones(32, 32), 1)}, r"not symmetric"),
    ],
)
def test_bad_arguments_raise_naming_the_layer(kwargs, match):
    args = {"weight": torch.randn(8, 32), "hessian": torch.eye(32)}
    args.update({k: kwargs.pop(k) for k in ("weight", "hessian") if k in kwargs})
    with pytest.raises(GPTQError, match=match) as info:
        gptq_quantize(args["weight"], args["hessian"], build_quantizer(FORMATS["int4_asym_per_channel"], "weight"),
                      name="t_embedder.mlp.0", **kwargs)
    assert "t_embedder.mlp.0" in str(info.value)


def test_activation_quantizer_is_refused():
    act = build_quantizer(C("int8", "per_tensor"), "act")
    with pytest.raises(GPTQError, match="weight quantizer"):
        gptq_quantize(torch.randn(8, 32), torch.eye(32), act, name="x")


def test_inverse_cholesky_factor_of_a_wide_hessian_matches_the_direct_route():
    """Widths above the 256-column leaf of the recursive triangular inverse (odd splits included)."""
    from ditq.algorithms.gptq import _inverse_cholesky_upper

    _, H = make_problem(4, 701, seed=9, n=900)
    U, damp = _inverse_cholesky_upper(H.double(), 0.01, "wide")
    Hd = H.double() + damp * torch.eye(701, dtype=torch.float64)
    direct = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert torch.equal(U, U.triu())
    torch.testing.assert_close(U, direct, rtol=0, atol=1e-10 * float(direct.abs().max()))


def test_frozen_quantizer_is_refused_before_any_work():
    q = build_quantizer(FORMATS["nvfp4"], "weight")
    q.fit(torch.randn(8, 32))
    q.freeze("rtn")
    with pytest.raises(GPTQError, match=r"blocks\.2\.fc1.*frozen by 'rtn'"):
        gptq_quantize(torch.randn(8, 32), torch.eye(32), q, name="blocks.2.fc1")
