"""Format names and quantizer configs, validated without importing torch.

`parse_format` turns a short name (``int4``, ``fp4_e2m1``, ``ufp4_e3m1``, ``ocp_e4m3``, ``mxfp4``,
``nvfp4``) into a `FormatSpec`; `validate_quantizer_config` checks a `QuantizerConfig` for one role
("weight" or "act"). Both fail with errors that name the bad value and the fix.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "FormatError",
    "NonFiniteError",
    "FormatSpec",
    "QuantizerConfig",
    "parse_format",
    "available_formats",
    "validate_quantizer_config",
    "GRANULARITIES",
    "RANGE_METHODS",
    "ROLES",
]

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token", "per_token_group", "per_block")
RANGE_METHODS = ("minmax", "percentile", "mse")
STE_MODES = ("clipped", "identity")
ROLES = ("weight", "act")

INT_BITS = range(2, 17)  # int{b} / uint{b}
FP_BITS = range(2, 17)  # fp{n}_e{E}m{M} (n counts the sign bit) and ufp{n}_e{E}m{M}
FP_MAX_EXPONENT_BITS = 7  # keeps every grid value a normal float32 (exact emulation)

NAMING_HELP = (
    "format names: int{b} / uint{b} (b=2..16); scaled FP fp{n}_e{E}m{M} with 1+E+M=n, E>=1, M>=0; "
    "unsigned FP with zero point ufp{n}_e{E}m{M} with E+M=n; OCP ocp_e2m1, ocp_e2m3, ocp_e3m2, "
    "ocp_e4m3, ocp_e5m2; block mxfp8_e4m3, mxfp8_e5m2, mxfp6_e2m3, mxfp6_e3m2, mxfp4, mxint8, nvfp4 "
    "(examples: int4, uint8, fp4_e2m1, fp4_e3m0, ufp4_e3m1, ocp_e4m3, mxfp4, nvfp4)"
)


class FormatError(ValueError):
    """A format name or quantizer config that cannot work; the message says why and how to fix it."""


class NonFiniteError(ValueError):
    """NaN or Inf met where a quantization range is computed (fit, or a dynamic range at forward)."""


@dataclass(frozen=True)
class FormatSpec:
    """What a format name means.

    `bits` is the storage of one element; for block formats `exponent_bits`/`mantissa_bits` describe
    the element and `scale_format` the shared scale. `max_value` of the unit grid lives on `Format`.
    """

    name: str  # canonical name
    family: str  # "int", "fp" (scaled), "ocp", "ufp", "mx", "nvfp4"
    bits: int  # bits per element (sign included)
    exponent_bits: Optional[int]  # None for integer elements
    mantissa_bits: Optional[int]  # None for integer elements
    signed: bool
    block_size: Optional[int] = None  # 32 for MX, 16 for NVFP4
    needs_zero_point: bool = False  # uint and ufp: asymmetric by construction
    scale_format: Optional[str] = None  # "e8m0" (MX), "e4m3" (NVFP4, plus an fp32 tensor scale)
    element: Optional[str] = None  # element format of a block format, e.g. "ocp_e2m1"

    @property
    def is_block(self) -> bool:
        return self.block_size is not None


# ----------------------------------------------------------------------------- fixed names
_OCP = {  # name -> (E, M)
    "ocp_e2m1": (2, 1),
    "ocp_e2m3": (2, 3),
    "ocp_e3m2": (3, 2),
    "ocp_e4m3": (4, 3),
    "ocp_e5m2": (5, 2),
}
_MX = {  # name -> element name
    "mxfp8_e4m3": "ocp_e4m3",
    "mxfp8_e5m2": "ocp_e5m2",
    "mxfp6_e2m3": "ocp_e2m3",
    "mxfp6_e3m2": "ocp_e3m2",
    "mxfp4": "ocp_e2m1",
    "mxint8": "int8",
}
ALIASES = {
    "mxfp4_e2m1": "mxfp4",
    "ocp_e4m3fn": "ocp_e4m3",
    "fp8_e4m3fn": "ocp_e4m3",  # torch / ml_dtypes spelling of OCP E4M3
}

_INT_RE = re.compile(r"^(u?)int(\d+)$")
_FP_RE = re.compile(r"^(u?)fp(\d+)_e(\d+)m(\d+)$")


def _fixed_spec(name: str) -> Optional[FormatSpec]:
    if name in _OCP:
        e, m = _OCP[name]
        return FormatSpec(name, "ocp", 1 + e + m, e, m, True)
    if name == "nvfp4":
        return FormatSpec(name, "nvfp4", 4, 2, 1, True, block_size=16, scale_format="e4m3", element="ocp_e2m1")
    if name in _MX:
        elem = _MX[name]
        if elem == "int8":
            return FormatSpec(name, "mx", 8, None, None, True, block_size=32, scale_format="e8m0", element="int8")
        e, m = _OCP[elem]
        return FormatSpec(name, "mx", 1 + e + m, e, m, True, block_size=32, scale_format="e8m0", element=elem)
    return None


def _bad(name: str, why: str) -> FormatError:
    close = difflib.get_close_matches(name, available_formats() + list(ALIASES), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return FormatError(f"bad format {name!r}: {why}.{hint} Valid {NAMING_HELP}.")


def parse_format(name: str) -> FormatSpec:
    """The `FormatSpec` of a short format name (case-insensitive); `FormatError` if it is impossible."""
    if not isinstance(name, str):
        raise FormatError(f"format must be a string such as 'int4' or 'fp4_e2m1', got {name!r}. Valid {NAMING_HELP}.")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    spec = _fixed_spec(key)
    if spec is not None:
        return spec
    m = _INT_RE.match(key)
    if m:
        unsigned, b = m.group(1) == "u", int(m.group(2))
        if b not in INT_BITS:
            raise _bad(name, f"integer formats have 2..16 bits, not {b}")
        return FormatSpec(key, "int", b, None, None, not unsigned, needs_zero_point=unsigned)
    m = _FP_RE.match(key)
    if m:
        unsigned = m.group(1) == "u"
        n, e, mant = int(m.group(2)), int(m.group(3)), int(m.group(4))
        sign = 0 if unsigned else 1
        if sign + e + mant != n:
            parts = f"{e} exponent + {mant} mantissa" if unsigned else f"1 sign + {e} exponent + {mant} mantissa"
            raise _bad(name, f"{parts} bits = {sign + e + mant}, not {n}")
        if e < 1:
            raise _bad(name, f"FP needs at least 1 exponent bit (with 0 it is an integer grid: use {'u' if unsigned else ''}int{n})")
        if e > FP_MAX_EXPONENT_BITS:
            raise _bad(name, f"at most {FP_MAX_EXPONENT_BITS} exponent bits are emulated exactly in float32, not {e}")
        if n not in FP_BITS:
            raise _bad(name, f"FP formats have 2..16 bits, not {n}")
        family = "ufp" if unsigned else "fp"
        return FormatSpec(key, family, n, e, mant, not unsigned, needs_zero_point=unsigned)
    raise _bad(name, "unknown name")


def available_formats() -> list[str]:
    """Canonical names of a representative set of formats (any valid split parses, not only these)."""
    names = [f"int{b}" for b in range(2, 9)] + [f"uint{b}" for b in range(2, 9)]
    names += [f"fp{n}_e{e}m{n - 1 - e}" for n in range(3, 9) for e in range(1, n)]
    names += [f"ufp{n}_e{e}m{n - e}" for n in range(3, 9) for e in range(1, min(n, FP_MAX_EXPONENT_BITS) + 1)]
    names += list(_OCP) + list(_MX) + ["nvfp4"]
    return names


# ----------------------------------------------------------------------------- quantizer config
@dataclass
class QuantizerConfig:
    """How one tensor (a layer's weight or its input activation) is quantized. Plain types only."""

    format: str  # a format name, see parse_format (required)
    granularity: str = "per_tensor"  # per_tensor | per_channel | per_group | per_token | per_token_group | per_block
    group_size: Optional[int] = None  # per_group / per_token_group width along the input channels
    symmetric: bool = True  # False: zero point (int -> unsigned grid; FP needs a ufp format)
    dynamic: bool = False  # activations only: ranges computed at every forward
    range: str = "minmax"  # static range method: minmax | percentile | mse
    percentile: float = 99.99  # percentile of |x| (symmetric) or of each tail (asymmetric)
    clip_search_points: int = 20  # MSE/Lp search: number of shrink ratios in [clip_min_ratio, 1]
    clip_min_ratio: float = 0.5  # smallest shrink ratio tried
    clip_norm: float = 2.0  # p of the Lp error minimised by the search
    range_includes_zero: bool = False  # asymmetric: widen [min, max] to contain 0 (GPTQ rule); False = Q-DiT rule
    eps: float = 1e-5  # floor of the range (max-min, or absmax) before dividing by the grid's max
    ste: str = "clipped"  # gradient: "clipped" (1, but 0 where the value saturated at the grid's ends) or "identity"
    check_finite: bool = True  # dynamic ranges: raise NonFiniteError on NaN/Inf (one host sync per call)
    scale_bits: int = 16  # storage of one scale / zero point, for bits_per_weight (block formats fix theirs)
    clip_ratio: float = 1.0  # the range rule's range ([lo, hi] or absmax) times this, before the scale; beyond saturates


def _cfg_error(role: str, field: str, value, why: str) -> FormatError:
    return FormatError(f"{role} quantizer config: {field}={value!r}: {why}")


def validate_quantizer_config(cfg: QuantizerConfig, role: str) -> None:
    """Raise `FormatError` naming the field if `cfg` cannot work for `role` ("weight" or "act")."""
    if role not in ROLES:
        raise FormatError(f"role must be one of {ROLES}, got {role!r}")
    spec = parse_format(cfg.format)
    g = cfg.granularity
    if g not in GRANULARITIES:
        raise _cfg_error(role, "granularity", g, f"unknown; choose one of {', '.join(GRANULARITIES)}")
    if cfg.range not in RANGE_METHODS:
        raise _cfg_error(role, "range", cfg.range, f"unknown range method; choose one of {', '.join(RANGE_METHODS)}")
    if cfg.ste not in STE_MODES:
        raise _cfg_error(role, "ste", cfg.ste, f"choose one of {', '.join(STE_MODES)}")
    if not 0.0 < float(cfg.percentile) <= 100.0:
        raise _cfg_error(role, "percentile", cfg.percentile, "must lie in (0, 100]")
    if int(cfg.clip_search_points) < 1:
        raise _cfg_error(role, "clip_search_points", cfg.clip_search_points, "must be >= 1")
    if not 0.0 < float(cfg.clip_min_ratio) <= 1.0:
        raise _cfg_error(role, "clip_min_ratio", cfg.clip_min_ratio, "must lie in (0, 1]")
    if not float(cfg.clip_norm) > 0.0:
        raise _cfg_error(role, "clip_norm", cfg.clip_norm, "must be > 0 (2.0 = MSE)")
    if not float(cfg.eps) > 0.0:
        raise _cfg_error(role, "eps", cfg.eps, "must be > 0")
    if int(cfg.scale_bits) < 1:
        raise _cfg_error(role, "scale_bits", cfg.scale_bits, "must be >= 1")
    if isinstance(cfg.clip_ratio, bool) or not (isinstance(cfg.clip_ratio, (int, float)) and 0.0 < float(cfg.clip_ratio) <= 1.0):
        raise _cfg_error(role, "clip_ratio", cfg.clip_ratio,
                         "must lie in (0, 1] (the fraction of the fitted range kept; 1.0 = no clipping)")

    # --- group size
    grouped = g in ("per_group", "per_token_group")
    if grouped:
        if cfg.group_size is None:
            raise _cfg_error(role, "group_size", None, f"{g} needs a group_size (e.g. 128)")
        if int(cfg.group_size) <= 0:
            raise _cfg_error(role, "group_size", cfg.group_size, "must be a positive integer")
    elif cfg.group_size is not None and not (g == "per_block" and spec.is_block and cfg.group_size == spec.block_size):
        raise _cfg_error(
            role, "group_size", cfg.group_size,
            f"only used with per_group (weights) or per_token_group (activations), not {g}; remove it or change granularity",
        )

    # --- block formats carry their own granularity and scale rule
    if spec.is_block:
        if g != "per_block":
            raise _cfg_error(
                role, "granularity", g,
                f"{spec.name} scales blocks of {spec.block_size} along the input channels; set granularity: per_block",
            )
        if cfg.range != "minmax":
            raise _cfg_error(role, "range", cfg.range, f"{spec.name} fixes its scales from each block's absmax; use minmax")
        if not cfg.symmetric:
            raise _cfg_error(role, "symmetric", False, f"{spec.name} is symmetric (no zero point); set symmetric: true")
        if float(cfg.clip_ratio) != 1.0:
            raise _cfg_error(role, "clip_ratio", cfg.clip_ratio,
                             f"{spec.name} fixes its scales from each block's absmax; set clip_ratio: 1.0")
        if role == "act" and spec.family == "mx" and not cfg.dynamic:
            raise _cfg_error(role, "dynamic", False, f"{spec.name} activation scales belong to each token's blocks; set dynamic: true")
    elif g == "per_block":
        raise _cfg_error(role, "granularity", g, f"per_block is for block formats (mx*, nvfp4), not {spec.name}")

    # --- symmetric vs zero point
    if spec.needs_zero_point and cfg.symmetric:
        raise _cfg_error(role, "symmetric", True, f"{spec.name} is an unsigned grid with a zero point; set symmetric: false")
    if not cfg.symmetric and spec.family in ("fp", "ocp"):
        raise _cfg_error(
            role, "symmetric", False,
            f"{spec.name} is a signed FP grid; asymmetric FP uses an unsigned format with zero point, e.g. "
            f"ufp{spec.bits}_e{spec.exponent_bits + 1}m{spec.mantissa_bits} or ufp{spec.bits}_e{spec.exponent_bits}m{spec.mantissa_bits + 1}",
        )

    # --- role-specific granularities
    if role == "weight":
        if cfg.dynamic:
            raise _cfg_error(role, "dynamic", True, "weights are quantized once; set dynamic: false")
        if g in ("per_token", "per_token_group"):
            raise _cfg_error(role, "granularity", g, "is for activations; weights use per_tensor, per_channel or per_group")
    else:
        if g == "per_group":
            raise _cfg_error(role, "granularity", g, "is for weights; activations use per_token_group (dynamic)")
        if g in ("per_token", "per_token_group") and not cfg.dynamic:
            raise _cfg_error(role, "dynamic", False, f"{g} ranges depend on each token; set dynamic: true")
        if g == "per_channel" and cfg.dynamic:
            raise _cfg_error(role, "dynamic", True, "per_channel activation ranges come from calibration; set dynamic: false")
        if cfg.dynamic and cfg.range != "minmax":
            raise _cfg_error(role, "range", cfg.range, "dynamic ranges are computed with minmax at every forward; use minmax or dynamic: false")
