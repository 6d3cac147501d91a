"""Condition sources: seed -> condition index, index -> prompt / class label (see the package doc)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

NULL_PROMPT = -1  # index of the empty prompt (the unconditional branch of text models)


class GuidanceError(ValueError):
    """Classifier-free guidance asked of a model without an unconditional condition."""


def _draw(seeds: Sequence[int], n: int, mode: str) -> torch.Tensor:
    """n-way index per seed: `balanced` = seed % n, `random` = drawn from the seed's own stream."""
    from ditq.sampling.seeds import labels_for_seeds

    return labels_for_seeds(list(seeds), n, mode)


class Conditions(ABC):
    """The conditioning of one run (see the package doc)."""

    kind: str  # "class" | "text" | "none"
    null_index: int | None  # the unconditional condition; None: the model has none

    @abstractmethod
    def for_seeds(self, seeds: Sequence[int], mode: str = "balanced") -> torch.Tensor:
        """Condition indices [N] of `seeds` (each a function of its seed alone)."""

    def prompts(self, y: torch.Tensor) -> list[str] | None:
        """The prompt of every index (text conditions), else None."""
        return None

    def labels(self, y: torch.Tensor) -> torch.Tensor | None:
        """The class each index asks for (class accuracy / prompt accuracy), or None when unknown."""
        return None

    def groups_of(self, y: torch.Tensor) -> list[str] | None:
        """The group of every index (e.g. the HPSv2 style of each prompt), or None."""
        return None

    def grid(self, y_records: torch.Tensor) -> torch.Tensor:
        """The conditions whose conditioning-only layer inputs calibration visits (without the null)."""
        return torch.unique(y_records.long())

    @abstractmethod
    def spec(self) -> dict:
        """A JSON-able identity (cache keys of everything that depends on the conditions)."""

    def null_like(self, y: torch.Tensor) -> torch.Tensor:
        if self.null_index is None:
            raise GuidanceError(
                f"classifier-free guidance needs an unconditional condition, and these {self.kind} conditions "
                "have none (an unconditional model): set sampler.cfg_scale=1.0 (and calib.include_uncond=false)"
            )
        return torch.full_like(y, self.null_index)


class ClassConditions(Conditions):
    kind = "class"

    def __init__(self, num_classes: int, null_index: int | None = None):
        self.num_classes = int(num_classes)
        self.null_index = null_index

    def for_seeds(self, seeds, mode="balanced"):
        return _draw(seeds, self.num_classes, mode)

    def labels(self, y):
        return y.long()

    def grid(self, y_records):
        return torch.arange(self.num_classes)

    def spec(self):
        return {"kind": "class", "num_classes": self.num_classes, "null": self.null_index}


class PromptConditions(Conditions):
    """A fixed prompt pool; seed -> pool index; `labels` (optional) the class each prompt asks for."""

    kind = "text"
    null_index = NULL_PROMPT

    def __init__(self, name: str, prompts: Sequence[str], labels: Sequence[int] | None = None,
                 groups: Sequence[str] | None = None):
        from ditq.data.captions import pool_digest

        if not len(prompts):
            raise ValueError(f"prompt set {name!r} is empty: give a prompt file with at least one prompt")
        self.name = name
        self.pool = list(prompts)
        self.class_of = None if labels is None else torch.as_tensor(list(labels), dtype=torch.long)
        self.groups = None if groups is None else list(groups)  # e.g. the HPSv2 style of every prompt
        self.digest = pool_digest(self.pool)

    def __len__(self) -> int:
        return len(self.pool)

    def for_seeds(self, seeds, mode="balanced"):
        return _draw(seeds, len(self.pool), mode)

    def prompts(self, y):
        return ["" if int(i) == NULL_PROMPT else self.pool[int(i)] for i in y]

    def groups_of(self, y):
        return None if self.groups is None else [self.groups[int(i)] for i in y]

    def labels(self, y):
        if self.class_of is None:
            return None
        return self.class_of[y.long().clamp(min=0)]

    def spec(self):
        return {"kind": "text", "name": self.name, "size": len(self.pool), "digest": self.digest}


class NoConditions(Conditions):
    kind = "none"
    null_index = None

    def for_seeds(self, seeds, mode="balanced"):
        return torch.zeros(len(seeds), dtype=torch.long)

    def grid(self, y_records):
        return torch.zeros(1, dtype=torch.long)

    def spec(self):
        return {"kind": "none"}
