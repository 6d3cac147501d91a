"""Hadamard constructions, the fast Walsh-Hadamard transform and the online Rotation (HQ-DiT)."""
import logging
import math

import pytest
import torch

from ditq.quant import hadamard
from ditq.quant.hadamard import (
    Rotation,
    RotationError,
    fwht,
    hadamard_factors,
    hadamard_matrix,
)

F64 = torch.float64


def sylvester_ref(n: int) -> torch.Tensor:
    """Independent reference: H[i, j] = (-1)^popcount(i & j)."""
    i = torch.arange(n)
    bits = (i[:, None] & i[None, :]).tolist()
    return torch.tensor([[(-1.0) ** bin(v).count("1") for v in row] for row in bits], dtype=F64)


def is_prime(p: int) -> bool:
    return p > 1 and all(p % d for d in range(2, int(p**0.5) + 1))


def constructible_dense(m: int) -> bool:
    """m = 1, p + 1 (p prime = 3 mod 4) or 2 (p + 1) (p prime = 1 mod 4)."""
    return (m == 1 or (is_prime(m - 1) and (m - 1) % 4 == 3)
            or (m % 2 == 0 and is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1))


# ----------------------------------------------------------------------------- constructions
@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 72, 108, 128, 140, 1152])
def test_hadamard_matrix_is_hadamard(n):
    h = hadamard_matrix(n)
    assert h.dtype == F64 and h.shape == (n, n)
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=F64))


def test_hadamard_4608_rows_are_orthogonal():
    n = 4608
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and bool((h.abs() == 1).all())
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:96]
    expected = torch.zeros(96, n, dtype=F64)
    expected[torch.arange(96), rows] = n
    assert torch.equal(h[rows] @ h.T, expected)


@pytest.mark.parametrize("n", [3, 5, 9, 18, 92, 100, 116])
def test_no_construction_gives_none(n):
    # odd orders > 1 cannot exist; 92 needs Williamson, 100 needs Paley II over GF(49) (prime fields only)
    assert hadamard_matrix(n) is None and hadamard_factors(n) is None


def test_hadamard_factors_follow_the_smallest_dense_factor_rule():
    for n in range(1, 1200):
        f = hadamard_factors(n)
        odd = n
        while odd % 2 == 0:
            odd //= 2
        candidates = [odd << j for j in range(n.bit_length()) if n % (odd << j) == 0]
        valid = [m for m in candidates if constructible_dense(m)]
        if not valid:
            assert f is None, n
            continue
        m, p = f
        assert m * p == n and p & (p - 1) == 0, n
        assert m == min(valid), n


def test_hadamard_factors_at_dit_widths():
    # 1152 = 9 x 2^7: 9 (odd) and 18 (17 = 1 mod 4 only gives Paley II order 36; 8 is not prime)
    # have no construction, 36 = 2 (17 + 1) does
    assert not constructible_dense(9) and not constructible_dense(18) and constructible_dense(36)
    assert hadamard_factors(1152) == (36, 32)
    assert hadamard_factors(4608) == (36, 128)
    assert hadamard_factors(72) == (36, 2)
    assert hadamard_factors(128) == (1, 128) and hadamard_factors(512) == (1, 512)
    assert hadamard_factors(32) == (1, 32) and hadamard_factors(1) == (1, 1)


def test_hadamard_matrix_is_kronecker_of_factors_and_sylvester_ordered():
    assert torch.equal(hadamard_matrix(64), sylvester_ref(64))
    m, p = hadamard_factors(72)
    assert torch.equal(hadamard_matrix(72), torch.kron(hadamard_matrix(m), sylvester_ref(p)))


def test_hadamard_matrix_returns_a_copy():
    h = hadamard_matrix(12)
    h.fill_(0.0)
    assert torch.equal(hadamard_matrix(12) @ hadamard_matrix(12).T, 12 * torch.eye(12, dtype=F64))


@pytest.mark.parametrize("bad", [0, -4, 2.0, 2.5, True, "8", None])
def test_invalid_width_raises(bad):
    with pytest.raises(RotationError, match="positive integer"):
        hadamard_matrix(bad)
    with pytest.raises(RotationError, match="positive integer"):
        Rotation(bad)


# ----------------------------------------------------------------------------- fwht
@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 256])
def test_fwht_equals_sylvester_matmul(n):
    x = torch.randn(3, 5, n, dtype=F64)
    before = x.clone()
    y = fwht(x)
    assert y.shape == x.shape and torch.equal(x, before)  # out of place
    torch.testing.assert_close(y, x @ sylvester_ref(n), rtol=0, atol=1e-12)


def test_fwht_dtypes_noncontiguous_and_errors():
    x = torch.randn(64, 16)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = fwht(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), x.to(dtype).double() @ sylvester_ref(16), rtol=2e-2, atol=2e-1)
    xt = torch.randn(16, 8, dtype=F64).T  # non-contiguous [8, 16]
    torch.testing.assert_close(fwht(xt), xt @ sylvester_ref(16))
    with pytest.raises(RotationError, match="power-of-two"):
        fwht(torch.randn(2, 12))
    with pytest.raises(RotationError, match="floating"):
        fwht(torch.ones(2, 4, dtype=torch.int64))


def test_fwht_autograd_matches():
    x = torch.randn(4, 32, dtype=F64, requires_grad=True)
    g = torch.randn(4, 32, dtype=F64)
    y = fwht(x)
    torch.testing.assert_close(y, fwht(x.detach()))
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, fwht(g))  # H symmetric


# ----------------------------------------------------------------------------- Rotation
@pytest.mark.parametrize("n", [1, 2, 12, 72, 128, 256, 384, 1152, 4608])
def test_rotation_forward_equals_matrix(n):
    r = Rotation(n, seed=1)
    x = torch.randn(2, 3, n, dtype=F64)
    y = r(x)
    assert y.shape == x.shape and y.dtype == F64
    torch.testing.assert_close(y, x @ r.matrix(), rtol=0, atol=1e-12)
    torch.testing.assert_close(r.inverse(y), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.inverse(x), x @ r.inverse_matrix(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [12, 72, 1152])
def test_rotation_matrix_is_signed_normalised_kronecker(n):
    r = Rotation(n, seed=5)
    m, p = r.factors
    h = torch.kron(hadamard_matrix(m), sylvester_ref(p))
    s = r.signs.to(F64)
    torch.testing.assert_close(r.matrix(), s[:, None] * h / math.sqrt(n), rtol=0, atol=1e-15)
    torch.testing.assert_close(r.matrix() @ r.matrix().T, torch.eye(n, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(r.inverse_matrix(), r.matrix().T)
    assert r.kind == "hadamard" and r.n == n and r.seed == 5


def test_h2k_by_two_matmuls_at_dit_widths():
    inner = Rotation(1152).h_inner.shape[0]
    assert inner == 32 and Rotation(1152).h_outer is None  # 1152 = 36 x 32
    r = Rotation(4608)  # 36 x (4 x 32)
    assert r.h_inner.shape == (32, 32) and r.h_outer.shape == (4, 4)


@pytest.mark.parametrize("n", [12 * 256, 256, 72])
def test_fwht_path_agrees_with_matrix(monkeypatch, n):
    monkeypatch.setattr(hadamard, "SYLVESTER_OUTER", 1)  # 2^k > 32 -> fwht
    r = Rotation(n, seed=4)
    assert (r.h_inner is None) == (r.factors[1] > 32)
    x = torch.randn(3, n, dtype=F64)
    torch.testing.assert_close(r(x), x @ r.matrix(), rtol=0, atol=1e-12)
    torch.testing.assert_close(r.inverse(r(x)), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [12, 72, 128, 1152, 4608, 9])
def test_noncontiguous_inputs_and_inputs_left_unchanged(n):
    r = Rotation(n, seed=6)
    xt = torch.randn(n, 5, dtype=F64).T  # non-contiguous rows
    for v in (torch.randn(3, 7, n, dtype=F64), xt):
        before = v.clone()
        torch.testing.assert_close(r(v), v @ r.matrix(), rtol=0, atol=1e-12)
        torch.testing.assert_close(r.inverse(v), v @ r.inverse_matrix(), rtol=0, atol=1e-12)
        assert torch.equal(v, before)


def test_autograd_through_rotation():
    r = Rotation(1152, seed=2)
    x = torch.randn(30, 1152, dtype=F64, requires_grad=True)
    g = torch.randn(30, 1152, dtype=F64)
    (r(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ r.matrix().T, rtol=0, atol=1e-12)
    y = r.inverse(x)
    torch.testing.assert_close(y, x.detach() @ r.inverse_matrix(), rtol=0, atol=1e-12)


def test_folding_into_the_weight_keeps_the_linear():
    r = Rotation(1152, seed=0)
    w, x = torch.randn(16, 1152, dtype=F64), torch.randn(4, 1152, dtype=F64)
    torch.testing.assert_close(r(x) @ r(w).T, x @ w.T, rtol=0, atol=1e-10)


def test_signs_are_seeded():
    a, b, c = Rotation(1152, seed=0), Rotation(1152, seed=0), Rotation(1152, seed=1)
    assert torch.equal(a.signs, b.signs) and not torch.equal(a.signs, c.signs)
    assert set(a.signs.tolist()) == {-1, 1}
    plain = Rotation(72, random_signs=False)
    assert bool((plain.signs == 1).all())
    torch.testing.assert_close(plain.matrix(), hadamard_matrix(72) / math.sqrt(72))
    assert a.describe() == "hadamard 36x32, random signs (seed 0)"
    assert plain.describe() == "hadamard 36x2, no signs"


def test_spec_rebuilds_and_nothing_is_persisted():
    r = Rotation(4608, seed=7, random_signs=True, fallback="error")
    assert r.spec() == {"n": 4608, "seed": 7, "random_signs": True, "fallback": "error"}
    assert len(r.state_dict()) == 0
    again = Rotation(**r.spec())
    assert torch.equal(again.signs, r.signs) and torch.equal(again.base, r.base)


def test_float32_error_and_dtypes():
    for n in (1152, 4608):
        r = Rotation(n)
        x = torch.randn(64, n, dtype=F64)
        ref = r(x)
        y32 = r(x.float())
        assert y32.dtype == torch.float32
        rel = ((y32.double() - ref).norm() / ref.norm()).item()
        assert rel < 2e-6, (n, rel)
        assert r(x.bfloat16()).dtype == torch.bfloat16


def test_module_dtype_cast_keeps_hadamard_exact():
    r = Rotation(1152).half()
    assert r.signs.dtype == torch.int8 and r.base.dtype == torch.int8
    x = torch.randn(2, 1152, dtype=F64)
    torch.testing.assert_close(r(x), x @ r.matrix(), rtol=0, atol=1e-12)


def test_fallback_random_orthogonal_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="ditq.quant.hadamard"):
        r = Rotation(9, seed=3)
    assert r.kind == "random_orthogonal" and r.factors is None
    text = caplog.text
    assert "n=9" in text and "random orthogonal fallback" in text and "no Hadamard construction" in text
    q = r.matrix()
    torch.testing.assert_close(q @ q.T, torch.eye(9, dtype=F64), rtol=0, atol=1e-12)
    x = torch.randn(4, 9, dtype=F64)
    torch.testing.assert_close(r(x), x @ q, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.inverse(r(x)), x, rtol=0, atol=1e-12)
    assert torch.equal(Rotation(9, seed=3).matrix(), q)
    assert not torch.allclose(Rotation(9, seed=4).matrix(), q)
    assert "random orthogonal" in r.describe()


def test_fallback_random_is_haar_sign_corrected():
    # Q R with diag(R) > 0 is the unique QR; sign correction makes Q Haar. Check on the construction:
    # the first column of a Haar matrix has no preferred sign in its first entry.
    firsts = [Rotation(6 * 3 + 3, seed=s, random_signs=False).matrix()[0, 0].item() for s in range(200)]
    pos = sum(v > 0 for v in firsts)
    assert 60 < pos < 140


def test_fallback_error_raises_with_fix():
    with pytest.raises(RotationError) as err:
        Rotation(9, fallback="error")
    msg = str(err.value)
    assert "n=9" in msg and "no Hadamard construction" in msg and "fallback: random" in msg
    assert isinstance(err.value, ValueError)
    with pytest.raises(RotationError, match="fallback must be one of"):
        Rotation(8, fallback="pad")


def test_bad_inputs_name_the_width():
    r = Rotation(72)
    with pytest.raises(RotationError, match="width 72.*last dim must be 72"):
        r(torch.randn(3, 64))
    with pytest.raises(RotationError, match="floating"):
        r(torch.ones(3, 72, dtype=torch.int32))


def test_seed_must_be_an_integer():
    import numpy as np

    assert Rotation(8, seed=np.int64(3)).spec()["seed"] == 3
    assert type(Rotation(8, seed=np.int64(3)).seed) is int
    for bad in (1.5, "0", None, True):
        with pytest.raises(RotationError, match="width 8: seed must be an int"):
            Rotation(8, seed=bad)


def test_vector_and_empty_inputs():
    r = Rotation(72, seed=2)
    v = torch.randn(72, dtype=F64)
    torch.testing.assert_close(r(v), v @ r.matrix(), rtol=0, atol=1e-12)
    assert r(torch.empty(0, 72)).shape == (0, 72)
