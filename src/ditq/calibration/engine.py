"""The block-wise calibration engine: statistics per segment, one block forward per batch per pass.

    engine = BlockwiseEngine(adapter, qlayers, records, options...)
    report = engine.run(on_segment)        # on_segment(segment, layer_names, stats) quantizes them

For each segment ("pre", block 0 .. n-1, "tail") the engine
  1. streams the inputs of the segment's quantized layers into `LayerStats` (Hessians, ranges)
     while the segment itself runs in full precision, one forward of that segment per batch;
     conditioning-only layers (adaLN, timestep embedder, final adaLN projection) are fed from the
     grid of every label (plus the null label) x every sampler timestep instead, which needs no
     images (records cover only a few (t, y) pairs: their Hessian would be rank-deficient);
  2. calls `on_segment`, which quantizes those layers (GPTQ, ...);
  3. advances the hidden-state stream through the segment: sequentially (the default, as GPTQ
     and BRECQ do) the next segment sees the outputs of the already quantized model; with
     `sequential=False` it sees the full-precision model's outputs (then the stats pass's
     outputs are reused and each block runs once per batch).
Never a whole-model forward per block. The streams live in memory up to `io_budget_mb` and are
spilled to memory-mapped files beyond it.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ditq.quant.modules import full_precision  # noqa: F401  (re-exported: the engine's FP passes)
from ditq.calibration.blocks import PRE, TAIL, BlockCall, BlockRunner, calibration_batches
from ditq.calibration.stats import HessianAccumulator, LayerStats
from ditq.quant.modules import layer_input

log = logging.getLogger(__name__)

SegmentFn = Callable[[Any, list[str], LayerStats], None]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


class TensorStream:
    """A list of tensors kept in memory up to a byte budget, memory-mapped files beyond it."""

    def __init__(self, budget_bytes: int, spill_dir: Path):
        self.budget = budget_bytes
        self.spill_dir = spill_dir
        self.items: list[torch.Tensor] = []
        self.bytes_in_memory = 0
        self.spilled = 0

    def append(self, t) -> None:
        """A tensor, or a tuple of tensors (a U-Net's state: hidden states and skip stack)."""
        if isinstance(t, tuple):
            self.items.append(tuple(self._store(x) for x in t))
        else:
            self.items.append(self._store(t))

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if self.bytes_in_memory + nbytes > self.budget:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"{uuid.uuid4().hex}.pt"
            torch.save(t.cpu().contiguous(), path)
            t = torch.load(path, mmap=True, weights_only=True)
            self.spilled += 1
        else:
            self.bytes_in_memory += nbytes
        return t

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class BlockwiseEngine:
    def __init__(self, adapter, qlayers: dict[str, Any], records: dict[str, torch.Tensor], *,
                 include_uncond: bool, batch_size: int = 32, sequential: bool = True,
                 grid_timesteps: list[int] | None = None, grid_labels: list[int] | None = None,
                 grid_batch: int = 4096, io_budget_mb: float = 2048, spill_root: str | Path | None = None,
                 progress: bool = True, desc: str = "calibration"):
        self.adapter = adapter
        self.runner = adapter.block_runner()
        self.qlayers = qlayers
        self.records = records
        self.include_uncond = include_uncond
        self.batch_size = batch_size
        self.sequential = sequential
        self.grid_timesteps = grid_timesteps
        self.grid_labels = grid_labels
        self.grid_batch = grid_batch
        self.io_budget = int(io_budget_mb * 2**20)
        self.spill_root = Path(spill_root) if spill_root is not None else None
        self.progress = progress
        self.desc = desc
        self.counts = {"capture": 0, "block": 0, "tail": 0, "grid_rows": 0, "grid_s": 0.0}
        self.segment_seconds: dict[str, float] = {}
        self._cond_memo: dict[tuple, HessianAccumulator] = {}

    # ------------------------------------------------------------------ helpers
    def _batches(self):
        return list(calibration_batches(self.records, self.adapter.null_index, self.include_uncond,
                                        self.batch_size))

    def _grid(self):
        """(t, y) chunks of the full condition grid."""
        ts = torch.tensor(self.grid_timesteps, dtype=torch.long)
        ys = torch.tensor(self.grid_labels, dtype=torch.long)
        tt, yy = torch.meshgrid(ts, ys, indexing="ij")
        tt, yy = tt.reshape(-1), yy.reshape(-1)
        for b in range(0, len(tt), self.grid_batch):
            yield tt[b : b + self.grid_batch], yy[b : b + self.grid_batch]

    def _feed_conditioning(self, segment, names: list[str], stats: LayerStats) -> None:
        """Hessians of the conditioning-only layers of `segment` from the condition grid, memoised
        by the layer's input values on the grid's first chunk: identical embedder copies (diffusers
        keeps one per DiT block) and layers fed the same vector (DiT's final adaLN projection sees
        block 0's adaLN input) are accumulated once."""
        todo = list(names)
        memo_key: dict[str, tuple] = {}
        for i, (t, y) in enumerate(self._grid()):
            raw = self.adapter.conditioning_inputs(segment, t, y)
            inputs = {n: layer_input(self.qlayers[n], raw[n]) for n in names}  # after a rotation, if any
            if i == 0:
                for n in names:
                    memo_key[n] = (tuple(inputs[n].shape), _digest(inputs[n]))
                    if memo_key[n] in self._cond_memo:
                        stats.hess[n] = self._cond_memo[memo_key[n]]
                todo = [n for n in names if memo_key[n] not in self._cond_memo]
                if not todo:
                    return
            for n in todo:
                stats.add(n, inputs[n])
            self.counts["grid_rows"] += len(t)
        for n in todo:
            self._cond_memo[memo_key[n]] = stats.hess[n]

    def _stats(self, segment, names: list[str], run_batches: Callable[[], None]) -> LayerStats:
        cond = self.adapter.conditioning_layers() if self.grid_timesteps else {}
        cond_names = [n for n in names if n in cond]
        modules = {n: self.qlayers[n] for n in names}
        stats = LayerStats(modules, skip=set(cond_names))
        with stats:
            run_batches(stats)
        if cond_names:
            t0 = time.perf_counter()
            self._feed_conditioning(segment, cond_names, stats)
            self.counts["grid_s"] += time.perf_counter() - t0
        return stats

    # ------------------------------------------------------------------ the loop
    def run(self, on_segment: SegmentFn) -> dict[str, Any]:
        started = time.perf_counter()
        names_by_segment = self.runner.segment_layers(list(self.qlayers))
        all_q = list(self.qlayers.values())
        batches = self._batches()
        spill_dir = Path(tempfile.mkdtemp(prefix="block_io_", dir=self._spill_parent()))
        segments = [s for s in self.runner.segments()]
        bar = tqdm(total=len(segments), desc=self.desc, unit="segment", disable=not self.progress,
                   dynamic_ncols=True, mininterval=2.0)
        try:
            with ExitStack() as stack:
                if not self.sequential:
                    stack.enter_context(full_precision(all_q))  # FP-input mode: the stream is the FP model's
                with self._timed(PRE, bar):
                    stream, calls = self._pre_and_capture(batches, names_by_segment[PRE], on_segment, spill_dir)
                for k in range(self.runner.num_blocks):
                    with self._timed(k, bar):
                        stream = self._block(k, names_by_segment[k], stream, calls, on_segment, spill_dir)
                with self._timed(TAIL, bar):
                    self._tail(names_by_segment[TAIL], stream, calls, on_segment)
        finally:
            bar.close()
            shutil.rmtree(spill_dir, ignore_errors=True)
        return {"block_forwards": self.counts["block"], "captures": self.counts["capture"],
                "tail_forwards": self.counts["tail"], "grid_rows": self.counts["grid_rows"],
                "grid_s": round(self.counts["grid_s"], 3), "segment_s": self.segment_seconds,
                "batches": len(batches), "rows": int(sum(len(b[0]) for b in batches)),
                "sequential": self.sequential, "seconds": time.perf_counter() - started}

    @contextmanager
    def _timed(self, segment, bar):
        t0 = time.perf_counter()
        yield
        self.segment_seconds[str(segment)] = round(time.perf_counter() - t0, 3)
        bar.update(1)

    def _spill_parent(self) -> str | None:
        if self.spill_root is None:
            return None
        try:
            self.spill_root.mkdir(parents=True, exist_ok=True)
            return str(self.spill_root)
        except OSError as err:
            log.warning("cannot use %s for block I/O spill files (%s); using the system temp dir",
                        self.spill_root, err)
            return None

    def _device(self, *ts):
        dev = self.adapter.device
        return [t.to(dev) for t in ts]

    def _pre_and_capture(self, batches, names, on_segment, spill_dir):
        if names:
            def run_pre(stats):
                with full_precision([self.qlayers[n] for n in names]):
                    for x, t, y in batches:
                        stats.new_batch()
                        self.runner.capture(*self._device(x, t, y))
                        self.counts["capture"] += 1

            on_segment(PRE, names, self._stats(PRE, names, run_pre))
        stream, calls = TensorStream(self.io_budget, spill_dir), []
        for x, t, y in batches:
            hidden, call = self.runner.capture(*self._device(x, t, y))
            self.counts["capture"] += 1
            stream.append(hidden)
            calls.append(call)
        return stream, calls

    def _block(self, k: int, names, stream: TensorStream, calls: list[BlockCall], on_segment, spill_dir):
        out = TensorStream(self.io_budget, spill_dir)
        reuse = not self.sequential  # FP-input mode: the FP stats pass produces the next inputs
        if names:
            def run_block(stats):
                with full_precision([self.qlayers[n] for n in names]):
                    for h, call in zip(stream, calls):
                        stats.new_batch()
                        y = self.runner.run_block(k, h, call)
                        self.counts["block"] += 1
                        if reuse:
                            out.append(y)

            on_segment(k, names, self._stats(k, names, run_block))
            if reuse:
                return out
        for h, call in zip(stream, calls):
            out.append(self.runner.run_block(k, h, call))
            self.counts["block"] += 1
        return out

    def _tail(self, names, stream, calls, on_segment) -> None:
        if not names:
            return

        def run_tail(stats):
            with full_precision([self.qlayers[n] for n in names]):
                for h, call in zip(stream, calls):
                    stats.new_batch()
                    self.runner.finish(h, call)
                    self.counts["tail"] += 1

        on_segment(TAIL, names, self._stats(TAIL, names, run_tail))
