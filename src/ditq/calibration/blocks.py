"""Block capture and replay: run a chain-structured denoiser one block at a time.

A `BlockRunner` splits the denoiser into segments: `"pre"` (everything before the first block:
patch embedding), blocks `0 .. n-1`, and `"tail"` (final norm, output projection, unpatchify).
`capture(x, t, y)` runs the model up to the first block and returns the block's hidden-state
input together with a `BlockCall`: every other positional and keyword argument the block receives
(diffusers' DiT: `timestep`, `class_labels`; PixArt: the adaLN vector and the caption states).
`run_block(k, hidden, call)` runs block k alone; `finish(hidden, call)` runs the tail. Replaying
every block from a capture reproduces the model's output exactly (tested with `torch.equal`).

What is not generic lives in the adapter (`ModelAdapter.block_tail`, `conditioning_layers`,
`conditioning_inputs`); a denoiser that is not a chain (U-Net skip stacks, Hunyuan-DiT's long
skips) needs a runner of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

PRE, TAIL = "pre", "tail"


class _Stop(Exception):
    """Raised inside the first block's pre-hook to stop the forward (GPTQ's "Catcher")."""


@dataclass
class BlockCall:
    """The arguments of one block call besides the hidden states, shared by every block."""

    args: tuple
    kwargs: dict
    t: torch.Tensor  # [B] timestep of every row (for per-timestep statistics)
    y: torch.Tensor  # [B] condition of every row
    out_shape: tuple  # shape of the denoiser input x (the tail unpatchifies to it)
    out_dtype: torch.dtype = torch.float32  # dtype `denoise` returns (that of x)

    def to(self, device) -> "BlockCall":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return BlockCall(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()},
                         self.t, self.y, self.out_shape, self.out_dtype)


class BlockRunner:
    """One-block-at-a-time execution of `adapter.denoiser` (see module doc)."""

    def __init__(self, adapter):
        self.adapter = adapter
        if not getattr(adapter, "is_chain", True):
            raise TypeError(
                f"{type(adapter).__name__} is not a chain of blocks (its skip connections carry state between "
                "segments): run it through adapter.block_runner()"
            )
        self.blocks: list[nn.Module] = list(adapter.blocks())
        if not self.blocks:
            raise TypeError(
                f"{type(adapter).__name__} exposes no blocks(): block-wise calibration needs a chain of "
                "blocks (write a runner for this architecture)"
            )

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def segments(self) -> list:
        return [PRE, *range(self.num_blocks), TAIL]

    @torch.no_grad()
    def capture(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, BlockCall]:
        """The first block's hidden-state input and its other arguments for denoiser input (x, t, y)."""
        hidden, args, kwargs = self.capture_args(x, t, y)
        call = BlockCall(args, kwargs, t.detach().cpu(), y.detach().cpu(), tuple(x.shape), x.dtype)
        return hidden, call

    def capture_args(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
        """(first block's hidden input, its other positional args, its keyword args) for (x, t, y), in the
        caller's grad mode (`capture` runs it without gradients; AdaRound differentiates the "pre" segment)."""
        got: dict[str, Any] = {}

        def hook(module, args, kwargs):
            got["call"] = (args, kwargs)
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.adapter.denoise(x, t, y)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "call" not in got:
            raise RuntimeError(f"{type(self.adapter).__name__}: the denoiser never called its first block")
        return self.first_input(*got["call"])

    def first_input(self, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
        """(hidden input, other positional args, keyword args) from the first block's call arguments."""
        return args[0], tuple(args[1:]), dict(kwargs)

    def block_forward(self, k: int, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """Block k on `hidden`, in the caller's grad mode (AdaRound differentiates it)."""
        out = self.blocks[k](hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def tail_forward(self, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """The "tail" segment in the caller's grad mode."""
        return self.adapter.block_tail(hidden, call)

    @torch.no_grad()
    def run_block(self, k: int, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
        return self.block_forward(k, hidden, call)

    @torch.no_grad()
    def finish(self, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """The denoiser's output (as `adapter.denoise` returns it) from the last block's output."""
        return self.tail_forward(hidden, call)

    @torch.no_grad()
    def replay(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """capture, every block, tail: equals `adapter.denoise(x, t, y)` exactly."""
        hidden, call = self.capture(x, t, y)
        for k in range(self.num_blocks):
            hidden = self.run_block(k, hidden, call)
        return self.finish(hidden, call)

    def segment_layers(self, names: list[str]) -> dict[Any, list[str]]:
        """Group layer names by segment: the block that contains the module; layers outside the
        blocks go to "pre" when the adapter lists them in `pre_block_layers()`, else to "tail"."""
        block_of = {id(m): k for k, block in enumerate(self.blocks) for m in block.modules()}
        pre = set(self.adapter.pre_block_layers())
        out: dict[Any, list[str]] = {s: [] for s in self.segments()}
        for n in names:
            try:
                module = self.adapter.denoiser.get_submodule(n)
            except AttributeError:
                raise KeyError(f"layer {n!r} is not a module of {type(self.adapter).__name__}'s denoiser") from None
            k = block_of.get(id(module))
            out[k if k is not None else (PRE if n in pre else TAIL)].append(n)
        return out


def calibration_batches(records: dict[str, torch.Tensor], null_class: int | None, include_uncond: bool,
                        batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, t, y) batches of the calibration records; with `include_uncond`, each batch holds the
    conditional rows followed by their unconditional (null-condition) twins, as guidance runs them."""
    if include_uncond and null_class is None:
        raise ValueError("calibration with unconditional twins (calib.include_uncond) needs a null condition, "
                         "and this model has none: set calib.include_uncond=false")
    x_all, t_all, y_all = records["x"], records["t"], records["y"]
    half = max(1, batch_size // 2) if include_uncond else batch_size
    for b in range(0, len(x_all), half):
        x, t, y = x_all[b : b + half], t_all[b : b + half], y_all[b : b + half]
        if include_uncond:
            x, t, y = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)])
        yield x, t, y
