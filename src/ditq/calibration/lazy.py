"""A per-run holder of one large calibration artifact: built on first use, freed on purpose.

The pipeline keeps e.g. the layer inputs (about 4.9 GB for DiT-XL/2) in a `Lazy`, hands `get` to
the quantization steps, and calls `release()` once they are done, so sampling runs without them.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Lazy(Generic[T]):
    """`get()` builds the value once (later calls return the same object); `release()` drops it.

    After `release()` the value is gone for good: `get()` raises instead of silently rebuilding a
    large artifact at a stage that should no longer need it.
    """

    def __init__(self, build: Callable[[], T], name: str):
        self._build = build
        self.name = name
        self._value: T | None = None
        self._loaded = False
        self._released = False

    @property
    def loaded(self) -> bool:
        """True while the value is held in memory."""
        return self._loaded

    @property
    def released(self) -> bool:
        return self._released

    def get(self) -> T:
        if self._released:
            raise RuntimeError(
                f"{self.name} were released after the quantization steps to free memory before sampling; "
                f"read them inside a step (Step.apply), not afterwards"
            )
        if not self._loaded:
            self._value = self._build()
            self._loaded = True
        return self._value  # type: ignore[return-value]

    def __call__(self) -> T:  # usable wherever a zero-argument provider is expected (QuantContext.layer_inputs)
        return self.get()

    def replace(self, value: T) -> None:
        """Hold `value` from now on instead of the current one, e.g. the layer inputs after a step
        changed the model exactly (SmoothQuant divides some inputs by per-channel scales). The old
        value is neither rebuilt nor modified (it may be memory-mapped cache files). Refused after
        `release()`."""
        if self._released:
            raise RuntimeError(f"{self.name} were released; replace() them inside a step (Step.apply), not afterwards")
        self._value = value
        self._loaded = True

    def release(self) -> None:
        """Drop the value (callers holding their own reference keep it alive; steps should not)."""
        self._value = None
        self._loaded = False
        self._released = True
