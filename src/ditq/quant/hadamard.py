"""Hadamard matrices and the orthogonal rotation x -> x R of HQ-DiT's universal identity transform.

A layer y = x W^T is unchanged when its input is rotated online and the inverse is folded into the
weight: y = (x R)(W R)^T because R R^T = I. Rotating spreads outlier channels over all channels, so
a 4-bit grid fits the rotated activations better. Here R = diag(s) H / sqrt(n) with H a Hadamard
matrix (+-1 entries, H H^T = n I) and s random signs, applied through the Kronecker structure of
H in O(n (m + log or small blocks of 2^k)) per row instead of the n^2 of a dense x @ R.

Constructions (`hadamard_matrix`, `hadamard_factors`), all over PRIME fields only (no GF(p^k)):
  - Sylvester: order 2^k (k >= 0, so orders 1 and 2 too), H_{2n} = [[H, H], [H, -H]];
  - Paley I: a prime p = 3 (mod 4) gives order p + 1;
  - Paley II: a prime p = 1 (mod 4) gives order 2 (p + 1);
  - Kronecker products H_m (x) H_{2^k} of one Paley (or order-1) matrix H_m with a Sylvester one.
So n = m 2^k with m = 1, m = p + 1 (p prime, 3 mod 4) or m = 2 (p + 1) (p prime, 1 mod 4); the
smallest such m is chosen (the dense part of the fast transform). DiT-XL/2's widths 1152 = 36 x 32
and 4608 = 36 x 128 use m = 36 (Paley II, p = 17); its head dim 72 = 36 x 2. No Hadamard matrix of
order 9 (or any odd order > 1) exists; for widths without a construction `Rotation` falls back to
a seeded random orthogonal matrix (or raises, `fallback="error"`).
"""
from __future__ import annotations

import functools
import logging
import math
import operator

import torch
from torch import nn

__all__ = ["RotationError", "Rotation", "fwht", "hadamard_factors", "hadamard_matrix"]

log = logging.getLogger(__name__)

FALLBACKS = ("random", "error")
_MATRIX_CACHE = 4  # full matrices memoised (4608 x 4608 float64 is 170 MB)
# Rotation applies H_{2^k} = H_outer (x) H_inner as two small matmuls (H_inner up to SYLVESTER_INNER,
# H_outer up to SYLVESTER_OUTER), faster on CPU than fwht's log2(2^k) memory-bound passes
# (benchmarks/bench_rotation.py); larger 2^k go through fwht.
SYLVESTER_INNER = 32
SYLVESTER_OUTER = 128


class RotationError(ValueError):
    """A rotation cannot be built or applied as asked (the message names the width and the fix)."""


def _check_n(n, what: str = "n") -> int:
    if isinstance(n, bool):
        raise RotationError(f"{what} must be a positive integer (a layer width), got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise RotationError(f"{what} must be a positive integer (a layer width), got {n!r} "
                            f"({type(n).__name__})") from None
    if n < 1:
        raise RotationError(f"{what} must be a positive integer (a layer width), got {n}")
    return n


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    if p % 2 == 0:
        return p == 2
    return all(p % d for d in range(3, math.isqrt(p) + 1, 2))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _paley_kind(m: int) -> str | None:
    """Which construction gives a Hadamard matrix of order m (> 1, not a power of two), if any."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m 2^k and H_m constructible (1, Paley I or Paley II), smallest m; else None.

    n = o 2^e with o odd: the candidates are m = o 2^j, j = 0..e, tried in increasing order; m = 1
    (n a power of two) is Sylvester alone. E.g. 1152 = 9 x 2^7: 9 and 18 have no construction, 36
    does (Paley II, p = 17), so (36, 32). Prime fields only, so e.g. p^k + 1 orders are not found.
    """
    n = _check_n(n)
    odd, e = n, 0
    while odd % 2 == 0:
        odd, e = odd // 2, e + 1
    for j in range(e + 1):
        m = odd << j
        if m == 1 or _paley_kind(m) is not None:
            return m, n // m
    return None


def _quadratic_character(p: int) -> torch.Tensor:
    """chi(a) for a = 0..p-1 over GF(p): 0, +1 (nonzero square) or -1."""
    chi = torch.full((p,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    chi[[(a * a) % p for a in range(1, p)]] = 1.0
    return chi


def _jacobsthal(p: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(p)."""
    idx = torch.arange(p)
    return _quadratic_character(p)[(idx[None, :] - idx[:, None]) % p]


def _paley1(p: int) -> torch.Tensor:
    """Order p + 1 (p prime, 3 mod 4): H = I + S, S = [[0, 1^T], [-1, Q]] skew-symmetric."""
    s = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(p)
    return s + torch.eye(p + 1, dtype=torch.float64)


def _paley2(p: int) -> torch.Tensor:
    """Order 2 (p + 1) (p prime, 1 mod 4): C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]],
    C = [[0, 1^T], [1, Q]] the symmetric conference matrix."""
    c = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(p)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(p + 1, dtype=torch.float64), b)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=64)
def _base(m: int) -> torch.Tensor:
    """H_m of a valid dense factor m (1 or a Paley order); float64; never handed out uncloned."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    kind = _paley_kind(m)
    if kind == "paley1":
        return _paley1(m - 1)
    if kind == "paley2":
        return _paley2(m // 2 - 1)
    raise AssertionError(f"no construction for order {m}")  # hadamard_factors never yields it


@functools.lru_cache(maxsize=_MATRIX_CACHE)
def _hadamard_cached(n: int) -> torch.Tensor | None:
    factors = hadamard_factors(n)
    if factors is None:
        return None
    m, p = factors
    return torch.kron(_base(m), _sylvester(p)) if m > 1 else _sylvester(p)


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """An n x n float64 matrix of +-1 with H H^T = n I, or None when no construction is known for n.

    H = H_m (x) H_{2^k} with (m, 2^k) = `hadamard_factors(n)` (Sylvester, Paley I/II over prime
    fields only). Memoised per n (the last few); a fresh copy is returned each call.
    """
    h = _hadamard_cached(_check_n(n))
    return None if h is None else h.clone()


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dim: x @ H_sylvester, O(n log n).

    The last dim must be a power of two; any float dtype; a new tensor is returned (x is not
    modified). Differentiable when x requires grad.
    """
    n = x.shape[-1]
    if not _is_pow2(n):
        raise RotationError(f"fwht needs a power-of-two last dim, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.is_complex()):
        raise RotationError(f"fwht needs a floating tensor, got {x.dtype}")
    if n == 1:
        return x.clone()
    lead = x.shape[:-1]
    rows = x.numel() // n
    if x.requires_grad and torch.is_grad_enabled():
        y = x.reshape(rows, n)
        h = 1
        while h < n:
            y = y.view(rows, n // (2 * h), 2, h)
            a, b = y[:, :, 0], y[:, :, 1]
            y = torch.stack((a + b, a - b), dim=2).view(rows, n)
            h *= 2
        return y.view(*lead, n)
    # Two ping-pong buffers, no allocation per stage.
    src = x.reshape(rows, n)
    buf = [torch.empty((rows, n), dtype=x.dtype, device=x.device) for _ in range(2 if n > 2 else 1)]
    h, i = 1, 0
    while h < n:
        dst = buf[i]
        s4 = src.view(rows, n // (2 * h), 2, h)
        d4 = dst.view(rows, n // (2 * h), 2, h)
        torch.add(s4[:, :, 0], s4[:, :, 1], out=d4[:, :, 0])
        torch.sub(s4[:, :, 0], s4[:, :, 1], out=d4[:, :, 1])
        src, i, h = dst, (i + 1) % len(buf), h * 2
    return src.view(*lead, n)


class Rotation(nn.Module):
    """R = diag(s) (H_m (x) H_{2^k}) / sqrt(n), orthogonal; forward(x) = x @ R along the last dim.

    `Rotation(n, seed=0, random_signs=True, fallback="random")`. The signs s (+-1) come from
    `torch.Generator().manual_seed(seed)` (all +1 without `random_signs`). forward multiplies by s,
    views x as [..., m, 2^k], applies H_{2^k} on the last dim and the dense H_m on the m dim, and
    scales by 1/sqrt(n). H_{2^k} = H_outer (x) H_inner is two small matmuls (2^k <= SYLVESTER_INNER
    x SYLVESTER_OUTER; faster on CPU than the butterflies) or `fwht` beyond: O(n (m + 2^k_in +
    2^k_out)) per row instead of n^2 (1152 = 36 x 32: 68 vs 1152; 4608 = 36 x 4 x 32: 72 vs 4608).
    Index i = a 2^k + b, matching `matrix()` (x @ matrix() == forward(x) to rounding).
    `inverse(x)` = x @ R^T.
    Folding: W R (W [out, in]) is `forward(W)`; the layer then computes forward(x) @ (W R)^T.

    Without a Hadamard construction for n (`hadamard_factors(n) is None`): fallback="random" uses
    R = diag(s) Q with Q a seeded Haar-random orthogonal matrix (QR of a float64 Gaussian drawn
    after the signs, sign-corrected) applied as a dense matmul, and logs a warning; fallback="error"
    raises `RotationError`. Buffers (signs, base = H_m or Q, h_inner / h_outer Sylvester blocks) are
    non-persistent: the state is rebuilt from `spec()` = the constructor arguments. The Hadamard
    buffers are int8 (exact under `module.half()`); the fallback's Q is float64 (a dtype cast of the
    module rounds it).
    """

    def __init__(self, n: int, seed: int = 0, random_signs: bool = True, fallback: str = "random"):
        super().__init__()
        n = _check_n(n)
        if fallback not in FALLBACKS:
            raise RotationError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        try:
            if isinstance(seed, bool):
                raise TypeError
            seed = operator.index(seed)
        except TypeError:
            raise RotationError(f"rotation of width {n}: seed must be an int, got {seed!r}") from None
        self.n, self.seed, self.random_signs, self.fallback = n, seed, bool(random_signs), fallback
        self.factors = hadamard_factors(n)
        if self.factors is None and fallback == "error":
            raise RotationError(
                f"no Hadamard construction is known for width n={n} (n = m 2^k needs m = 1, p + 1 with "
                f"p prime = 3 mod 4, or 2(p + 1) with p prime = 1 mod 4); use fallback: random for a "
                f"seeded random orthogonal rotation instead")
        gen = torch.Generator().manual_seed(seed)
        if self.random_signs:
            signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8) * 2 - 1
        else:
            signs = torch.ones(n, dtype=torch.int8)
        self.register_buffer("signs", signs.to(torch.int8), persistent=False)
        if self.factors is not None:
            self.kind = "hadamard"
            m, p = self.factors
            self.register_buffer("base", _base(m).to(torch.int8), persistent=False)
            inner, outer = min(p, SYLVESTER_INNER), p // min(p, SYLVESTER_INNER)
            by_matmul = 1 < p and outer <= SYLVESTER_OUTER  # else fwht (h_inner None)
            self.register_buffer("h_inner", _sylvester(inner).to(torch.int8) if by_matmul else None,
                                 persistent=False)
            self.register_buffer("h_outer", _sylvester(outer).to(torch.int8) if by_matmul and outer > 1
                                 else None, persistent=False)
        else:
            self.kind = "random_orthogonal"
            self.register_buffer("h_inner", None, persistent=False)
            self.register_buffer("h_outer", None, persistent=False)
            g = torch.randn(n, n, generator=gen, dtype=torch.float64)
            q, r = torch.linalg.qr(g)
            d = torch.sign(torch.diagonal(r))
            d[d == 0] = 1.0
            self.register_buffer("base", q * d, persistent=False)  # Haar: Q diag(sign(diag R))
            log.warning("rotation of width %d: no Hadamard construction is known for n=%d, using a "
                        "random orthogonal fallback (seed %d, dense %dx%d matmul)", n, n, seed, n, n)

    def spec(self) -> dict:
        """The constructor arguments; they rebuild this rotation exactly (use them in cache keys)."""
        return {"n": self.n, "seed": self.seed, "random_signs": self.random_signs,
                "fallback": self.fallback}

    def describe(self) -> str:
        signs = f"random signs (seed {self.seed})" if self.random_signs else "no signs"
        if self.kind == "hadamard":
            m, p = self.factors
            return f"hadamard {m}x{p}, {signs}"
        return f"random orthogonal {self.n}x{self.n} (seed {self.seed}, fallback: no Hadamard construction)"

    def extra_repr(self) -> str:
        return f"n={self.n}, {self.describe()}"

    def _check_input(self, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            raise RotationError(f"rotation of width {self.n} needs a floating tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.n:
            raise RotationError(f"rotation of width {self.n} got an input of shape {tuple(x.shape)}; "
                                f"its last dim must be {self.n}")

    def _hadamard(self, x: torch.Tensor, signs: torch.Tensor | None, transpose: bool) -> torch.Tensor:
        """(x * signs) @ (H_m (x) H_{2^k}) / sqrt(n) (H_m^T with `transpose`) on a contiguous x [rows, n].

        Kronecker order: (x (A (x) B))[c p + d] = sum_a A[a, c] (X B)[a, d] with X = x viewed [m, p],
        and B = H_outer (x) H_inner likewise on X's rows viewed [p_outer, p_inner]. The scale is
        folded into the last matmul. Without autograd the matmuls ping-pong between two buffers:
        fewer fresh large allocations (each page-faulted in again) than one per step.
        """
        m, p = self.factors
        rows, n, dtype = x.shape[0], self.n, x.dtype
        scale = 1.0 / math.sqrt(n)
        steps = []  # (matrix, applied from the left?, view of the rows)
        if p > 1 and self.h_inner is not None:
            split = (rows * m, p // self.h_inner.shape[0], self.h_inner.shape[0])
            steps.append((self.h_inner, False, split))
            if self.h_outer is not None:
                steps.append((self.h_outer, True, split))
        if m > 1:
            steps.append((self.base if transpose else self.base.T, True, (rows, m, p)))
        y = x if signs is None else x * signs
        if p > 1 and self.h_inner is None:
            y = fwht(y.view(rows, m, p)).view(rows, n)
        if not steps:
            return y * scale
        autograd = x.requires_grad and torch.is_grad_enabled()
        owned = [] if y is x else [y]  # buffers this call may overwrite
        for k, (mat, left, shape) in enumerate(steps):
            h = mat.to(dtype) * scale if k == len(steps) - 1 else mat.to(dtype)
            src = y.view(shape)
            if autograd:
                y = (torch.matmul(h, src) if left else torch.matmul(src, h)).view(rows, n)
                continue
            dst = next((b for b in owned if b is not y), None)
            if dst is None:
                dst = torch.empty((rows, n), dtype=dtype, device=x.device)
                owned.append(dst)
            if left:
                torch.matmul(h, src, out=dst.view(shape))
            else:
                torch.matmul(src, h, out=dst.view(shape))
            y = dst
        return y

    def _rotate(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        self._check_input(x)
        x2 = x.reshape(-1, self.n).contiguous()
        signs = self.signs.to(x.dtype)
        if self.kind != "hadamard":
            q = self.base.to(x.dtype)
            y = (x2 @ q.T) * signs if inverse else (x2 * signs) @ q
        else:
            y = self._hadamard(x2, None if inverse else signs, transpose=inverse)
            y = y * signs if inverse else y
        return y.view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R along the last dim; dtype and shape kept."""
        return self._rotate(x, inverse=False)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R^T along the last dim (undoes forward); dtype and shape kept."""
        return self._rotate(x, inverse=True)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """R as an [n, n] tensor (on the buffers' device): x @ matrix() == forward(x) to rounding."""
        s = self.signs.to(torch.float64)
        if self.kind == "hadamard":
            m, p = self.factors
            h = torch.kron(self.base.to(torch.float64), _sylvester(p).to(self.base.device))
            r = h * (1.0 / math.sqrt(self.n))
        else:
            r = self.base.to(torch.float64)
        return (s[:, None] * r).to(dtype)

    def inverse_matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """R^T = R^-1 as an [n, n] tensor."""
        return self.matrix(torch.float64).T.contiguous().to(dtype)
