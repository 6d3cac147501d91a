"""Sampling sharded across torchrun ranks (ditq.sampling.distributed), on CPU with gloo.

The 2-process runs launch `python -m torch.distributed.run --standalone --nproc_per_node=2 -m ditq.cli`
(= `torchrun ...`) as a subprocess. torchrun gives each rank OMP_NUM_THREADS=1; CPU results of the
quantized model depend on the thread count in the last bits, so the single-process reference runs
with one thread too (the comparison is about sharding, not threads).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ditq.sampling import distributed as D
from tests.conftest import SHRINK

# 20 seeds in shards of 5: 4 shards, 2 per rank; diagnostics off to keep each run short
OVERRIDES = [o for o in SHRINK if not o.startswith("sampler.batch_size=")] + [
    "sampler.batch_size=5", "method=rtn", "bits=w8a8", "diagnostics.enabled=false"]
DESC = "rtn w8a8"


def _paths(root: Path) -> list[str]:
    return [f"paths.cache_dir={root}/cache", f"paths.results_dir={root}/results"]


def _row(root: Path) -> dict:
    rows = list((root / "results").rglob("rows/*.json"))
    assert len(rows) == 1, rows
    return json.loads(rows[0].read_text())


def _images(row: dict) -> torch.Tensor:
    return torch.from_numpy(np.load(Path(row["output_dir"]) / "samples.npz")["arr_0"])


def _torchrun(root: Path, extra_env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != D.FAIL_HOOK_ENV}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "DITQ_DIST_TIMEOUT_S": "120",
                **(extra_env or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ditq.cli",
           *OVERRIDES, *_paths(root), f"hydra.run.dir={root}/run"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])


def _sampled(log: str, desc: str) -> list[tuple[int, int]]:
    """(rank, shard) of every 'sampled shard' line of one stage."""
    return [(int(r), int(k)) for r, k in re.findall(rf"rank (\d+): {re.escape(desc)}: sampled shard (\d+)", log)]


def _skipped(log: str, desc: str) -> list[int]:
    return [int(k) for k in re.findall(rf"rank \d+: {re.escape(desc)}: shard (\d+) \[\d+:\d+\] already stored", log)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The uninterrupted single-process run (in this process, one thread): its row and images."""
    from hydra import compose, initialize_config_dir

    import ditq.config  # noqa: F401  (registers resolvers)
    from ditq.config import validate_config
    from ditq.paths import config_dir
    from ditq.pipeline import run

    root = tmp_path_factory.mktemp("single")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = validate_config(compose("config", overrides=OVERRIDES + _paths(root)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = run(cfg, output_dir=root / "run", progress=False)
    finally:
        torch.set_num_threads(threads)
    return root, row, _images(row)


@pytest.mark.slow  # ~30 s; the resume test below checks the same equality (and the split) by default
def test_two_ranks_give_the_single_process_images_and_metrics(single, tmp_path):
    root1, row1, images1 = single
    res = _torchrun(tmp_path)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    row = _row(tmp_path)
    assert torch.equal(_images(row), images1)
    assert row["metrics"] == row1["metrics"] and row["run_key"] == row1["run_key"]
    # each stage's 4 shards split 2 / 2 (shard k on rank k % 2), each sampled exactly once
    for desc in ("FP samples", DESC):
        assert sorted(_sampled(log, desc)) == [(0, 0), (0, 2), (1, 1), (1, 3)], desc
    assert len(re.findall(r"result row written", log)) == 1  # rank 0 alone scores and records
    assert row["timings"]["fp_sample_shards"] == 4 and row["timings"]["fp_sample_cached"] == 0
    # the ranks' FP shards are the very cache entries (same keys, same images) of a single-process run
    fp1 = {p.name: torch.load(p, weights_only=True) for p in (root1 / "cache" / "samples").glob("*.pt")}
    fp2 = {p.name: torch.load(p, weights_only=True) for p in (tmp_path / "cache" / "samples").glob("*.pt")}
    assert len(fp2) == 4 and fp1.keys() == fp2.keys() and all(torch.equal(fp1[k], fp2[k]) for k in fp1)
    assert not list((tmp_path / "cache" / "shards").rglob("*.pt"))  # quantized shards removed once the row is kept


def test_killed_run_resumes_from_written_shards(single, tmp_path):
    root1, row1, images1 = single
    # rank 1 writes FP shards 1 and 3, then quantized shard 1, then fails
    failed = _torchrun(tmp_path, {D.FAIL_HOOK_ENV: "1:3"})
    flog = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "fails on purpose" in flog, flog[-4000:]
    assert sorted(_sampled(flog, "FP samples")) == [(0, 0), (0, 2), (1, 1), (1, 3)]  # shard k on rank k % 2
    assert not list((tmp_path / "results").rglob("rows/*.json"))  # an interrupted run writes no row
    stores = list((tmp_path / "cache" / "shards").iterdir())
    assert len(stores) == 1
    present = sorted(int(p.stem.split("_")[1]) for p in stores[0].glob("shard_*.json"))
    assert 1 in present and 3 not in present  # rank 1's first quantized shard kept, its second never written
    written = {p: p.stat().st_mtime_ns for p in [*stores[0].glob("shard_*"), *(tmp_path / "cache" / "samples").glob("*")]}
    assert len(list((tmp_path / "cache" / "samples").glob("*.pt"))) == 4

    res = _torchrun(tmp_path)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert _sampled(log, "FP samples") == [] and sorted(_skipped(log, "FP samples")) == [0, 1, 2, 3]
    assert sorted(k for _, k in _sampled(log, DESC)) == sorted(set(range(4)) - set(present))
    assert sorted(_skipped(log, DESC)) == present
    assert all(p.stat().st_mtime_ns == t for p, t in written.items() if p.parent.name == "samples")
    row = _row(tmp_path)
    assert row["metrics"] == row1["metrics"]
    assert torch.equal(_images(row), images1)
    assert row["timings"]["fp_sample_cached"] == 4
    assert len(re.findall(r"result row written", log)) == 1  # rank 0 alone scores and records
    # the ranks' FP shards are the very cache entries (same keys, same images) of a single-process run
    fp1 = {p.name: torch.load(p, weights_only=True) for p in (root1 / "cache" / "samples").glob("*.pt")}
    fp2 = {p.name: torch.load(p, weights_only=True) for p in (tmp_path / "cache" / "samples").glob("*.pt")}
    assert len(fp2) == 4 and fp1.keys() == fp2.keys() and all(torch.equal(fp1[k], fp2[k]) for k in fp1)
    assert not list((tmp_path / "cache" / "shards").rglob("shard_*"))  # quantized shards removed with the row kept


def _labels(seeds):
    return torch.tensor([s % 10 for s in seeds])


def _fake_images(seeds):
    return torch.stack([torch.full((1, 2, 2), s % 256, dtype=torch.uint8) for s in seeds])


def test_shard_of_another_run_is_refused(tmp_path):
    seeds = [0, 1, 2]
    mine = D.ShardStore(tmp_path / "mine", {"run_key": "aaaa", "v": 1})
    other = D.ShardStore(tmp_path / "other", {"run_key": "bbbb", "v": 1})
    other.save(0, seeds, _labels(seeds), _fake_images(seeds), 0.1)
    (tmp_path / "mine").mkdir()
    for src, dst in zip(other.paths(0), mine.paths(0)):  # a shard of another run copied into this store
        dst.write_bytes(src.read_bytes())
    with pytest.raises(D.ShardMismatchError, match=r"shard_00000\.json was written for another run.*spec_digest"):
        mine.load(0, seeds, _labels(seeds))
    # same run, other seeds in that slot: refused as well
    mine.save(1, [5, 6, 7], _labels([5, 6, 7]), _fake_images([5, 6, 7]), 0.1)
    with pytest.raises(D.ShardMismatchError, match="seeds"):
        mine.load(1, [3, 4, 5], _labels([3, 4, 5]))
    # the refusal comes before any sampling in sample_sharded
    built = []
    with pytest.raises(D.ShardMismatchError):
        D.sample_sharded(D.Dist(), mine, [0, 1, 2, 3, 4, 5], _labels(range(6)), 3,
                         lambda b, s, y: built.append(b) or _fake_images(s), desc="x")
    assert built == []


def test_damaged_shard_is_sampled_again_and_stored_ones_are_skipped(tmp_path):
    seeds = list(range(10))
    store = D.ShardStore(tmp_path / "s", {"run_key": "k"})
    store.save(1, seeds[3:6], _labels(seeds[3:6]), _fake_images(seeds[3:6]), 2.0)
    store.save(2, seeds[6:9], _labels(seeds[6:9]), _fake_images(seeds[6:9]), 2.0)
    payload = store.paths(2)[0]
    payload.write_bytes(payload.read_bytes()[:20])  # truncated
    built = []

    def build(b, s, y):
        built.append(b)
        return _fake_images(s)

    stats = {}
    out = D.sample_sharded(D.Dist(), store, seeds, _labels(seeds), 3, build, desc="x", stats=stats)
    assert torch.equal(out, _fake_images(seeds))
    assert built == [0, 6, 9]  # shard 1 was stored; shard 2 damaged, sampled again
    assert stats["cached_shards"] == 1 and stats["shards"] == 4
    assert all(store.load(k, seeds[3 * k:3 * k + 3], _labels(seeds[3 * k:3 * k + 3])) is not None for k in range(4))


def test_environment_outside_torchrun_is_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not D.setup("cpu").enabled and D.fp_shards(D.from_env(), None, {}) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not D.from_env().enabled
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(D.DistributedSamplingError, match="RANK=2 is not within WORLD_SIZE=2"):
        D.from_env()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(D.TIMEOUT_ENV, "soon")
    with pytest.raises(D.DistributedSamplingError, match="DITQ_DIST_TIMEOUT_S"):
        D.from_env()
    monkeypatch.delenv(D.TIMEOUT_ENV)
    d = D.from_env()
    assert d.enabled and not d.is_main and [k for k in range(5) if d.owns(k)] == [1, 3]


_LATE_RANK = """
import sys, time
from pathlib import Path
from ditq.sampling import distributed as D
d = D.setup("cpu")
if d.rank == 1:  # alive but not at the barrier in time (stuck, or much slower)
    time.sleep(3)
    sys.exit(0)
try:
    D.barrier(d, "sampling test")
except D.DistributedSamplingError as err:
    Path(sys.argv[1]).write_text(str(err))
"""


def test_a_rank_missing_the_barrier_stops_rank_0_with_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0_error.txt"
    procs = [subprocess.Popen([sys.executable, "-c", _LATE_RANK, str(out)],
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), D.TIMEOUT_ENV: "1"})
             for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    msg = out.read_text()
    assert "rank 0/2: waiting for the other ranks after sampling test failed" in msg
    assert "DITQ_DIST_TIMEOUT_S=1 s" in msg and "rerun the same command" in msg
