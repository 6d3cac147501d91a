"""The interface of a text encoder as the run uses it: prompts -> the tensors the denoiser takes.

A model family implements it (PixArt: T5; Hunyuan-DiT: bilingual CLIP + mT5; the embedded model:
its small T5). `ditq.conditioning.text.prepare_text` calls `encode` on the prompts a run needs
(cached on disk by `fingerprint()` and the prompts' digest) and then `release()`, so the encoder
never sits in memory next to the denoiser.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch

log = logging.getLogger(__name__)


class TextEncoderMismatchError(ValueError):
    """The text encoder's output does not fit the denoiser's caption input."""


class TextEncoder(ABC):
    name: str  # e.g. "t5", "clip+mt5"
    max_tokens: int  # tokens kept per prompt (longer prompts are truncated with a warning)
    hidden_size: int  # width of `embeds`

    @abstractmethod
    def fingerprint(self) -> dict:
        """A JSON-able identity of the weights and tokenizer (cache keys)."""

    @abstractmethod
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"embeds": [N, L, D] float32, "mask": [N, L] long, **extra [N, ...]} for N prompts (CPU)."""

    def release(self) -> None:
        """Free the weights (called once the run's prompts are encoded)."""


def warn_truncated(what: str, n_truncated: int, n_total: int, limit: int) -> None:
    if n_truncated:
        log.warning("%s: %d of %d prompts are longer than the encoder's limit of %d tokens and were truncated",
                    what, n_truncated, n_total, limit)
