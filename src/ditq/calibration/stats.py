"""Streaming statistics of layer inputs: Hessians (GPTQ) and channel ranges, batch by batch.

Nothing is kept but the running sums, so a calibration set of any size fits. A layer's input
rows are what its weight multiplies: a Linear's [..., C] input as [N, C]; a Conv2d's input
unfolded into patches [N, C*kh*kw] (the layout of its weight reshaped to [out, in*kh*kw]).
Layers fed the same tensor in one forward (q, k and v) share one accumulator.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditq.quant.modules import layer_input


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) or type(module).__name__ == "QuantConv2d"


def weight_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of `module` as rows [N, K] matching its weight viewed as [out, K]."""
    if is_conv(module):
        if module.groups != 1:
            raise ValueError(f"layer {getattr(module, 'name', '')!r}: grouped convolutions have no single "
                             "input Hessian; GPTQ supports groups=1")
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)  # [B, C*kh*kw, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _require_finite(rows: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(rows).all()):
        raise FloatingPointError(
            f"the input of layer {name} holds NaN/Inf on calibration data: the model upstream of it "
            "produces non-finite activations (fp16 overflow? a diverged earlier quantized block?); "
            "try dtype_inference=float32 or a wider format for the earlier layers"
        )


class HessianAccumulator:
    """H = 2/N sum_i x_i x_i^T over every row seen so far, updated as a running mean."""

    def __init__(self, dim: int, name: str = "", dtype: torch.dtype = torch.float32, device="cpu"):
        self.name = name
        self.H = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.n = 0

    def add(self, rows: torch.Tensor) -> None:
        _require_finite(rows, self.name)
        rows = rows.to(self.H.dtype)
        m = rows.shape[0]
        if m == 0:
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        self.H.addmm_(rows.t(), rows, alpha=2.0 / self.n)

    def merge(self, other: "HessianAccumulator") -> None:
        """Add another accumulator's rows (same dim)."""
        if other.n == 0:
            return
        total = self.n + other.n
        self.H.mul_(self.n / total).add_(other.H, alpha=other.n / total)
        self.n = total


class RangeAccumulator:
    """Channel-wise min and max over every row seen so far."""

    def __init__(self, name: str = ""):
        self.name = name
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        _require_finite(rows, self.name)
        lo, hi = rows.amin(0).float(), rows.amax(0).float()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


class LayerStats:
    """Forward pre-hooks that stream the inputs of `modules` into Hessian (and range) accumulators.

        with LayerStats(modules) as stats:
            for batch in batches:
                stats.new_batch(); run(batch)
        stats.hessian(name)

    Layers in `skip` get no hook: the caller feeds them with `add` (conditioning grids).
    """

    def __init__(self, modules: dict[str, nn.Module], ranges: bool = False, skip: set[str] | None = None,
                 dtype: torch.dtype = torch.float32):
        self.modules = modules
        self.ranges = ranges
        self.skip = set(skip or ())
        self.dtype = dtype
        self.hess: dict[str, HessianAccumulator] = {}
        self.rng: dict[str, RangeAccumulator] = {}
        self.alias: dict[str, str] = {}  # layer -> layer whose accumulator it shares (same input tensor)
        self._seen: dict[tuple, tuple] = {}
        self._handles: list = []

    def __enter__(self) -> "LayerStats":
        for name, mod in self.modules.items():
            if name not in self.skip:
                self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def new_batch(self) -> None:
        self._seen.clear()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            # the same tensor object (kept alive here until new_batch, so its id is not reused) through
            # the same input transform (a rotation shared by q/k/v)
            key = (id(x), is_conv(module), id(getattr(module, "input_transform", None)))
            seen = self._seen.get(key)
            if seen is not None and seen[0] is x and seen[1] != name:
                self.alias.setdefault(name, seen[1])
                return
            self._seen[key] = (x, name)
            if name in self.alias:  # shared in an earlier batch: the owner accumulates
                return
            self.add(name, weight_rows(module, layer_input(module, x)))

        return hook

    def add(self, name: str, rows: torch.Tensor) -> None:
        """Stream rows [N, K] of `name`'s input (hooks call this; so may a conditioning grid)."""
        rows = rows.detach()
        acc = self.hess.get(name)
        if acc is None:
            acc = self.hess[name] = HessianAccumulator(rows.shape[1], name, self.dtype, rows.device)
        acc.add(rows)
        if self.ranges:
            self.rng.setdefault(name, RangeAccumulator(name)).add(rows)

    def owner(self, name: str) -> str:
        return self.alias.get(name, name)

    def hessian(self, name: str) -> torch.Tensor:
        acc = self.hess.get(self.owner(name))
        if acc is None or acc.n == 0:
            raise RuntimeError(f"layer {name} saw no calibration input (is it used by the forward?)")
        return acc.H

    def rows_seen(self, name: str) -> int:
        acc = self.hess.get(self.owner(name))
        return 0 if acc is None else acc.n
