"""CPU execution policy of the fake-quantization kernels: thread count and a scratch buffer.

Fake quantization is a chain of ~10 cheap, memory-bound elementwise ops. On a CPU shared with other
work, every multi-threaded op waits at an OpenMP barrier for a descheduled worker, which can cost
milliseconds per op (30x the op itself on a busy 2-core machine). So on CPU the kernels run with
`kernel_threads` threads (default 1; None follows torch.get_num_threads()); the matmul that follows
keeps torch's setting. CUDA tensors are unaffected.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch

__all__ = ["set_kernel_threads", "get_kernel_threads", "kernel_threads", "scratch"]

_KERNEL_THREADS: Optional[int] = 1
_local = threading.local()


def set_kernel_threads(n: Optional[int]) -> None:
    """Threads for the CPU fake-quant kernels: a positive int, or None to follow torch's setting."""
    global _KERNEL_THREADS
    if n is not None and int(n) < 1:
        raise ValueError(f"kernel threads must be >= 1 or None, got {n}")
    _KERNEL_THREADS = None if n is None else int(n)


def get_kernel_threads() -> Optional[int]:
    return _KERNEL_THREADS


@contextlib.contextmanager
def kernel_threads(x: torch.Tensor) -> Iterator[None]:
    """Run the block with the kernel thread count when x is on the CPU (restored afterwards)."""
    want = _KERNEL_THREADS
    if want is None or x.device.type != "cpu":
        yield
        return
    have = torch.get_num_threads()
    if have == want:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(have)


def scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device, key: str = "tmp") -> Optional[torch.Tensor]:
    """A reusable per-thread CPU buffer of `shape` (contents undefined), or None off the CPU.

    Only for values whose use ends before the next request under the same `key`: reusing one buffer
    avoids the page faults of a fresh multi-megabyte allocation at every call (tens of ms per
    40 MB in a VM).
    """
    if device.type != "cpu":
        return None
    numel = 1
    for s in shape:
        numel *= s
    key = (key, dtype)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)
