import json

import pytest
import torch

from ditq.utils.cache import DiskCache, content_key


def test_key_ignores_dict_order():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_get_or_create_builds_once(tmp_path):
    cache = DiskCache(tmp_path)
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(5.0)}

    a = cache.get_or_create("k", {"s": 1}, build)
    b = cache.get_or_create("k", {"s": 1}, build)
    assert len(calls) == 1
    assert torch.equal(a["x"], b["x"])


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage_manifest", "missing_payload"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, damage, caplog):
    cache = DiskCache(tmp_path)
    spec = {"s": 2}
    cache.get_or_create("k", spec, lambda: torch.ones(1000))
    payload, manifest = cache.paths("k", content_key(spec))
    if damage == "truncate":
        payload.write_bytes(payload.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(payload.read_bytes())
        data[len(data) // 2] ^= 0xFF
        payload.write_bytes(bytes(data))
    elif damage == "garbage_manifest":
        manifest.write_text("{not json")
    else:
        payload.unlink()
    rebuilt = []
    out = cache.get_or_create("k", spec, lambda: rebuilt.append(1) or torch.zeros(3))
    assert rebuilt == [1], "a damaged entry must never be used"
    assert torch.equal(out, torch.zeros(3))
    assert "unusable" in caplog.text
    # and the rebuilt entry is whole again
    assert torch.equal(cache.load("k", spec), torch.zeros(3))


def test_failed_build_leaves_no_entry(tmp_path):
    cache = DiskCache(tmp_path)

    def build():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_create("k", {"s": 3}, build)
    assert not list((tmp_path).rglob("*.pt")) and not list(tmp_path.rglob("*.json"))


def test_manifest_records_spec(tmp_path):
    cache = DiskCache(tmp_path)
    cache.save("k", {"model": "m", "n": 3}, torch.zeros(1))
    manifest = json.loads(next((tmp_path / "k").glob("*.json")).read_text())
    assert manifest["spec"] == {"model": "m", "n": 3}
