"""AdaRound (Nagel et al., 2020) with BRECQ block reconstruction (Li et al., 2021), on any grid, and
FP4DiT's scale-aware variant (Chen et al., 2025, Theorem 1).

Every weight element w is rounded to one of its two neighbouring grid points lo <= w < hi, both taken
from the layer's own weight quantizer (its frozen scale / zero point / groups): lo and hi come from
`Quantizer.quantize_with` (round to nearest, saturating) and `Quantizer.step` (the local grid step,
which for FP grids differs per binade), so the algorithm never looks at the number format:

    w_soft = lo + h * (hi - lo),   h = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)      (AdaRound)
                                   h = clip(sigmoid(alpha / s) (zeta - gamma) + gamma, 0, 1)  (scale-aware)

zeta = 1.1, gamma = -0.1, s = the grid step between lo and hi. Plain AdaRound learns V; its gradient
dL/dV = dL/dw_soft * s * dh/dV grows with the step, so on an FP grid weights in large binades learn
faster than those near zero. Scale-aware AdaRound learns alpha = s V: dL/dalpha = dL/dw_soft * dh/dV,
the same for every binade. Both start at h = the fractional part (w - lo) / (hi - lo).
Elements beyond the grid's ends stay at the end value (hi - lo is set to 0), as the quantizer clamps.

How lo / hi / s are found (any grid the quantizer has: INT, FP ExMy with subnormals, ufp with a zero
point, MX / NVFP4 blocks): q = quantize_with(w); lo = q if q <= w else quantize_with(q - step(w));
s = step(lo + step(lo) / 4) (a point strictly between lo and its upper neighbour: at lo = -2^e the
step below in magnitude is half of step(lo)); hi = quantize_with(lo + s).

Loss (BRECQ): the reconstruction error of the block's output against the FP block's output on the
same inputs, plus `reg_weight * sum(1 - |2h - 1|^beta)` over the rounding variables, off during the
warm-up (the first `warmup` fraction of iterations), beta annealed linearly from `beta_start` to
`beta_end` after it (BRECQ's LinearTempDecay). Adam on V / alpha only; `batch_size` random rows of the
calibration set per iteration. At the end the rounding is hardened (h = 1[V >= 0], the same as
alpha >= 0): the weight quantizer's parameters are frozen (frozen_by="adaround") and the hardened
grid values become the layer's weight source, so its forward is exactly them.

`adaround_block` knows no model: the caller passes the layers of the block, a function running the
block on rows of its inputs and one giving the FP outputs of those rows.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from ditq.quant.quantizer import QParams, Quantizer

__all__ = ["AdaRoundError", "SoftRounding", "AdaRoundResult", "adaround_block", "soft_weights",
           "reconstruction_loss", "beta_at", "ZETA", "GAMMA", "REC_LOSSES"]

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the rectified sigmoid
REC_LOSSES = ("brecq", "mean")
EVAL_ROWS = 256  # rows on which the nearest and the hardened rounding are compared (fixed subset)


class AdaRoundError(ValueError):
    """AdaRound cannot run (bad arguments, a frozen or missing weight quantizer) or diverged (NaN)."""


def _quantizer_params(q: Quantizer) -> QParams:
    return QParams(q.scale, q.zero_point, q.group_size)


class SoftRounding:
    """The rounding variables of one weight on its quantizer's grid (module doc).

    Attributes (all of the weight's shape, float32): `lo`, `hi` (neighbouring grid values; equal where
    the weight lies beyond the grid's ends), `step` (s), `nearest` (round-to-nearest), `free` (bool:
    elements whose rounding is learned), `param` (V or alpha, a leaf tensor requiring grad)."""

    def __init__(self, weight: torch.Tensor, quantizer: Quantizer, *, scale_aware: bool, name: str = ""):
        who = f"AdaRound on layer {name!r}" if name else "AdaRound"
        if getattr(quantizer, "role", None) != "weight":
            raise AdaRoundError(f"{who}: needs a weight quantizer, got {type(quantizer).__name__} role "
                                f"{getattr(quantizer, 'role', None)!r}")
        if not quantizer.is_fitted or quantizer.scale is None:
            raise AdaRoundError(f"{who}: the weight quantizer has no parameters; fit it on the weight first "
                                "(quantizer.fit(weight))")
        if not bool(torch.isfinite(weight).all()):
            raise AdaRoundError(f"{who}: the weight holds NaN/Inf values")
        self.name, self.scale_aware = name, bool(scale_aware)
        self.shape, self.dtype = tuple(weight.shape), weight.dtype
        with torch.no_grad():
            w = weight.detach().to(torch.float32)
            p = _quantizer_params(quantizer)
            near = quantizer.quantize_with(w, p).to(torch.float32)
            below = near <= w
            lo = torch.where(below, near, quantizer.quantize_with(near - quantizer.step(w), p).to(torch.float32))
            s = quantizer.step(lo + quantizer.step(lo) / 4)
            hi = quantizer.quantize_with(lo + s, p).to(torch.float32)
            free = (w >= lo) & (w < hi)  # beyond the grid's ends: fixed at the end value
            gap = torch.where(free, hi - lo, torch.zeros_like(lo))
            frac = torch.where(free, (w - lo) / torch.where(free, gap, torch.ones_like(gap)), torch.zeros_like(w))
            frac = frac.clamp_(0.0, 1.0)
            v = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)  # h(V) = frac
            self.lo, self.hi, self.step, self.nearest, self.free = lo, torch.where(free, hi, lo), s, near, free
            self.gap = gap
            self.param = (v * s if self.scale_aware else v).requires_grad_(True)

    def v(self) -> torch.Tensor:
        """The plain AdaRound variable (alpha / s for the scale-aware form)."""
        return self.param / self.step if self.scale_aware else self.param

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v()) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def fractional(self) -> torch.Tensor:
        """(w - lo) / (hi - lo) as initialised (0 where fixed); h() equals it before any step."""
        return self.h().detach()

    def soft_weight(self) -> torch.Tensor:
        return self.lo + self.h() * self.gap

    def up(self) -> torch.Tensor:
        """Hardened choice: round up where V >= 0 (alpha >= 0), only where the rounding is free."""
        return (self.param.detach() >= 0) & self.free

    def hard_weight(self) -> torch.Tensor:
        """Grid values of the hardened rounding (exactly lo or hi), float32."""
        return torch.where(self.up(), self.hi, self.lo)

    def regularizer(self, beta: float) -> torch.Tensor:
        h = self.h()[self.free]
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()

    def flips(self) -> float:
        """Fraction of elements whose hardened value differs from round-to-nearest."""
        return float((self.hard_weight() != self.nearest).float().mean()) if self.lo.numel() else 0.0


@contextmanager
def soft_weights(layers: Dict[str, Any], roundings: Dict[str, SoftRounding]):
    """Inside, each layer's forward uses its soft-rounded weight (differentiable in V / alpha) instead of
    its cached quantized weight; activations stay as configured. Restores the layers afterwards."""
    patched = []
    try:
        for n, layer in layers.items():
            r = roundings[n]

            def qweight(layer=layer, r=r):
                if not layer.quant_enabled:
                    return layer.weight
                return r.soft_weight().to(layer.weight.dtype)

            layer.quantized_weight = qweight  # the method QuantLinear/QuantConv2d.forward calls
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.quantized_weight


def _float_leaves(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for k in obj for t in _float_leaves(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _float_leaves(v)]
    return []


def reconstruction_loss(out, target, kind: str = "brecq") -> torch.Tensor:
    """Squared error between `out` and `target` (tensors, or matching structures of them: the sum over
    their floating-point leaves). "brecq": BRECQ's lp_loss(p=2) as Q-Diffusion / FP4DiT use it, the
    squared error summed over dim 1 and averaged over the rest; "mean": the plain mean squared error."""
    a, b = _float_leaves(out), _float_leaves(target)
    if not a or len(a) != len(b):
        raise AdaRoundError(f"the block's output has {len(a)} floating-point tensors, its target {len(b)}")
    total = None
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise AdaRoundError(f"block output {tuple(x.shape)} and FP target {tuple(y.shape)} differ in shape")
        d = (x.float() - y.float()).pow(2)
        term = d.sum(1).mean() if (kind == "brecq" and d.ndim >= 2) else d.mean()
        total = term if total is None else total + term
    return total


def beta_at(it: int, iters: int, warmup: float, beta_start: float, beta_end: float) -> Optional[float]:
    """The regulariser's beta at iteration `it` (0-based), None during the warm-up (regulariser off)."""
    start = int(warmup * iters)
    if it < start:
        return None
    rel = (it - start) / max(1, iters - start)
    return beta_end + (beta_start - beta_end) * max(0.0, 1.0 - rel)


@dataclass
class AdaRoundResult:
    iters: int
    loss_nearest: float  # reconstruction loss of round-to-nearest on the evaluation rows
    loss_final: float  # ... of the hardened rounding
    loss_first: float  # soft reconstruction loss of the first iteration
    loss_last: float  # ... of the last iteration
    seconds: float
    rows: int
    per_layer: Dict[str, Dict[str, float]] = field(default_factory=dict)  # flips vs nearest, up fraction
    curve: list = field(default_factory=list)  # [iteration, rec loss, reg loss, beta] every log_every

    def to_dict(self) -> dict:
        return {"iters": self.iters, "loss_nearest": self.loss_nearest, "loss_final": self.loss_final,
                "loss_first": self.loss_first, "loss_last": self.loss_last, "seconds": round(self.seconds, 3),
                "rows": self.rows, "per_layer": self.per_layer, "curve": self.curve}


def _check(layers, iters, batch_size, lr, reg_weight, beta_start, beta_end, warmup, rec_loss, num_rows, who):
    if isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
        raise AdaRoundError(f"{who}: iters={iters!r} must be a positive number of iterations (FP4DiT: 2500)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AdaRoundError(f"{who}: batch_size={batch_size!r} must be >= 1 (BRECQ: 16 rows)")
    if not (math.isfinite(lr) and lr > 0):
        raise AdaRoundError(f"{who}: lr={lr!r} must be a positive learning rate")
    if not (math.isfinite(reg_weight) and reg_weight >= 0):
        raise AdaRoundError(f"{who}: reg_weight={reg_weight!r} must be >= 0")
    if not (0 <= warmup < 1):
        raise AdaRoundError(f"{who}: warmup={warmup!r} must be a fraction of the iterations in [0, 1)")
    if not (beta_start > 0 and beta_end > 0):
        raise AdaRoundError(f"{who}: beta_start and beta_end must be > 0, got {beta_start}, {beta_end}")
    if rec_loss not in REC_LOSSES:
        raise AdaRoundError(f"{who}: rec_loss={rec_loss!r}; choose one of {', '.join(REC_LOSSES)}")
    if num_rows < 1:
        raise AdaRoundError(f"{who}: no calibration rows")
    if not layers:
        raise AdaRoundError(f"{who}: no layers to round")
    for n, layer in layers.items():
        q = getattr(layer, "weight_quantizer", None)
        if q is None:
            raise AdaRoundError(f"{who}: layer {n!r} has no weight quantizer (its weight stays in full "
                                "precision), so there is nothing to round; quantize its weight or leave it out")
        if q.frozen:
            raise AdaRoundError(f"{who}: the weight quantizer of {n!r} is frozen by {q.frozen_by!r}, whose values "
                                "AdaRound would overwrite; run only one of the two steps")


@contextmanager
def _params_frozen(modules):
    """Model parameters need no gradient while the rounding variables learn."""
    params = {id(p): p for m in modules for p in m.parameters()}
    prev = {k: p.requires_grad for k, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(False)
        yield
    finally:
        for k, p in params.items():
            p.requires_grad_(prev[k])


def adaround_block(
    layers: Dict[str, Any],
    forward: Callable[[torch.Tensor], Any],
    target: Callable[[torch.Tensor], Any],
    num_rows: int,
    *,
    iters: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    reg_weight: float = 0.01,
    beta_start: float = 20.0,
    beta_end: float = 2.0,
    warmup: float = 0.2,
    scale_aware: bool = False,
    rec_loss: str = "brecq",
    seed: int = 0,
    log_every: int = 0,
    name: str = "block",
    frozen_modules: Optional[list] = None,
) -> AdaRoundResult:
    """AdaRound the weights of `layers` ({name: QuantLinear / QuantConv2d}) so that `forward(rows)` (the
    block run on the rows `rows` (LongTensor) of its calibration inputs, quantized layers as configured)
    matches `target(rows)` (the FP block's outputs on the same rows). Hardens and installs the result:
    each weight quantizer keeps its parameters (fitted on the weight if it had none), frozen by
    "adaround", and the hardened grid values become the layer's weight source.
    `frozen_modules`: modules whose parameters get no gradient meanwhile (the block; default `layers`).
    Raises AdaRoundError on bad arguments (before any work) or a non-finite loss (block and iteration named)."""
    who = f"AdaRound on {name}"
    _check(layers, iters, batch_size, lr, reg_weight, beta_start, beta_end, warmup, rec_loss, num_rows, who)
    t0 = time.perf_counter()
    roundings: Dict[str, SoftRounding] = {}
    for n, layer in layers.items():
        q = layer.weight_quantizer
        w = layer.weight.detach()
        if not q.is_fitted:
            q.fit(w)
        roundings[n] = SoftRounding(w, q, scale_aware=scale_aware, name=n)
    g = torch.Generator().manual_seed(int(seed))
    eval_rows = torch.randperm(num_rows, generator=g)[: min(num_rows, EVAL_ROWS)].sort().values

    @torch.no_grad()
    def evaluate(choice: Callable[[SoftRounding], torch.Tensor]) -> float:
        with soft_weights(layers, {n: _Fixed(choice(r)) for n, r in roundings.items()}):
            total, count = 0.0, 0
            for b in range(0, len(eval_rows), max(batch_size, 32)):
                rows = eval_rows[b : b + max(batch_size, 32)]
                total += float(reconstruction_loss(forward(rows), target(rows), rec_loss)) * len(rows)
                count += len(rows)
        return total / count

    loss_nearest = evaluate(lambda r: r.nearest)
    opt = torch.optim.Adam([r.param for r in roundings.values()], lr=lr)
    curve: list = []
    first = last = float("nan")
    with _params_frozen(frozen_modules or list(layers.values())), soft_weights(layers, roundings):
        for it in range(iters):
            rows = torch.randperm(num_rows, generator=g)[:batch_size]
            with torch.no_grad():
                tgt = target(rows)
            rec = reconstruction_loss(forward(rows), tgt, rec_loss)
            beta = beta_at(it, iters, warmup, beta_start, beta_end)
            reg = rec.new_zeros(())
            if beta is not None and reg_weight > 0:
                reg = reg_weight * sum(r.regularizer(beta) for r in roundings.values())
            loss = rec + reg
            if not bool(torch.isfinite(loss)):
                raise AdaRoundError(
                    f"{who}: the loss became {float(loss.detach())} at iteration {it} of {iters} (reconstruction "
                    f"{float(rec.detach())}, regulariser {float(reg.detach())}); look for overflowing activations in "
                    "this block (fp16?) or lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = float(rec.detach())
            if it == 0:
                first = last
            if log_every and (it % log_every == 0 or it == iters - 1):
                curve.append([it, last, float(reg.detach()), beta])
                log.info("%s: iteration %d/%d rec %.4g reg %.4g beta %s", who, it, iters, last, curve[-1][2], beta)
    loss_final = evaluate(lambda r: r.hard_weight())
    per_layer = {}
    for n, layer in layers.items():
        r = roundings[n]
        q = layer.weight_quantizer
        q.set_params(_quantizer_params(q), freeze=True, frozen_by="adaround")
        layer.set_weight_source(r.hard_weight().reshape(layer.weight.shape))
        per_layer[n] = {"flips": round(r.flips(), 6), "free": round(float(r.free.float().mean()), 6),
                        "up": round(float(r.up().float().mean()), 6)}
    return AdaRoundResult(iters, loss_nearest, loss_final, first, last, time.perf_counter() - t0, num_rows,
                          per_layer, curve)


class _Fixed:
    """A fixed weight in place of a SoftRounding inside `soft_weights` (evaluation of a hard choice)."""

    def __init__(self, w: torch.Tensor):
        self.w = w

    def soft_weight(self) -> torch.Tensor:
        return self.w
