"""Timestep-aware LoRA (TALoRA, MSFP): K low-rank branches per quantized layer, one chosen per row by a
router shared by all layers, from the timestep of that row.

Timestep context. `TimestepContext.install(denoiser, router)` puts a forward pre-hook (with kwargs) on the
denoiser that reads the timestep of the call (`timestep=` keyword: DiT, PixArt, the U-Net adapter; else
the second positional argument: Hunyuan-DiT) as a [B] tensor (a scalar is expanded to the batch) and a
forward hook that clears it when the call ends. Every row of a batch has its own timestep, so calibration
batches that mix timesteps and guidance batches (cat([x, x]) with cat([t, t])) route row by row. A LoRA
layer called outside a denoiser forward (no timestep: e.g. a block runner driving blocks directly), or
with a batch whose size differs from the timestep's, raises `TimestepContextError`.

Branches. `LoRABranch` is the output-branch slot of `QuantLinear` / `QuantConv2d` (`layer.branch`): the
layer adds `branch(x, x_q)` to its output while it is quantized (`quant_enabled`; under `full_precision`
the layer is the FP layer, branch included off). x is what the FP weight multiplies, x_q the same after
the activation quantizer; `lora_input` picks which one feeds the branch (default `quantized`: the
deployed low-bit layer holds only x_q, so the branch reads the tensor that kernel reads and is trained
on exactly what it sees at deployment; `fp` needs a full-precision copy of every layer input at
inference). Linear: down A [K r, in], up B [out, K r]; conv: A a conv with the layer's kernel, stride,
padding and dilation to K r channels, B a 1x1 conv (EfficientDM's conv LoRA). B starts at zero (the
model starts as the quantized model), A Kaiming-uniform, scale alpha / r. The K branches are stacked,
so branch k is the channel slice [k r, (k + 1) r): with gates g [B, K] the branch output is
B (g * A x) — one-hot gates pick one branch per row exactly; soft-gradient gates (the learned router's
straight-through estimator) also pass the gradient to the router. Without gradient through the gates the
rows are grouped by branch and each group runs only its own slice.

Router (`Router`, shared, a submodule of the denoiser so it is saved and counted with the model):
`learned`: sinusoidal embedding of t -> Linear -> SiLU -> Linear -> K logits; forward: one-hot of the
argmax, backward: softmax's gradient (straight-through). `fixed`: the sampler's timesteps (in sampling
order) cut into K contiguous intervals of equal count; a timestep outside the sampler's goes to the
branch of the nearest sampler timestep. Every parameter lives in a `StoredParam` module with a
`storage_bits` attribute: `declared_storage_bits(denoiser)` maps those modules to their bits for
`ModelAdapter.parameter_bits` (LoRA weights at `lora_bits`, not the default 32).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TimestepContext", "TimestepContextError", "LoRABranch", "Router", "StoredParam",
           "declared_storage_bits", "install_lora", "remove_lora", "lora_modules", "timestep_of_call"]

ROUTER_ATTR = "talora_router"  # the router's name on the denoiser


class TimestepContextError(RuntimeError):
    """A LoRA layer ran without the timestep of its rows."""


class StoredParam(nn.Module):
    """One parameter (`weight`) with the bits it is stored at (model size accounting)."""

    def __init__(self, tensor: torch.Tensor, storage_bits: int = 32):
        super().__init__()
        self.weight = nn.Parameter(tensor)
        self.storage_bits = int(storage_bits)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, storage_bits={self.storage_bits}"


def declared_storage_bits(module: nn.Module) -> dict[str, float]:
    """{submodule name: bits per element} of every `StoredParam` under `module` (names as
    `module.named_modules()` gives them: the keys `ModelAdapter.parameter_bits` expects)."""
    return {n: float(m.storage_bits) for n, m in module.named_modules() if isinstance(m, StoredParam)}


def timestep_of_call(args: tuple, kwargs: dict) -> torch.Tensor:
    """The timestep of a denoiser call: keyword `timestep`, else the second positional argument."""
    if "timestep" in kwargs and kwargs["timestep"] is not None:
        return kwargs["timestep"]
    if len(args) > 1:
        return args[1]
    raise TimestepContextError(
        "TALoRA: the denoiser was called without a timestep (neither `timestep=` nor a second positional "
        "argument); LoRA branches need the timestep of every row")


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    for v in (*args[:1], *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.ndim >= 1:
            return int(v.shape[0])
    return None


class TimestepContext:
    """The timestep of every row of the current denoiser call, and the router gates derived from it
    (computed once per call, shared by all layers)."""

    def __init__(self, router: "Router"):
        self.router = router
        self.t: Optional[torch.Tensor] = None
        self._gates: Optional[torch.Tensor] = None
        self.handles: list = []

    # -- hooks ------------------------------------------------------------------------------------
    def install(self, denoiser: nn.Module) -> "TimestepContext":
        def pre(module, args, kwargs):
            t = torch.as_tensor(timestep_of_call(args, kwargs))
            n = _batch_size(args, kwargs)
            if t.ndim == 0:
                t = t.expand(n if n is not None else 1)
            self.set(t.reshape(-1))

        def post(module, args, kwargs, out):
            self.clear()

        self.remove()
        self.handles = [denoiser.register_forward_pre_hook(pre, with_kwargs=True),
                        denoiser.register_forward_hook(post, with_kwargs=True, always_call=True)]
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.clear()

    def set(self, t: torch.Tensor) -> None:
        self.t, self._gates = t, None

    def clear(self) -> None:
        self.t, self._gates = None, None

    # -- what the branches read -------------------------------------------------------------------
    def gates(self, batch: int, layer: str) -> torch.Tensor:
        """[batch, K] gates of the current rows (one-hot in value)."""
        if self.t is None:
            raise TimestepContextError(
                f"TALoRA layer {layer} ran without a timestep: LoRA branches read the timestep of each row from "
                "the denoiser's forward (a pre-hook installed by the talora step); a call that bypasses "
                "`adapter.denoiser(...)` (a block runner, a direct layer call) has none. Run such steps before "
                "talora, or call the denoiser")
        if int(self.t.shape[0]) != int(batch):
            raise TimestepContextError(
                f"TALoRA layer {layer}: its input has {batch} rows but the denoiser call has {self.t.shape[0]} "
                "timesteps; every row needs its own timestep (the layer's input must keep the batch dim first)")
        if self._gates is None:
            self._gates = self.router(self.t)
        return self._gates


class Router(nn.Module):
    """Picks one of K branches per row from its timestep (module doc)."""

    def __init__(self, num_branches: int, kind: str = "learned", timesteps: Sequence[int] = (),
                 embed_dim: int = 64, hidden: int = 64, temperature: float = 1.0, seed: int = 0,
                 storage_bits: int = 32):
        super().__init__()
        if kind not in ("learned", "fixed"):
            raise ValueError(f"router kind {kind!r}; choose learned or fixed")
        ts = [int(t) for t in timesteps]
        if num_branches < 1:
            raise ValueError(f"a router needs at least one branch, got {num_branches}")
        if ts and num_branches > len(ts):
            raise ValueError(f"a router with {num_branches} branches over {len(ts)} sampler timesteps: every branch "
                             f"needs a timestep; use at most {len(ts)} branches")
        self.kind, self.num_branches, self.temperature = kind, int(num_branches), float(temperature)
        self.embed_dim = int(embed_dim)
        self.register_buffer("timesteps", torch.tensor(ts, dtype=torch.float32))
        # fixed partition: branch of each sampler timestep in sampling order (contiguous, equal counts)
        part = torch.zeros(len(ts), dtype=torch.long)
        for k, idx in enumerate(torch.arange(len(ts)).tensor_split(self.num_branches)):
            part[idx] = k
        self.register_buffer("partition", part)
        if kind == "learned" and self.num_branches > 1:
            g = torch.Generator().manual_seed(seed)
            b1, b2 = 1 / math.sqrt(embed_dim), 1 / math.sqrt(hidden)
            u = lambda shape, b: (torch.rand(shape, generator=g) * 2 - 1) * b  # nn.Linear's init
            self.w1 = StoredParam(u((hidden, embed_dim), b1), storage_bits)
            self.b1 = StoredParam(u((hidden,), b1), storage_bits)
            self.w2 = StoredParam(u((num_branches, hidden), b2), storage_bits)
            self.b2 = StoredParam(u((num_branches,), b2), storage_bits)

    @property
    def learned(self) -> bool:
        return self.kind == "learned" and self.num_branches > 1

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.embed_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        a = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(a), torch.sin(a)], dim=1)

    def logits(self, t: torch.Tensor) -> torch.Tensor:
        h = F.silu(F.linear(self.embed(t), self.w1.weight, self.b1.weight))
        return F.linear(h, self.w2.weight, self.b2.weight)

    def fixed_choice(self, t: torch.Tensor) -> torch.Tensor:
        if len(self.timesteps) == 0:
            raise ValueError("a fixed router needs the sampler's timesteps")
        nearest = (t.float()[:, None] - self.timesteps.to(t.device)[None]).abs().argmin(1)
        return self.partition.to(t.device)[nearest]

    def choice(self, t: torch.Tensor) -> torch.Tensor:
        """[B] branch index of each row."""
        t = t.reshape(-1)
        if self.num_branches == 1:
            return torch.zeros(len(t), dtype=torch.long, device=t.device)
        if not self.learned:
            return self.fixed_choice(t)
        return self.logits(t).argmax(1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """[B, K] gates: one-hot in value; with a learned router and grad enabled, the softmax's gradient."""
        t = t.reshape(-1)
        if not self.learned or not torch.is_grad_enabled() or not self.w1.weight.requires_grad:
            return F.one_hot(self.choice(t), self.num_branches).float()
        p = torch.softmax(self.logits(t) / self.temperature, dim=1)
        hard = F.one_hot(p.argmax(1), self.num_branches).to(p.dtype)
        return hard + (p - p.detach())  # straight-through: value exactly one-hot, gradient of the softmax

    def routing(self) -> dict[int, int]:
        """{sampler timestep: branch} (what sampling uses)."""
        with torch.no_grad():
            return {int(t): int(k) for t, k in zip(self.timesteps.tolist(), self.choice(self.timesteps).tolist())}

    def fit_partition(self, iters: int = 300, lr: float = 1e-2) -> float:
        """Initialise a learned router to the fixed partition (cross-entropy on the sampler's timesteps);
        returns the fraction of sampler timesteps it then routes as the partition does."""
        if not self.learned:
            return 1.0
        params = [self.w1.weight, self.b1.weight, self.w2.weight, self.b2.weight]
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(iters):
                opt.zero_grad()
                F.cross_entropy(self.logits(self.timesteps), self.partition).backward()
                opt.step()
        with torch.no_grad():
            return float((self.logits(self.timesteps).argmax(1) == self.partition).float().mean())


class LoRABranch(nn.Module):
    """K stacked LoRA branches of one QuantLinear / QuantConv2d (module doc)."""

    def __init__(self, layer: nn.Module, rank: int, num_branches: int, context: TimestepContext,
                 alpha: Optional[float] = None, lora_input: str = "quantized", storage_bits: int = 32,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if rank < 1 or num_branches < 1:
            raise ValueError(f"LoRA rank {rank} and branches {num_branches} must be >= 1")
        if lora_input not in ("quantized", "fp"):
            raise ValueError(f"lora_input={lora_input!r}; choose quantized or fp")
        self.rank, self.num_branches, self.lora_input = int(rank), int(num_branches), lora_input
        self.scale = (float(alpha) if alpha is not None else float(rank)) / rank
        self.layer_name = getattr(layer, "name", "") or type(layer).__name__
        object.__setattr__(self, "context", context)  # shared, not a submodule
        w = layer.weight
        kr = self.rank * self.num_branches
        self.conv = w.ndim == 4
        if self.conv:
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            down_shape, up_shape = (kr, layer.in_channels, *layer.kernel_size), (layer.out_channels, kr, 1, 1)
        else:
            down_shape, up_shape = (kr, layer.in_features), (layer.out_features, kr)
        down = torch.empty(down_shape, dtype=torch.float32)
        fan_in = math.prod(down_shape[1:])
        bound = math.sqrt(6.0 / ((1 + 5) * fan_in))  # kaiming_uniform_(a=sqrt(5)), nn.Linear's default
        down.uniform_(-bound, bound, generator=generator)
        self.down = StoredParam(down.to(device=w.device), storage_bits)
        self.up = StoredParam(torch.zeros(up_shape, device=w.device), storage_bits)

    def _down(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)
        return F.linear(x, w)

    def _up(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, w) if self.conv else F.linear(h, w)

    def forward(self, x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
        inp = x_q if self.lora_input == "quantized" else x
        inp = inp.to(self.down.weight.dtype)
        gates = self.context.gates(int(inp.shape[0]), self.layer_name)
        dw, uw, r = self.down.weight, self.up.weight, self.rank
        if self.num_branches == 1:
            return (self._up(self._down(inp, dw), uw) * self.scale).to(x_q.dtype)
        if gates.requires_grad:  # learned router in training: all branches, gated (the gradient reaches it)
            h = self._down(inp, dw)
            if self.conv:
                b, _, hh, ww = h.shape
                h = (h.view(b, self.num_branches, r, hh, ww) * gates.view(b, -1, 1, 1, 1)).view(b, -1, hh, ww)
            else:
                shape = h.shape
                g = gates.view(shape[0], *([1] * (h.ndim - 2)), self.num_branches, 1)
                h = (h.view(*shape[:-1], self.num_branches, r) * g).view(shape)
            return (self._up(h, uw) * self.scale).to(x_q.dtype)
        choice = gates.argmax(1)
        out = None
        for k in choice.unique().tolist():
            rows = (choice == k).nonzero().flatten()
            sl = slice(k * r, (k + 1) * r)
            part = self._up(self._down(inp[rows], dw[sl]), uw[:, sl]) * self.scale
            if out is None:
                out = part.new_zeros((inp.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out.to(x_q.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, branches={self.num_branches}, scale={self.scale:g}, input={self.lora_input}"


def install_lora(denoiser: nn.Module, qlayers: dict, router: Router, rank: int, alpha: Optional[float] = None,
                 lora_input: str = "quantized", storage_bits: int = 32, seed: int = 0) -> TimestepContext:
    """Router on the denoiser (`talora_router`), a `LoRABranch` on every layer of `qlayers`, the
    timestep hooks; returns the context (its `remove()` takes the hooks off)."""
    context = TimestepContext(router)
    denoiser.add_module(ROUTER_ATTR, router)
    g = torch.Generator().manual_seed(seed)
    for name in sorted(qlayers):
        q = qlayers[name]
        if getattr(q, "branch", None) is not None:
            raise ValueError(f"layer {name} already has an output branch (LoRA installed twice?)")
        q.branch = LoRABranch(q, rank, router.num_branches, context, alpha=alpha, lora_input=lora_input,
                              storage_bits=storage_bits, generator=g)
    return context.install(denoiser)


def remove_lora(denoiser: nn.Module, qlayers: dict, context: Optional[TimestepContext] = None) -> None:
    if context is not None:
        context.remove()
    for q in qlayers.values():
        q.branch = None
    if hasattr(denoiser, ROUTER_ATTR):
        delattr(denoiser, ROUTER_ATTR)


def lora_modules(denoiser: nn.Module, qlayers: dict) -> nn.ModuleDict:
    """The trainable TALoRA modules ({"router": ..., "<layer with dots as '__'>": branch}) as one
    ModuleDict view (state dicts for checkpoints)."""
    mods = {"router": getattr(denoiser, ROUTER_ATTR)}
    for n, q in sorted(qlayers.items()):
        if q.branch is not None:
            mods[n.replace(".", "__")] = q.branch
    return nn.ModuleDict(mods)
