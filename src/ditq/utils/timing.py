"""Wall-clock timings of a run's stages."""
from __future__ import annotations

import time
from contextlib import contextmanager


class Timings:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - t, 3)

    def total(self) -> float:
        return round(time.perf_counter() - self._t0, 3)
