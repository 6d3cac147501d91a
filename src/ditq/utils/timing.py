"""Wall-clock timings of a run's stages, and the measurements benchmarks take (round-robin timing, peak RSS)."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable


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


def time_round_robin(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each function, timed round-robin (every case once per round, after
    `warmup` rounds), so the cases of one benchmark share the machine's load (benchmarks/)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def peak_rss_gib() -> float:
    """This process's peak resident set size in GiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
