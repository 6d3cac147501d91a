"""Cache identity and robustness: a checkpoint is identified by its whole content (memoised hash),
non-finite weights are refused at load, an entry is served only for the key/kind/spec it was built
for, an unwritable cache never fails a run, and the FP row reports production, not load, time."""
import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

from ditq.config import validate_config
from ditq.utils import filehash
from ditq.utils.cache import DiskCache, content_key
from tests.conftest import SHRINK

ASSET = Path(__file__).resolve().parents[1] / "src" / "ditq" / "assets" / "tiny_dit_digits"
WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def memo_in_tmp(tmp_path, monkeypatch):
    """Keep the file-hash memo of these tests out of the user's cache dir."""
    memo = tmp_path / "memo" / "file_sha256.json"
    monkeypatch.setenv(filehash.MEMO_ENV, str(memo))
    return memo


@pytest.fixture
def model_copy(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(ASSET, dst)
    return dst


def _tensor_at_middle(path: Path) -> tuple[str, int]:
    """(name, absolute byte offset of its first element) of the tensor stored at the file's middle."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    mid = path.stat().st_size // 2
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        if 8 + n + a <= mid < 8 + n + b:
            assert info["dtype"] == "F32"
            return name, 8 + n + a
    raise AssertionError("no tensor at the middle of the file")


def _adapter(compose, model_dir):
    from omegaconf import OmegaConf

    from ditq.config.schema import ModelConfig
    from ditq.models import load_adapter

    cfg = ModelConfig(name="tiny_dit_digits", weights="local", path=str(model_dir), num_classes=10,
                      obtain_hint="rebuild them with `python -m ditq.train.tiny_dit --out <model.path>`")
    return load_adapter(OmegaConf.structured(cfg))


# -- 1. the checkpoint's identity covers its whole content ----------------------------------------
def test_weights_changed_in_the_middle_change_the_fingerprint(compose, model_copy):
    from safetensors.torch import load_file

    before = _adapter(compose, model_copy).fingerprint()
    path = model_copy / WEIGHTS
    size = path.stat().st_size
    name, offset = _tensor_at_middle(path)
    original = load_file(path)[name].clone()
    with open(path, "r+b") as f:  # one weight of a tensor in the middle, file size kept
        f.seek(offset)
        (v,) = struct.unpack("<f", f.read(4))
        f.seek(offset)
        f.write(struct.pack("<f", v + 0.5))
    assert path.stat().st_size == size
    assert not torch.equal(load_file(path)[name], original)  # the weights really changed
    after = _adapter(compose, model_copy).fingerprint()
    assert after != before
    assert after["files"][str(WEIGHTS)] == hashlib.sha256(path.read_bytes()).hexdigest()


def _count_reads(monkeypatch) -> list[Path]:
    reads: list[Path] = []
    real = filehash.sha256_stream

    def counting(path, *a, **k):
        reads.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(filehash, "sha256_stream", counting)
    return reads


def _tick() -> None:
    """Let the file's ctime fall out of the racy window (ctime cannot be set, so wait a tick)."""
    time.sleep(0.05)


def test_memo_avoids_rereading_and_is_invalidated_by_size_and_mtime(tmp_path, monkeypatch, memo_in_tmp):
    monkeypatch.setattr(filehash, "RACY_WINDOW_NS", 0)
    reads = _count_reads(monkeypatch)
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(3 << 20))
    _tick()
    d1 = filehash.file_sha256(f)
    assert d1 == hashlib.sha256(f.read_bytes()).hexdigest() and len(reads) == 1
    assert filehash.file_sha256(f) == d1 and len(reads) == 1, "an unchanged file must come from the memo"
    assert str(f.resolve()) in json.loads(memo_in_tmp.read_text())["entries"]

    # same size, content changed in the middle, mtime moved: re-hashed
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _tick()
    d2 = filehash.file_sha256(f)
    assert len(reads) == 2 and d2 != d1 and d2 == hashlib.sha256(bytes(data)).hexdigest()
    assert filehash.file_sha256(f) == d2 and len(reads) == 2

    # size changed: re-hashed
    f.write_bytes(bytes(data) + b"x")
    _tick()
    assert filehash.file_sha256(f) == hashlib.sha256(bytes(data) + b"x").hexdigest() and len(reads) == 3

    # mtime alone changed (touch): re-hashed, same digest
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 5 * 10**9))
    _tick()
    filehash.file_sha256(f)
    assert len(reads) == 4


def test_content_replaced_with_same_size_and_mtime_is_rehashed(tmp_path, monkeypatch):
    """`cp -p` of another file of the same size keeps size and mtime; ctime still moves."""
    monkeypatch.setattr(filehash, "RACY_WINDOW_NS", 0)
    reads = _count_reads(monkeypatch)
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    _tick()
    d1 = filehash.file_sha256(f)
    st = f.stat()
    _tick()
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    assert filehash.file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest() != d1
    assert len(reads) == 2


def test_fresh_file_is_not_memoised(tmp_path, monkeypatch, memo_in_tmp):
    """A write in the same timestamp tick as the hashing could leave size and times unchanged."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    filehash.file_sha256(f)
    assert filehash.lookup(f) is None


def test_checkpoint_memo_is_used_by_the_fingerprint(compose, model_copy, monkeypatch):
    monkeypatch.setattr(filehash, "RACY_WINDOW_NS", 0)
    time.sleep(0.05)
    reads = _count_reads(monkeypatch)
    adapter = _adapter(compose, model_copy)
    first = adapter.fingerprint()
    n = len(reads)
    assert n >= 2  # transformer weights + config (+ scheduler config)
    assert adapter.fingerprint() == first and len(reads) == n


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", '{"version": 1, "entries": 7}'])
def test_corrupt_memo_is_rebuilt(tmp_path, monkeypatch, memo_in_tmp, caplog, garbage):
    monkeypatch.setattr(filehash, "RACY_WINDOW_NS", 0)
    f = tmp_path / "w.bin"
    f.write_bytes(b"z" * 5000)
    time.sleep(0.05)
    memo_in_tmp.parent.mkdir(parents=True)
    memo_in_tmp.write_text(garbage)
    with caplog.at_level(logging.WARNING, logger="ditq.utils.filehash"):
        assert filehash.file_sha256(f) == hashlib.sha256(b"z" * 5000).hexdigest()
    assert "corrupt" in caplog.text and str(memo_in_tmp) in caplog.text
    memo = json.loads(memo_in_tmp.read_text())  # rewritten whole
    assert memo["entries"][str(f.resolve())]["sha256"] == hashlib.sha256(b"z" * 5000).hexdigest()
    assert filehash.lookup(f) is not None


def test_unwritable_memo_never_fails(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv(filehash.MEMO_ENV, str(blocker / "memo.json"))
    monkeypatch.setattr(filehash, "RACY_WINDOW_NS", 0)
    f = tmp_path / "w.bin"
    f.write_bytes(b"q" * 100)
    time.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="ditq.utils.filehash"):
        assert filehash.file_sha256(f) == hashlib.sha256(b"q" * 100).hexdigest()
        assert filehash.file_sha256(f) == hashlib.sha256(b"q" * 100).hexdigest()
    assert caplog.text.count("cannot be written") == 1


# -- 1b. non-finite weights are refused at load ---------------------------------------------------
def _poison(model_dir: Path, value: float) -> str:
    from safetensors.torch import load_file, save_file

    path = model_dir / WEIGHTS
    state = load_file(path)
    name = "transformer_blocks.3.attn1.to_k.weight"
    state[name][0, :3] = value
    save_file(state, path, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(compose, model_copy, value):
    name = _poison(model_copy, value)
    with pytest.raises(ValueError) as err:
        _adapter(compose, model_copy)
    assert type(err.value).__name__ == "NonFiniteWeightsError"
    msg = str(err.value)
    assert name in msg and "1 tensor(s)" in msg and "NaN/Inf" in msg
    assert ("3 NaN" if value != value else "3 Inf") in msg
    assert "tiny_dit_digits" in msg and "intact copy" in msg


def test_non_finite_model_fails_before_any_sampling(compose, model_copy, tmp_path):
    from ditq.pipeline import run

    _poison(model_copy, float("nan"))
    cfg = validate_config(compose(SHRINK + [f"model.path={model_copy}", "bits=fp", f"paths.cache_dir={tmp_path}/cache",
                                            f"paths.results_dir={tmp_path}/results"]))
    with pytest.raises(ValueError, match="NaN/Inf"):
        run(cfg, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "cache" / "samples").exists()
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.json"))


# -- 2. an entry is served only for the key, kind and spec it was built for ---------------------------
def test_entry_copied_over_another_key_is_not_served(tmp_path, caplog):
    cache = DiskCache(tmp_path)
    a, b = {"model": "a"}, {"model": "b"}
    cache.get_or_create("samples", a, lambda: torch.full((3,), 1.0))
    cache.get_or_create("samples", b, lambda: torch.full((3,), 2.0))
    pa, ma = cache.paths("samples", content_key(a))
    pb, mb = cache.paths("samples", content_key(b))
    shutil.copyfile(pa, pb)  # the pair of a copied over b's files
    shutil.copyfile(ma, mb)
    rebuilt = []
    out = cache.get_or_create("samples", b, lambda: rebuilt.append(1) or torch.full((3,), 2.0))
    assert rebuilt == [1] and torch.equal(out, torch.full((3,), 2.0))
    assert "unusable" in caplog.text
    assert torch.equal(cache.load("samples", b), torch.full((3,), 2.0))  # whole again
    assert torch.equal(cache.load("samples", a), torch.full((3,), 1.0))  # the source is untouched


def test_manifest_with_the_right_key_but_another_spec_is_not_served(tmp_path):
    cache = DiskCache(tmp_path)
    spec = {"model": "a", "n": 1}
    cache.save("k", spec, torch.ones(2))
    _, manifest_path = cache.paths("k", content_key(spec))
    manifest = json.loads(manifest_path.read_text())
    manifest["spec"] = {"model": "a", "n": 2}
    manifest_path.write_text(json.dumps(manifest))
    assert cache.load("k", spec) is None
    assert not manifest_path.exists()


def test_entry_of_another_kind_is_not_served(tmp_path):
    cache = DiskCache(tmp_path)
    spec = {"model": "a"}
    cache.save("calib_inputs", spec, torch.ones(2))
    key = content_key(spec)
    src_p, src_m = cache.paths("calib_inputs", key)
    dst_p, dst_m = cache.paths("samples", key)
    dst_p.parent.mkdir(parents=True)
    shutil.copyfile(src_p, dst_p)
    shutil.copyfile(src_m, dst_m)
    assert cache.load("samples", spec) is None
    assert torch.equal(cache.load("calib_inputs", spec), torch.ones(2))


# -- 3. an unwritable cache never fails a run ---------------------------------------------------------
def _cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]


def test_disk_full_warns_once_and_carries_on(tmp_path, monkeypatch, caplog):
    import ditq.utils.cache as cache_mod

    cache = DiskCache(tmp_path / "cache")
    cache.get_or_create("k", {"s": 0}, lambda: torch.zeros(2))  # written while there was space

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", full)
    builds = []
    for i in range(1, 4):
        out = cache.get_or_create("k", {"s": i}, lambda i=i: builds.append(i) or torch.full((2,), float(i)))
        assert torch.equal(out, torch.full((2,), float(i)))
    assert builds == [1, 2, 3]
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1 and str(tmp_path / "cache") in warnings[0] and "No space left" in warnings[0]
    # loading still works, and nothing partial was left
    assert torch.equal(cache.get_or_create("k", {"s": 0}, lambda: pytest.fail("must be a hit")), torch.zeros(2))
    assert sorted(p.name for p in (tmp_path / "cache" / "k").iterdir()) == sorted(
        p.name for p in cache.paths("k", content_key({"s": 0})))


def test_failed_manifest_write_leaves_no_payload(tmp_path, monkeypatch, caplog):
    import ditq.utils.cache as cache_mod

    def fail(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod, "atomic_write_text", fail)
    cache = DiskCache(tmp_path)
    assert cache.save("k", {"s": 1}, torch.ones(3)) is None
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(_cache_warnings(caplog)) == 1


def test_cache_under_a_regular_file_warns_once(tmp_path, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    cache = DiskCache(blocker / "cache")
    for i in range(3):
        assert torch.equal(cache.get_or_create("k", {"s": i}, lambda: torch.ones(1)), torch.ones(1))
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1 and str(blocker / "cache") in warnings[0]


def test_run_with_an_unwritable_cache_completes(compose, tmp_path, caplog):
    from ditq.pipeline import run

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    cfg = validate_config(compose(SHRINK + ["bits=w8a8", f"paths.cache_dir={blocker}/cache",
                                            f"paths.results_dir={tmp_path}/results"]))
    with caplog.at_level(logging.WARNING):
        row = run(cfg, output_dir=tmp_path / "out", progress=False)
    assert {"fid", "psnr"} <= set(row["metrics"])
    assert row["timings"]["fp_sample_cached"] == 0
    assert len(_cache_warnings(caplog)) == 1


# -- 4. the FP row's sampling time is the production time -------------------------------------------
def test_fp_row_sample_time_on_a_warm_cache_is_the_production_time(compose, tmp_path):
    from ditq.pipeline import run

    def fp_row(out):  # own results dir each: an identical finished run would be skipped, not re-run
        cfg = validate_config(compose(SHRINK + ["bits=fp", f"paths.cache_dir={tmp_path}/cache",
                                                f"paths.results_dir={tmp_path}/results_{out}"]))
        return run(cfg, output_dir=tmp_path / out, progress=False)

    cold = fp_row("cold")
    warm = fp_row("warm")
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "samples").glob("*.json")]
    produced = sum(m["build_seconds"] for m in manifests)
    assert len(manifests) == 2 and all(m["build_seconds"] > 0 for m in manifests)
    assert cold["timings"]["fp_sample_cached"] == 0 and warm["timings"]["fp_sample_cached"] == 2
    assert warm["timings"]["fp_sample_shards"] == 2
    assert cold["timings"]["sample_s"] == pytest.approx(produced, abs=2e-3)
    assert warm["timings"]["sample_s"] == pytest.approx(produced, abs=2e-3)
    # and it is not the (much shorter) cache load
    assert warm["timings"]["fp_sample"] < warm["timings"]["sample_s"]


def test_cache_record_reports_build_time_on_hit(tmp_path):
    cache = DiskCache(tmp_path)

    def slow():
        time.sleep(0.2)
        return torch.ones(1)

    first = cache.get_or_create_record("k", {"s": 1}, slow)
    second = cache.get_or_create_record("k", {"s": 1}, slow)
    assert not first.cached and second.cached
    assert first.build_seconds >= 0.2
    assert second.build_seconds == pytest.approx(first.build_seconds, abs=1e-5)
