"""Element grids: exact round-to-nearest-even onto INT and FP ExMy grids, on the unit scale.

A `Format` knows its grid of representable values for a scale of 1. `quantize(u)` rounds a tensor
that was already divided by its scale (and shifted by a zero point) to the nearest grid value, ties
to even, saturating at the grid's ends. FP rounding uses the float32 exponent bits (no log2), so it
is exact: u is first converted to float32; the result is float32.

Grids (bias b = 2^(E-1) - 1 unless stated, emin = 1 - b, subnormals included):
  int{b}   integers -(2^(b-1)-1) .. 2^(b-1)-1 (symmetric, 2^b - 1 values)
  uint{b}  integers 0 .. 2^b - 1 (used with a zero point)
  fp{n}_eEmM / ocp_e2m1 / ocp_e2m3 / ocp_e3m2   all codes finite, max = 2^(2^E-1-b) (2 - 2^-M)
  ocp_e4m3  max 448 (S.1111.111 is NaN);  ocp_e5m2  max 57344 (top exponent is Inf/NaN)
  ufp{n}_eEmM   unsigned, all n bits to E and M, values 0 .. 2^(2^E-1-b) (2 - 2^-M)
  mx*/nvfp4     the element grid (E8M0 / E4M3 block scales live in `block.py`);
                mxint8's element is k/64 for k in -127..127.
"""
from __future__ import annotations

import functools
import math
from typing import Union

import torch

from .runtime import scratch
from .spec import FormatSpec, parse_format

__all__ = ["Format", "IntFormat", "FloatFormat", "get_format"]

_EXP_MASK = 0x7F800000  # float32 exponent field
_F32_BIAS = 127


class Format:
    """A grid of representable values on the unit scale; subclasses implement `quantize_` and `step`."""

    spec: FormatSpec
    max_value: float  # largest grid value
    min_value: float  # smallest grid value (-max_value when signed, 0 when unsigned)
    emax: int  # floor(log2(max_value)): the MX scale rule subtracts it
    clip_low: float  # values below round to min_value only by saturating (half a step beyond it)
    clip_high: float  # likewise above max_value

    def grid(self, device=None) -> torch.Tensor:
        """Sorted float32 tensor of all distinct grid values (+0 and -0 counted once)."""
        raise NotImplementedError

    def quantize_(self, u: torch.Tensor) -> torch.Tensor:
        """Round float32 `u` in place to the nearest grid value (ties to even, saturating); return it."""
        raise NotImplementedError

    def step(self, u: torch.Tensor) -> torch.Tensor:
        """Local step of the grid at each element of `u` (the spacing of the binade holding u)."""
        raise NotImplementedError

    def quantize(self, u: torch.Tensor) -> torch.Tensor:
        """Out-of-place `quantize_`: float32 result, NaN stays NaN, +-Inf saturates to the grid's ends."""
        return self.quantize_(u.to(torch.float32, copy=True))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name}, max={self.max_value:g})"


class IntFormat(Format):
    """Integers lo..hi times `unit` (unit = 1 except mxint8's 2^-6)."""

    def __init__(self, spec: FormatSpec, lo: int, hi: int, unit: float = 1.0):
        self.spec, self.lo, self.hi, self.unit = spec, lo, hi, unit
        self.max_value = hi * unit
        self.min_value = lo * unit
        self.emax = math.floor(math.log2(self.max_value))
        self.clip_low, self.clip_high = self.min_value - unit / 2, self.max_value + unit / 2

    def grid(self, device=None) -> torch.Tensor:
        return torch.arange(self.lo, self.hi + 1, dtype=torch.float32, device=device) * self.unit

    def quantize_(self, u: torch.Tensor) -> torch.Tensor:
        if self.unit != 1.0:
            return u.mul_(1.0 / self.unit).round_().clamp_(self.lo, self.hi).mul_(self.unit)
        return u.round_().clamp_(self.lo, self.hi)

    def step(self, u: torch.Tensor) -> torch.Tensor:
        return torch.full(u.shape, self.unit, dtype=torch.float32, device=u.device)


class FloatFormat(Format):
    """Sign (optional) + E exponent bits + M mantissa bits with exponent bias `bias`, largest value `max_value`."""

    def __init__(self, spec: FormatSpec, e: int, m: int, bias: int, max_value: float, signed: bool):
        self.spec, self.e, self.m, self.bias, self.signed = spec, e, m, bias, signed
        self.emin = 1 - bias  # exponent of the smallest normal; subnormals share its step
        self.max_value = float(max_value)
        self.min_value = -self.max_value if signed else 0.0
        self.emax = math.floor(math.log2(self.max_value))
        top_half_step = 2.0 ** (self.emax - m) / 2
        self.clip_high = self.max_value + top_half_step
        self.clip_low = -self.clip_high if signed else -(2.0 ** (self.emin - m)) / 2
        # float32 exponent-field constants for the step computation
        self._emin_bits = (self.emin + _F32_BIAS) << 23
        self._mant_shift = m << 23
        assert self.emin - m + _F32_BIAS >= 1, "grid step below the float32 normal range"

    def grid(self, device=None) -> torch.Tensor:
        vals = {k * 2.0 ** (self.emin - self.m) for k in range(2**self.m)}  # zero and subnormals
        for ex in range(self.emin, self.emax + 1):
            for k in range(2**self.m):
                v = (1.0 + k / 2**self.m) * 2.0**ex
                if v <= self.max_value:
                    vals.add(v)
        pos = sorted(vals)
        full = [-v for v in reversed(pos) if v > 0] + pos if self.signed else pos
        return torch.tensor(full, dtype=torch.float32, device=device)

    def _step_bits(self, u: torch.Tensor, out=None) -> torch.Tensor:
        """Step as float32 from the exponent bits of clamped float32 `u` (into `out` if given)."""
        p = torch.bitwise_and(u.view(torch.int32), _EXP_MASK, out=out)  # 2^floor(log2|u|), 0 for 0/subnormal
        p.clamp_min_(self._emin_bits).sub_(self._mant_shift)  # max(e, emin) - M
        return p.view(torch.float32)

    def quantize_(self, u: torch.Tensor) -> torch.Tensor:
        if u.dtype != torch.float32:
            raise TypeError(f"{self.spec.name}.quantize_ works on float32 in place, got {u.dtype}; use quantize()")
        u.clamp_(self.min_value, self.max_value)
        step = self._step_bits(u, out=scratch(u.shape, torch.int32, u.device))
        return u.div_(step).round_().mul_(step)  # division by a power of two: exact

    def step(self, u: torch.Tensor) -> torch.Tensor:
        c = torch.clamp(u.to(torch.float32), self.min_value, self.max_value)
        return self._step_bits(c)


def _fp_max(e: int, m: int, bias: int) -> float:
    return 2.0 ** (2**e - 1 - bias) * (2.0 - 2.0**-m)


def _build(spec: FormatSpec) -> Format:
    if spec.family == "int":
        b = spec.bits
        if spec.signed:
            return IntFormat(spec, -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1)
        return IntFormat(spec, 0, 2**b - 1)
    if spec.family == "mx" and spec.element == "int8":
        return IntFormat(spec, -127, 127, unit=2.0**-6)
    e, m = spec.exponent_bits, spec.mantissa_bits
    bias = 2 ** (e - 1) - 1
    name = spec.element if spec.is_block else spec.name
    if name == "ocp_e4m3":
        return FloatFormat(spec, e, m, bias, 448.0, True)
    if name == "ocp_e5m2":
        return FloatFormat(spec, e, m, bias, 57344.0, True)
    return FloatFormat(spec, e, m, bias, _fp_max(e, m, bias), spec.signed)


@functools.lru_cache(maxsize=None)
def _get(name: str) -> Format:
    return _build(parse_format(name))


def get_format(name_or_spec: Union[str, FormatSpec, Format]) -> Format:
    """The `Format` for a name, a `FormatSpec`, or a `Format` (returned as is); cached per name."""
    if isinstance(name_or_spec, Format):
        return name_or_spec
    if isinstance(name_or_spec, FormatSpec):
        return _get(name_or_spec.name)
    return _get(parse_format(name_or_spec).name)
