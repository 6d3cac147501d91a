"""Text embeddings of a run's prompts, looked up by condition index.

A `TextBank` holds, for a sorted set of prompt indices (-1 = the empty prompt), the encoder
outputs a text-conditional denoiser takes: `embeds` [P, L, D] with `mask` [P, L] (1 = token),
plus any `extra` per-prompt tensors a family needs (Hunyuan-DiT: the second encoder's states and
mask). It is built once per run from the cached encoder outputs (the encoder is freed before the
denoiser runs) and handed to the adapter (`adapter.set_text_bank`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TextBank:
    index: torch.Tensor  # [P] long, sorted, unique prompt indices
    embeds: torch.Tensor  # [P, L, D]
    mask: torch.Tensor  # [P, L]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [P, ...]
    encoder: dict = field(default_factory=dict)  # the encoder's fingerprint (for specs)

    def __post_init__(self):
        order = torch.argsort(self.index)
        self.index = self.index[order].long()
        if len(torch.unique(self.index)) != len(self.index):
            raise ValueError("TextBank: duplicate prompt indices")
        self.embeds, self.mask = self.embeds[order], self.mask[order]
        self.extra = {k: v[order] for k, v in self.extra.items()}

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, y: torch.Tensor) -> torch.Tensor:
        """Row of every index in `y`; a KeyError names the indices the bank lacks."""
        y = y.detach().long().cpu()
        pos = torch.searchsorted(self.index, y).clamp(max=len(self.index) - 1)
        bad = self.index[pos] != y
        if bool(bad.any()):
            missing = sorted(set(y[bad].tolist()))
            raise KeyError(
                f"no text embedding for prompt indices {missing[:8]}{' ...' if len(missing) > 8 else ''}: the run "
                "encoded only the prompts of its seeds; call ditq.conditioning.prepare_text(adapter, conditions, "
                "indices) with these indices first"
            )
        return pos

    def lookup(self, y: torch.Tensor, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(embeds [B, L, D], mask [B, L], extra) for condition indices `y` [B]."""
        r = self.rows(y)
        move = (lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)) \
            if device is not None or dtype is not None else (lambda t: t)
        return move(self.embeds[r]), move(self.mask[r]), {k: move(v[r]) for k, v in self.extra.items()}

    def merged(self, other: "TextBank") -> "TextBank":
        """This bank plus the rows of `other` it lacks (same encoder)."""
        if other.encoder != self.encoder:
            raise ValueError("TextBank.merged: the two banks come from different text encoders")
        new = ~torch.isin(other.index, self.index)
        pad = lambda a, b: _pad_cat(a, b[new])  # noqa: E731
        return TextBank(torch.cat([self.index, other.index[new]]), pad(self.embeds, other.embeds),
                        pad(self.mask, other.mask), {k: pad(v, other.extra[k]) for k, v in self.extra.items()},
                        dict(self.encoder))


def _pad_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[1:] == b.shape[1:]:
        return torch.cat([a, b])
    raise ValueError(f"TextBank.merged: row shapes differ ({tuple(a.shape[1:])} vs {tuple(b.shape[1:])})")
