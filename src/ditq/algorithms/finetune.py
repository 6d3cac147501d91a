"""A checkpointed fine-tuning loop (Adam on given parameters, random rows per iteration), format- and
model-agnostic: the caller hands the loss of a set of row indices.

Resume. `Checkpointer(path, spec)` keeps one file: the trainable module's state dict, the optimizer's
state, the row sampler's generator state (the batch cursor), torch's global RNG state, the iteration and
the loss curve, plus the `spec` that made it. Every `checkpoint_every` iterations (and at the end) it is
rewritten atomically (`ditq.utils.atomic`), so a killed run leaves the previous complete checkpoint; the
same call resumes from it and ends with the weights an uninterrupted run reaches (same rows, same Adam
moments, bit for bit at equal thread counts). A checkpoint made by another spec: `explicit=True` (a path
the user named) raises `CheckpointMismatchError` naming the differing fields; otherwise (an automatic,
spec-keyed path) the mismatch is logged with those fields and training starts over. An unreadable file is
logged and replaced.
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.utils.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["finetune", "FinetuneResult", "FinetuneError", "Checkpointer", "CheckpointMismatchError", "spec_diff"]


class FinetuneError(RuntimeError):
    """Fine-tuning cannot go on (NaN loss, bad arguments)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint made by another model or configuration."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def spec_diff(stored: dict, current: dict) -> list[str]:
    """'field: stored -> current' for every (dotted) field that differs."""
    a, b = _flatten(stored), _flatten(current)
    out = []
    for k in sorted(set(a) | set(b)):
        if json.dumps(a.get(k), sort_keys=True, default=str) != json.dumps(b.get(k), sort_keys=True, default=str):
            sa, sb = (json.dumps(v, default=str)[:80] for v in (a.get(k, "<absent>"), b.get(k, "<absent>")))
            out.append(f"{k}: {sa} -> {sb}")
    return out


class Checkpointer:
    def __init__(self, path: str | Path, spec: dict, explicit: bool = False):
        self.path, self.spec, self.explicit = Path(path), json.loads(json.dumps(spec, default=str)), explicit
        self.restart_reason: Optional[str] = None

    def load(self) -> Optional[dict]:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            stored = state["spec"]
        except Exception as err:  # noqa: BLE001 - a damaged file is replaced, never trusted
            if self.explicit:
                raise CheckpointMismatchError(f"checkpoint {self.path} cannot be read ({type(err).__name__}: {err}); "
                                              "delete it or point the checkpoint option elsewhere") from None
            self.restart_reason = f"unreadable ({type(err).__name__})"
            log.warning("fine-tuning checkpoint %s is unreadable (%s); starting over", self.path, err)
            return None
        diff = spec_diff(stored, self.spec)
        if diff:
            if self.explicit:
                raise CheckpointMismatchError(
                    f"checkpoint {self.path} was made by another model or configuration; differing fields "
                    f"(checkpoint -> this run): {'; '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}. Use a "
                    "checkpoint of this run, another checkpoint path, or delete the file to start over")
            self.restart_reason = "; ".join(diff[:8])
            log.warning("fine-tuning checkpoint %s was made with other settings (%s); starting over and replacing it",
                        self.path, self.restart_reason)
            return None
        return state

    def save(self, state: dict) -> None:
        buf = io.BytesIO()
        torch.save({**state, "spec": self.spec}, buf)
        atomic_write_bytes(self.path, buf.getvalue())


@dataclass
class FinetuneResult:
    iters: int
    loss_first: float
    loss_last: float
    curve: list = field(default_factory=list)  # [(iteration, loss)]
    seconds: float = 0.0
    resumed_from: Optional[int] = None  # iteration a checkpoint gave (None: from scratch)
    restart_reason: Optional[str] = None  # why an existing checkpoint was not used

    def to_dict(self) -> dict:
        return asdict(self)


def finetune(module: nn.Module, param_groups: list[dict], loss_of: Callable[[torch.Tensor], torch.Tensor],
             num_rows: int, *, iters: int, batch_size: int, seed: int = 0,
             checkpointer: Optional[Checkpointer] = None, checkpoint_every: int = 0, log_every: int = 0,
             progress: bool = True, desc: str = "finetune") -> FinetuneResult:
    """Adam on `param_groups` (parameters of `module`, whose state dict is checkpointed) for `iters`
    iterations; each draws `batch_size` distinct rows of `num_rows` and steps on `loss_of(rows)`."""
    if iters < 1 or batch_size < 1 or num_rows < 1:
        raise FinetuneError(f"{desc}: iters={iters}, batch_size={batch_size} and rows={num_rows} must be >= 1")
    opt = torch.optim.Adam(param_groups)
    gen = torch.Generator().manual_seed(seed)
    start, curve, first = 0, [], None
    resumed = None
    if checkpointer is not None:
        state = checkpointer.load()
        if state is not None:
            module.load_state_dict(state["module"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            start, curve, first = int(state["iteration"]), list(state["curve"]), state["loss_first"]
            resumed = start
            log.info("%s: resuming from iteration %d of %d (%s)", desc, start, iters, checkpointer.path)

    def save(it: int) -> None:
        if checkpointer is not None:
            checkpointer.save({"module": module.state_dict(), "optimizer": opt.state_dict(),
                               "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                               "iteration": it, "curve": curve, "loss_first": first})

    started = time.perf_counter()
    bs = min(batch_size, num_rows)
    loss_v = curve[-1][1] if curve else float("nan")
    with tqdm(total=iters, initial=min(start, iters), desc=desc, unit="it", disable=not progress,
              dynamic_ncols=True, mininterval=2.0) as bar:
        for it in range(start, iters):
            rows = torch.randperm(num_rows, generator=gen)[:bs]
            opt.zero_grad(set_to_none=True)
            loss = loss_of(rows)
            loss_v = float(loss.detach())
            if not math.isfinite(loss_v):
                raise FinetuneError(f"{desc}: the loss is {loss_v} at iteration {it} (of {iters}); the quantized model "
                                    "overflows on these rows (static activation ranges, a too narrow format) or lr is "
                                    "too large")
            loss.backward()
            opt.step()
            if first is None:
                first = loss_v
            if it == 0 or it == iters - 1 or (log_every and (it + 1) % log_every == 0):
                curve.append((it, loss_v))
            bar.update(1)
            if checkpoint_every and (it + 1) % checkpoint_every == 0 and it + 1 < iters:
                save(it + 1)
    if checkpointer is not None and (start < iters or resumed is None):
        save(iters)
    return FinetuneResult(iters=iters, loss_first=float(first), loss_last=float(curve[-1][1] if curve else loss_v),
                          curve=curve, seconds=round(time.perf_counter() - started, 3), resumed_from=resumed,
                          restart_reason=None if checkpointer is None else checkpointer.restart_reason)
