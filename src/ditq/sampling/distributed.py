"""Sampling across processes and GPUs under `torchrun` (torch.distributed).

    torchrun --standalone --nproc_per_node=2 -m ditq.cli bits=w8a8 ...

Not under torchrun (WORLD_SIZE unset or 1) nothing here is active and a run behaves as before.
Under torchrun every rank runs the whole pipeline up to sampling identically (load, calibrate,
quantize are deterministic; the DiskCache writes are atomic, so ranks writing the same entry is
safe). Each sampling stage's seeds are cut into shards of `sampler.batch_size` seeds (the shard size
never depends on the world size, so every image is computed in the same batch as in a single-process
run, and image i still depends only on seed i); shard k belongs to rank k % world_size. A rank skips
a shard that is already stored and writes each finished one atomically (payload, then manifest), so
a killed job rerun with the same command continues from the shards already written. A barrier ends
each stage; then rank 0 alone reads every shard in seed order (the images), scores and writes the
row; the other ranks return no row and exit 0.

Where the shards live:
- FP samples: the run's `DiskCache` (kind `samples`), the very entries a single-process run writes.
- Quantized samples: a `ShardStore` under `<paths.cache_dir>/shards/<run_key>/`, named by slot
  (`shard_00003.pt` + `.json` manifest with the store's spec digest, seeds and labels). Keyed by
  the run's identity rather than the Hydra run dir, because every process draws its own run dir
  (`${ditq_uid:}`) and a rerun draws a new one. A shard whose manifest names another spec is refused
  (`ShardMismatchError`), never mixed in; a damaged one is removed and sampled again. Rank 0 removes
  the store once the row is kept (the images are in the row's `samples.npz` when eval.save_samples).

Process group: backend gloo on CPU, nccl on CUDA (each rank on `cuda:LOCAL_RANK`), with a timeout
(`DITQ_DIST_TIMEOUT_S`, default 1800 s) on initialisation and on every barrier; a rank that fails or
is late makes the others stop with `DistributedSamplingError` instead of waiting forever (torchrun
also stops the other ranks as soon as one fails).

Test-only hook: `DITQ_TEST_FAIL_AFTER_SHARDS=<rank>:<n>` makes that rank raise right after it has
written its n-th shard (counted over all stages of the process), to exercise resume in
tests/test_distributed.py. Never set it otherwise.
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ditq.utils.atomic import atomic_write_bytes, atomic_write_text
from ditq.utils.cache import DiskCache, content_key

log = logging.getLogger(__name__)

TIMEOUT_ENV = "DITQ_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
FAIL_HOOK_ENV = "DITQ_TEST_FAIL_AFTER_SHARDS"  # test-only, see the module docstring
SHARD_STORE_VERSION = 1

Build = Callable[[int, list[int], torch.Tensor], torch.Tensor]  # (first index, shard seeds, labels) -> uint8


class DistributedSamplingError(RuntimeError):
    """A rank failed, or another rank did not reach a barrier in time."""


class ShardMismatchError(RuntimeError):
    """A stored shard was written for another run / spec; it is never mixed in."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size and local rank from torchrun's environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedSamplingError(f"environment variable {name}={raw!r} is not an integer; "
                                       "launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK") from None


def from_env() -> Dist:
    """The process's place from torchrun's variables (no torchrun: rank 0 of 1)."""
    world = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local = _int_env("LOCAL_RANK", rank)
    raw_timeout = os.environ.get(TIMEOUT_ENV, "")
    try:
        timeout = float(raw_timeout) if raw_timeout else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedSamplingError(f"{TIMEOUT_ENV}={raw_timeout!r} is not a number of seconds") from None
    if world < 1 or not 0 <= rank < world:
        raise DistributedSamplingError(f"RANK={rank} is not within WORLD_SIZE={world}; launch with torchrun")
    if timeout <= 0:
        raise DistributedSamplingError(f"{TIMEOUT_ENV}={raw_timeout} must be > 0 seconds")
    return Dist(rank=rank, world_size=world, local_rank=local, timeout_s=timeout)


def setup(device: str) -> Dist:
    """Join the process group when launched by torchrun with more than one process (gloo on CPU,
    nccl on CUDA, pinning this rank to cuda:LOCAL_RANK); otherwise a no-op returning rank 0 of 1."""
    d = from_env()
    if not d.enabled:
        return d
    import torch.distributed as tdist

    if not tdist.is_available():
        raise DistributedSamplingError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.startswith("cuda"):
        torch.cuda.set_device(d.local_rank)
    if not tdist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        try:
            tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=d.timeout_s))
        except Exception as err:  # noqa: BLE001 - rendezvous failures come in many types
            raise DistributedSamplingError(
                f"rank {d.rank}/{d.world_size}: joining the {backend} process group failed ({err}); "
                f"start all ranks with the same torchrun command (MASTER_ADDR/MASTER_PORT reachable) "
                f"within {TIMEOUT_ENV}={d.timeout_s:g} s") from err
        atexit.register(_destroy)
        log.info("rank %d/%d joined the %s process group", d.rank, d.world_size, backend)
    return d


def _destroy() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(d: Dist, what: str) -> None:
    """Wait for every rank; a rank that died or is later than the timeout raises a clear error."""
    if not d.enabled:
        return
    import torch.distributed as tdist

    timeout = datetime.timedelta(seconds=d.timeout_s)
    try:
        if tdist.get_backend() == "gloo":  # names the ranks that did not arrive
            tdist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        else:
            tdist.barrier(device_ids=[d.local_rank])
    except Exception as err:  # noqa: BLE001
        raise DistributedSamplingError(
            f"rank {d.rank}/{d.world_size}: waiting for the other ranks after {what} failed ({err}). Another "
            f"rank failed (see its log) or took longer than {TIMEOUT_ENV}={d.timeout_s:g} s. The finished shards "
            "are kept: rerun the same command to continue from them.") from err


# -- shard stores ---------------------------------------------------------------------------------

class CacheShards:
    """Shards kept as DiskCache entries (the FP samples: same entries as a single-process run)."""

    def __init__(self, cache: DiskCache, spec: dict, kind: str = "samples"):
        self.cache, self.spec, self.kind = cache, spec, kind

    def shard_spec(self, seeds: list[int], labels: torch.Tensor) -> dict:
        return {**self.spec, "seeds": [seeds[0], len(seeds)], "labels": labels.tolist()}

    def load(self, k: int, seeds: list[int], labels: torch.Tensor) -> tuple[torch.Tensor, float | None] | None:
        hit = self.cache._load_entry(self.kind, self.shard_spec(seeds, labels))
        if hit is None:
            return None
        seconds = hit[1].get("build_seconds")
        return hit[0], float(seconds) if isinstance(seconds, (int, float)) else None

    def save(self, k: int, seeds: list[int], labels: torch.Tensor, images: torch.Tensor, seconds: float) -> None:
        self.cache.save(self.kind, self.shard_spec(seeds, labels), images, build_seconds=seconds)

    def describe(self) -> str:
        return f"{self.cache.root}/{self.kind}"


class ShardStore:
    """Shards in named slots of one directory, each with a manifest naming the store's spec."""

    def __init__(self, root: str | os.PathLike, spec: dict):
        self.root = Path(root)
        self.spec = {"v": SHARD_STORE_VERSION, **spec}
        self.digest = content_key(self.spec)

    @classmethod
    def for_run(cls, cache_dir: str | os.PathLike, run_key: str, spec: dict) -> "ShardStore":
        return cls(Path(cache_dir) / "shards" / run_key[:16], {"run_key": run_key, **spec})

    def paths(self, k: int) -> tuple[Path, Path]:
        return self.root / f"shard_{k:05d}.pt", self.root / f"shard_{k:05d}.json"

    def load(self, k: int, seeds: list[int], labels: torch.Tensor) -> tuple[torch.Tensor, float | None] | None:
        payload, manifest_path = self.paths(k)
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            log.warning("shard manifest %s unreadable (%s); sampling the shard again", manifest_path, err)
            self.remove(k)
            return None
        want = {"spec_digest": self.digest, "seeds": list(seeds), "labels": labels.tolist()}
        got = {key: manifest.get(key) for key in want}
        if got != want:
            differ = ", ".join(f"{key}: stored {str(got[key])[:60]} != expected {str(want[key])[:60]}"
                               for key in want if got[key] != want[key])
            raise ShardMismatchError(
                f"shard {manifest_path} was written for another run or spec ({differ}); it is not mixed in. "
                f"Delete {self.root} (or that shard) to sample it again, or point paths.cache_dir elsewhere.")
        try:
            data = payload.read_bytes()
        except OSError as err:
            data, problem = b"", f"payload missing ({err})"
        else:
            problem = None
        if problem is None and (len(data) != manifest.get("size")
                                or hashlib.sha256(data).hexdigest() != manifest.get("sha256")):
            problem = "payload does not match its manifest's size/sha256 (truncated?)"
        if problem is None:
            try:
                images = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001
                problem = f"payload cannot be loaded ({err})"
        if problem is not None:
            log.warning("shard %s is damaged: %s; sampling it again", payload, problem)
            self.remove(k)
            return None
        seconds = manifest.get("build_seconds")
        return images, float(seconds) if isinstance(seconds, (int, float)) else None

    def save(self, k: int, seeds: list[int], labels: torch.Tensor, images: torch.Tensor, seconds: float) -> None:
        buf = io.BytesIO()
        torch.save(images, buf)
        data = buf.getvalue()
        payload, manifest_path = self.paths(k)
        manifest = {"spec_digest": self.digest, "spec": self.spec, "shard": k, "seeds": list(seeds),
                    "labels": labels.tolist(), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "build_seconds": round(float(seconds), 6), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_bytes(payload, data)  # payload first: a manifest always has its complete payload
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1, default=str))

    def remove(self, k: int) -> None:
        for p in self.paths(k):
            p.unlink(missing_ok=True)

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def describe(self) -> str:
        return str(self.root)


# -- sharded sampling -----------------------------------------------------------------------------

_written = 0  # shards this process wrote (for the test-only failure hook)


def _fail_hook(d: Dist) -> None:
    global _written
    _written += 1
    raw = os.environ.get(FAIL_HOOK_ENV)
    if not raw:
        return
    try:
        rank, n = (int(v) for v in raw.split(":"))
    except ValueError:
        raise DistributedSamplingError(f"{FAIL_HOOK_ENV}={raw!r} must be <rank>:<shards> (test-only)") from None
    if rank == d.rank and _written >= n:
        raise DistributedSamplingError(f"{FAIL_HOOK_ENV}={raw}: rank {d.rank} fails on purpose after writing "
                                       f"{_written} shard(s) (test-only hook)")


def sample_sharded(d: Dist, store, seeds: list[int], labels: torch.Tensor, shard_size: int, build: Build, *,
                   desc: str, stats: dict | None = None) -> torch.Tensor | None:
    """Sample this rank's missing shards into `store`, wait for all ranks, and (rank 0) return the
    uint8 images of all `seeds` in seed order; other ranks return None. `stats` (rank 0) gets
    produce_s (as recorded in each shard's manifest), cached_shards (present before this stage
    started, on any rank) and shards."""
    starts = list(range(0, len(seeds), shard_size))
    present: set[int] = set()
    for k, b in enumerate(starts):  # every rank looks before any rank samples (the barrier below)
        if store.load(k, seeds[b:b + shard_size], labels[b:b + shard_size]) is not None:
            present.add(k)
    barrier(d, f"checking the stored shards of {desc}")
    mine = [k for k in range(len(starts)) if d.owns(k)]
    log.info("rank %d/%d: %s: %d shard(s) of %d seeds in %s; %d stored, this rank samples %d",
             d.rank, d.world_size, desc, len(starts), shard_size, store.describe(), len(present),
             sum(1 for k in mine if k not in present))
    for k in mine:
        b = starts[k]
        shard_seeds, shard_labels = seeds[b:b + shard_size], labels[b:b + shard_size]
        if k in present:
            log.info("rank %d: %s: shard %d [%d:%d] already stored, skipped", d.rank, desc, k, b, b + len(shard_seeds))
            continue
        t0 = time.perf_counter()
        images = build(b, shard_seeds, shard_labels)
        store.save(k, shard_seeds, shard_labels, images, time.perf_counter() - t0)
        log.info("rank %d: %s: sampled shard %d [%d:%d]", d.rank, desc, k, b, b + len(shard_seeds))
        _fail_hook(d)
    barrier(d, f"sampling {desc}")
    if not d.is_main:
        return None
    out, produce_s = [], 0.0
    for k, b in enumerate(starts):  # the one gather: every shard read once, in seed order
        shard_seeds, shard_labels = seeds[b:b + shard_size], labels[b:b + shard_size]
        t0 = time.perf_counter()
        hit = store.load(k, shard_seeds, shard_labels)
        if hit is None:  # removed or damaged since it was written: rank 0 samples it itself
            log.warning("%s: shard %d missing from %s after sampling; sampling it on rank 0", desc, k, store.describe())
            images = build(b, shard_seeds, shard_labels)
            seconds = time.perf_counter() - t0
            store.save(k, shard_seeds, shard_labels, images, seconds)
        else:
            images, seconds = hit
            seconds = time.perf_counter() - t0 if seconds is None else seconds
        out.append(images)
        produce_s += seconds
    if stats is not None:
        stats.update(produce_s=round(produce_s, 3), cached_shards=len(present), shards=len(starts))
    return torch.cat(out)



def fp_shards(d: Dist, cache: DiskCache, spec: dict) -> tuple[Dist, CacheShards] | None:
    """`sample_images(sharded=...)` for the FP samples: None (unsharded) unless under torchrun."""
    return (d, CacheShards(cache, spec)) if d.enabled else None


def run_shards(d: Dist, cache_dir: str | os.PathLike, run_key: str, spec: dict) -> tuple[Dist, ShardStore] | None:
    """`sample_images(sharded=...)` for a run's quantized samples: None unless under torchrun."""
    return (d, ShardStore.for_run(cache_dir, run_key, spec)) if d.enabled else None
