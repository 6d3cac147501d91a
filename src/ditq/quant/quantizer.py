"""The Quantizer: a format, a granularity and a range rule, as one module with fit / forward / step.

Layouts. Weights are [out, in] (conv weights [out, in, kh, kw] are treated as [out, in*kh*kw]);
activations are [..., C] with channels last and dim 0 the batch.

QParams shapes (scale and zero_point alike; `group_size` set when the last dim indexes groups):
  weight per_tensor [1, 1]; per_channel [out, 1]; per_group / per_block [out, G], G = ceil(in / g)
  act static per_tensor [] ; static per_channel [C] ; dynamic per_tensor [B, 1, ..., 1] (one per
  sample, never across the batch) ; per_token [..., 1] ; per_token_group / per_block [..., G]
`quantize_with(x, params)` broadcasts parameters with a last dim of 1 against any x (GPTQ computes
params on a slice of columns, then quantizes single columns with them); parameters with G > 1 need
x's last dim to split into the same G groups.

Frozen parameters. `set_params(params, freeze=True, frozen_by="gptq")` (or `freeze(by)` after a fit)
marks the stored parameters as final: `fit()`, `reset()` and `set_params()` then raise
`FrozenParamsError` until someone deliberately calls `unfreeze()`. The frozen state travels in the
state dict (extra state), so a reloaded model keeps it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .affine import fake_quant, local_step, scale_from_range
from .block import mx_block_scale, nvfp4_block_scale, nvfp4_tensor_scale
from .formats import Format, get_format
from .granularity import apply_params, grouped_stats, num_groups
from .ranges import minmax_range, mse_search, percentile_range
from .runtime import kernel_threads, scratch
from .spec import NonFiniteError, QuantizerConfig, parse_format, validate_quantizer_config
from .ste import straight_through

__all__ = ["QParams", "Quantizer", "build_quantizer", "NonFiniteError", "FrozenParamsError"]


class FrozenParamsError(RuntimeError):
    """A step tried to re-fit, reset or replace parameters that another step froze."""


@dataclass
class QParams:
    """Quantization parameters of one tensor or slice: x_hat = (Q(x / scale + zero_point) - zero_point) * scale.

    `zero_point` is in grid units (None when symmetric). For NVFP4 `scale` is the E4M3 block scale
    times the fp32 `tensor_scale` (kept for export and bit accounting); for MX it is the E8M0 scale.
    """

    scale: torch.Tensor
    zero_point: Optional[torch.Tensor] = None
    group_size: Optional[int] = None
    tensor_scale: Optional[torch.Tensor] = None

    def to(self, device=None) -> "QParams":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QParams(move(self.scale), move(self.zero_point), self.group_size, move(self.tensor_scale))

    @staticmethod
    def cat(parts: Sequence["QParams"]) -> "QParams":
        """Join per-group parameters computed slice by slice (e.g. by GPTQ) along the last dim."""
        if not parts:
            raise ValueError("QParams.cat needs at least one QParams")
        g = parts[0].group_size
        if g is None:
            raise ValueError("QParams.cat joins per-group parameters; these carry no group_size")
        z = None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts], dim=-1)
        return QParams(torch.cat([p.scale for p in parts], dim=-1), z, g, parts[0].tensor_scale)


def _as_config(cfg) -> QuantizerConfig:
    if isinstance(cfg, QuantizerConfig):
        return cfg
    names = {f.name for f in dataclasses.fields(QuantizerConfig)}
    data = dict(cfg)
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown quantizer config keys {sorted(unknown)}; valid keys: {sorted(names)}")
    return QuantizerConfig(**data)


class Quantizer(nn.Module):
    """Fake quantizer for one tensor role ("weight" or "act"). Build with `build_quantizer`.

    fit(x) sets static ranges from data; forward(x) fake-quantizes (straight-through gradient);
    step(x) gives each element's local step; compute_params / quantize_with are the low-level pair.
    Fitted parameters are buffers (`scale`, `zero_point`, `tensor_amax`), saved in the state dict;
    `frozen_by` (extra state) names the step that froze them (see the module doc).
    `name` is display only (QuantLinear sets it to '<layer>.weight_quantizer' / '.act_quantizer').
    """

    def __init__(self, cfg: QuantizerConfig, role: str):
        super().__init__()
        cfg = _as_config(cfg)
        validate_quantizer_config(cfg, role)
        self.cfg, self.role = cfg, role
        self.spec = parse_format(cfg.format)
        element = self.spec.name
        if self.spec.family == "int" and self.spec.signed and not cfg.symmetric:
            element = f"uint{self.spec.bits}"  # asymmetric INT: unsigned grid with a zero point
        self.format: Format = get_format(element)
        self.symmetric = cfg.symmetric
        if self.spec.is_block:
            self.group_size: Optional[int] = self.spec.block_size
        elif cfg.granularity in ("per_group", "per_token_group"):
            self.group_size = int(cfg.group_size)
        else:
            self.group_size = None
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("tensor_amax", None)
        self.frozen_by: Optional[str] = None  # the step that froze the parameters (None: not frozen)
        self.name = ""

    # ------------------------------------------------------------------ state
    @property
    def is_fitted(self) -> bool:
        """True once static parameters (or NVFP4's tensor range) are stored."""
        return self.scale is not None or self.tensor_amax is not None

    @property
    def frozen(self) -> bool:
        """True while the stored parameters are frozen (fit / reset / set_params raise)."""
        return self.frozen_by is not None

    def freeze(self, by: str) -> None:
        """Mark the stored parameters as final; `by` names the step (shown in FrozenParamsError)."""
        if not isinstance(by, str) or not by:
            raise ValueError(f"{self._who()}: freeze(by=...) needs the freezing step's name, got {by!r}")
        if not self.is_fitted:
            raise ValueError(f"{self._who()}: nothing to freeze; fit() or set_params() first")
        self.frozen_by = by

    def unfreeze(self) -> None:
        """Allow fit / reset / set_params again (a deliberate re-fit of frozen parameters)."""
        self.frozen_by = None

    def reset(self) -> None:
        """Forget fitted parameters (FrozenParamsError when frozen)."""
        self._check_not_frozen("reset()")
        self.scale = self.zero_point = self.tensor_amax = None

    def set_params(self, params: QParams, freeze: bool = False, frozen_by: Optional[str] = None) -> None:
        """Store fixed parameters (e.g. the ones GPTQ used), so later forwards reuse them exactly.

        freeze=True also freezes them (frozen_by, the step's name, is then required), so that no later
        step re-fits or re-rounds them. Raises FrozenParamsError if the parameters are already frozen."""
        if freeze and (not isinstance(frozen_by, str) or not frozen_by):
            raise ValueError(f"{self._who()}: set_params(freeze=True) needs frozen_by=<step name>, got {frozen_by!r}")
        if not freeze and frozen_by is not None:
            raise ValueError(f"{self._who()}: frozen_by={frozen_by!r} given without freeze=True; pass freeze=True")
        self._check_not_frozen("set_params()")
        if (params.zero_point is None) != self.symmetric:
            need = "no zero point" if self.symmetric else "a zero point"
            raise ValueError(f"{self.describe()} needs parameters with {need}")
        self.scale = params.scale.detach().to(torch.float32)
        self.zero_point = None if params.zero_point is None else params.zero_point.detach().to(torch.float32)
        if freeze:
            self.frozen_by = frozen_by

    def get_extra_state(self) -> dict:
        return {"frozen_by": self.frozen_by}

    def set_extra_state(self, state) -> None:
        by = state.get("frozen_by") if isinstance(state, dict) else None
        if by is not None and not isinstance(by, str):
            raise ValueError(f"{self._who()}: state dict's frozen_by must be a string or None, got {by!r}")
        self.frozen_by = by

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point", "tensor_amax"):
            if prefix + name in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        # state dicts saved before the frozen state existed: not frozen (instead of a missing key)
        state_dict.setdefault(prefix + "_extra_state", {"frozen_by": None})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def fit(self, x: torch.Tensor, data_range: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        """Static range from data: the weight, or calibration activations [..., C]. Dynamic activation
        quantizers record nothing (NVFP4 static activations record the tensor range only).

        data_range (activations only): the exact channel-wise (min [C], max [C]) of the full data that x
        is an unbiased sample of. Rules that depend on the extremes (minmax, NVFP4's tensor range, the
        starting range of the MSE search) then use it; percentile and the MSE error use x.
        Raises FrozenParamsError when the parameters are frozen (unfreeze() first)."""
        self._check_not_frozen("fit()")
        _require_finite(x, f"{self.describe()}.fit()")
        if data_range is not None:
            data_range = self._check_data_range(x, data_range)
        if self.spec.family == "nvfp4":
            if self.role == "act" and self.cfg.dynamic:
                return
            src = x.detach() if data_range is None else torch.cat(data_range)
            self.tensor_amax = src.abs().amax().to(torch.float32)
            if self.role == "act":
                return
        elif self.cfg.dynamic:
            return
        self.set_params(self._compute_params(x, data_range))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized x (same shape and dtype); gradient passes straight through (see cfg.ste)."""
        with kernel_threads(x):
            return self.quantize_with(x, self._params_for(x))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Local grid step of every element of x under the current ranges (float32, x's shape)."""
        with kernel_threads(x):
            params = self._params_for(x)
            return self._apply(x.detach(), params, lambda v, s, z: local_step(v, self.format, s, z))

    @torch.no_grad()
    def compute_params(self, x: torch.Tensor) -> QParams:
        """Parameters for x under this quantizer's granularity and range rule (shapes: module doc)."""
        return self._compute_params(x, None)

    def _compute_params(self, x: torch.Tensor, data_range) -> QParams:
        x = x.detach()
        if self.role == "weight":
            m = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
            lead = (m.shape[0],)
        else:
            m = x.reshape(-1, x.shape[-1])
            lead = tuple(x.shape[:-1])
        if self.spec.is_block:
            return self._block_params(m, lead)
        gran = self.cfg.granularity
        if self.group_size is not None:
            lo, hi = grouped_stats(m, self.group_size, self._row_range)
            shape = lead + (hi.shape[1],)
        else:
            extremes = None if data_range is None else torch.stack(data_range)  # [2, C], act only
            if gran == "per_tensor" and self.role == "act" and self.cfg.dynamic and x.ndim >= 2:
                rows, shape = x.reshape(x.shape[0], -1), (x.shape[0],) + (1,) * (x.ndim - 1)
            elif gran == "per_tensor":
                rows, shape = x.reshape(1, -1), ((1, 1) if self.role == "weight" else ())
                extremes = None if extremes is None else extremes.reshape(1, -1)
            elif gran == "per_channel" and self.role == "weight":
                rows, shape = m, (m.shape[0], 1)
            elif gran == "per_channel":
                rows, shape = m.t(), (m.shape[1],)
                extremes = None if extremes is None else extremes.t()
            else:  # per_token
                rows, shape = m, lead + (1,)
            lo, hi = self._row_range(rows, extremes)
        scale, zp = scale_from_range(self.format, lo, hi, self.cfg.eps, self.cfg.range_includes_zero)
        return QParams(scale.reshape(shape), None if zp is None else zp.reshape(shape), self.group_size)

    def quantize_with(self, x: torch.Tensor, params: QParams) -> torch.Tensor:
        """Fake-quantize x with given parameters (straight-through gradient when x requires grad)."""
        fmt = self.format
        with kernel_threads(x):
            if x.requires_grad and torch.is_grad_enabled():
                with torch.no_grad():
                    x_hat, mask = self._apply(
                        x.detach(), params, lambda v, s, z: fake_quant(v, fmt, s, z, return_mask=True)
                    )
                return straight_through(x, x_hat, mask if self.cfg.ste == "clipped" else None)
            return self._apply(x, params, lambda v, s, z: fake_quant(v, fmt, s, z))

    @torch.no_grad()
    def forward_into_scratch(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) for float32 CPU inference, written into a per-thread scratch buffer that the
        next call overwrites: only for a caller that consumes the result at once (QuantLinear)."""
        buf = scratch(x.shape, torch.float32, x.device, key="act_out")
        if buf is None or x.dtype != torch.float32:
            return self(x)
        fmt = self.format
        with kernel_threads(x):
            params = self._params_for(x)
            return self._apply(x, params, lambda v, s, z: fake_quant(v, fmt, s, z, out=buf.view(v.shape)))

    # ------------------------------------------------------------------ accounting / display
    def bits_per_weight(self, shape: Sequence[int]) -> float:
        """Element bits plus scale / zero-point storage per element, for a weight of `shape`."""
        out = int(shape[0])
        width = int(math.prod(shape[1:])) if len(shape) > 1 else 1
        numel = out * width
        bits = float(self.spec.bits)
        if self.spec.family == "mx":
            return bits + 8.0 * num_groups(width, self.group_size) / width
        if self.spec.family == "nvfp4":
            return bits + 8.0 * num_groups(width, self.group_size) / width + 32.0 / numel
        per_scale = self.cfg.scale_bits + (0 if self.symmetric else self.spec.bits)
        if self.group_size is not None:
            n_scales = out * num_groups(width, self.group_size)
        elif self.cfg.granularity == "per_channel":
            n_scales = out
        else:
            n_scales = 1
        return bits + per_scale * n_scales / numel

    def describe(self) -> str:
        """Short text such as 'weight:uint4 zp per_group(128) mse' or 'act:fp4_e2m1 per_token dynamic'."""
        parts = [self.format.spec.name if not self.spec.is_block else self.spec.name]
        if not self.symmetric:
            parts.append("zp")
        gran = self.cfg.granularity
        parts.append(f"{gran}({self.group_size})" if self.group_size and not self.spec.is_block else gran)
        parts.append("dynamic" if self.cfg.dynamic else self.cfg.range)
        if self.cfg.clip_ratio != 1.0:
            parts.append(f"clip {self.cfg.clip_ratio:g}")
        return f"{self.role}:" + " ".join(parts)

    def extra_repr(self) -> str:
        frozen = f", frozen by {self.frozen_by}" if self.frozen else ""
        return self.describe() + (", fitted" if self.is_fitted else "") + frozen

    # ------------------------------------------------------------------ internals
    def _who(self) -> str:
        return f"{self.name} ({self.describe()})" if self.name else self.describe()

    def _check_not_frozen(self, action: str) -> None:
        if self.frozen:
            raise FrozenParamsError(
                f"{self._who()}: {action} refused, its parameters were frozen by '{self.frozen_by}' so that "
                f"every later forward reuses them exactly; call unfreeze() first to replace them deliberately, "
                f"or skip frozen quantizers (check `.frozen`)"
            )

    def _check_data_range(self, x: torch.Tensor, data_range) -> tuple[torch.Tensor, torch.Tensor]:
        who = f"{self._who()}.fit(data_range=...)"
        if self.role != "act":
            raise ValueError(f"{who}: data_range is for activation calibration samples; fit a weight on itself")
        if not (isinstance(data_range, (tuple, list)) and len(data_range) == 2):
            raise ValueError(f"{who}: pass data_range=(min [C], max [C]), got {type(data_range).__name__}")
        c = x.shape[-1]
        lo, hi = (torch.as_tensor(t).detach().to(device=x.device, dtype=torch.float32) for t in data_range)
        if lo.shape != (c,) or hi.shape != (c,):
            raise ValueError(
                f"{who}: min and max must have shape [{c}] (the sample's channels, last dim), got "
                f"{tuple(lo.shape)} and {tuple(hi.shape)}"
            )
        _require_finite(torch.stack([lo, hi]), who)
        m = x.detach().reshape(-1, c).float()
        if m.shape[0] and bool(((m.amin(0) < lo) | (m.amax(0) > hi)).any()):
            raise ValueError(
                f"{who}: the sample has values outside the given (min, max); data_range must be the range "
                f"of the full data the sample was drawn from (same layer, same channel order)"
            )
        return lo, hi

    def _apply(self, x: torch.Tensor, params: QParams, fn):
        shape = x.shape
        xv = x.reshape(shape[0], -1) if self.role == "weight" and x.ndim > 2 else x
        out = apply_params(xv, params.scale, params.zero_point, params.group_size, fn)
        if isinstance(out, tuple):
            return tuple(o.reshape(shape) for o in out)
        return out.reshape(shape)

    def _params_for(self, x: torch.Tensor) -> QParams:
        if self.scale is not None:
            if self.role == "weight" and self.scale.shape[0] not in (1, x.shape[0]):
                raise ValueError(
                    f"{self.describe()}: stored parameters are for {self.scale.shape[0]} output channels, "
                    f"the weight has {x.shape[0]}; call reset() and fit() again"
                )
            if self.role == "act" and self.scale.ndim == 1 and self.scale.shape[0] != x.shape[-1]:
                raise ValueError(
                    f"{self.describe()}: calibrated for {self.scale.shape[0]} channels, the input has "
                    f"{x.shape[-1]} (channels must be the last dim); call reset() and fit() again"
                )
            return QParams(self.scale, self.zero_point, self.group_size)
        if self.role == "weight" or self.cfg.dynamic or self.tensor_amax is not None:
            return self.compute_params(x)
        raise RuntimeError(
            f"{self.describe()} is static and has no ranges yet: call fit(calibration activations) "
            f"before forward, or set dynamic: true"
        )

    def _row_range(self, rows: torch.Tensor, extremes: Optional[torch.Tensor] = None):
        """(lo, hi) per row; `extremes` (rows laid out like `rows`, holding the full data's min and max)
        replaces the rows' own extremes for minmax and as the MSE search's starting range. The rule's
        result is multiplied by cfg.clip_ratio (fit, compute_params and dynamic ranges alike)."""
        cfg = self.cfg
        method = "minmax" if cfg.dynamic else cfg.range
        if method == "percentile":
            lo, hi = percentile_range(rows, cfg.percentile, self.symmetric)
        else:
            lo, hi = minmax_range(rows if extremes is None else extremes, self.symmetric)
        if cfg.check_finite:
            _check_ranges(lo, hi, self.describe())
        if method == "mse":
            lo, hi = mse_search(
                rows, self.format, lo, hi, cfg.clip_search_points, cfg.clip_min_ratio, cfg.clip_norm,
                cfg.eps, cfg.range_includes_zero,
            )
        if cfg.clip_ratio != 1.0:  # clip: the rule's range shrunk (both ends); values beyond it saturate
            lo, hi = (None if lo is None else lo * cfg.clip_ratio), hi * cfg.clip_ratio
        return lo, hi

    def _block_params(self, m: torch.Tensor, lead: tuple) -> QParams:
        (amax,) = grouped_stats(m, self.group_size, lambda r: (minmax_range(r, True)[1],))
        if self.cfg.check_finite:
            _check_ranges(None, amax, self.describe())
        amax = amax.reshape(lead + (amax.shape[1],))
        if self.spec.family == "mx":
            return QParams(mx_block_scale(amax, self.format), None, self.group_size)
        if self.tensor_amax is not None:
            t_amax = self.tensor_amax
        elif self.role == "act" and len(lead) >= 1:  # dynamic: one tensor scale per sample
            t_amax = amax.reshape(lead[0], -1).amax(dim=1).reshape((lead[0],) + (1,) * len(lead))
        else:
            t_amax = amax.amax()
        t_scale = nvfp4_tensor_scale(t_amax)
        return QParams(nvfp4_block_scale(amax, t_scale) * t_scale, None, self.group_size, t_scale)


def _check_ranges(lo: Optional[torch.Tensor], hi: torch.Tensor, who: str) -> None:
    bad = ~torch.isfinite(hi)
    if lo is not None:
        bad |= ~torch.isfinite(lo)
    if bool(bad.any()):
        raise NonFiniteError(
            f"{who}: {int(bad.sum())} of {bad.numel()} ranges contain NaN or Inf, so the input holds "
            f"non-finite values (look for fp16 overflow upstream); set check_finite: false to let "
            f"them propagate to the values sharing their scale instead"
        )


def _require_finite(x: torch.Tensor, who: str) -> None:
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise NonFiniteError(
            f"{who}: the tensor of shape {tuple(x.shape)} holds {n_nan} NaN and {n_inf} Inf values; "
            f"ranges cannot be fitted on them. Remove them from the calibration data (or find the "
            f"overflow that produced them)"
        )


def build_quantizer(cfg: QuantizerConfig, role: str) -> Quantizer:
    """A `Quantizer` for `role` ("weight" or "act"); raises `FormatError` on an invalid config."""
    return Quantizer(cfg, role)
