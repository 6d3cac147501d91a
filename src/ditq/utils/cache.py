"""A content-keyed, verified, atomically written disk cache for expensive artifacts.

An entry is produced by a *spec*: a JSON-able dict naming everything that determines the
artifact (model, sampler, seeds, code version, ...). Its key is a hash of the canonical JSON
of the spec, so a changed input yields a new entry and never a stale one.

Each entry is two files in `<root>/<kind>/`:
  `<key>.pt`    the payload (torch.save, loaded with weights_only=True),
  `<key>.json`  the manifest: kind, key, spec, payload size and sha256, creation time and
                `build_seconds` (how long producing the artifact took; a hit reports it).
Both are written to a temporary file and renamed into place (payload first, manifest last),
so an interrupted write leaves no entry. On load the manifest must name the requested kind,
key and (canonical) spec, and the payload must match its size and sha256; anything else (a
truncated payload, an entry copied over another key) is reported, deleted and rebuilt, never used.

A cache that cannot be written (read-only directory, disk full, a path under a regular file)
never fails a run: the first OSError is reported once per `DiskCache`, writing stops, and the
run carries on uncached (existing entries are still read). A failed write leaves no partial entry.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ditq.utils.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_key(spec: dict, length: int = 16) -> str:
    """A short stable hash of a spec dict (order of keys does not matter)."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:length]


class CacheCorruptError(RuntimeError):
    """A cache entry exists but does not match its manifest or the request."""


@dataclass(frozen=True)
class CacheRecord:
    """What `DiskCache.get_or_create_record` returns."""

    value: Any
    cached: bool  # served from the cache (True) or built by this call
    build_seconds: float | None  # time it took to PRODUCE the value (on a hit: as recorded when it was built;
    # None for an entry written before ditq recorded it)


class DiskCache:
    """`get_or_create(kind, spec, build)` returns the cached artifact or builds and stores it."""

    def __init__(self, root: str | os.PathLike, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled
        self.write_error: str | None = None  # set (and reported once) when the cache cannot be written

    def paths(self, kind: str, key: str) -> tuple[Path, Path]:
        d = self.root / kind
        return d / f"{key}.pt", d / f"{key}.json"

    def load(self, kind: str, spec: dict) -> Any | None:
        """The cached payload for `spec`, or None if absent. Unusable entries are removed."""
        hit = self._load_entry(kind, spec)
        return None if hit is None else hit[0]

    def _load_entry(self, kind: str, spec: dict) -> tuple[Any, dict] | None:
        if not self.enabled:
            return None
        key = content_key(spec)
        payload_path, manifest_path = self.paths(kind, key)
        try:
            if not manifest_path.is_file():
                return None
        except OSError:
            return None
        try:
            return self._read_verified(payload_path, manifest_path, kind, key, spec)
        except CacheCorruptError as err:
            log.warning("cache entry %s/%s is unusable (%s); removing it and rebuilding", kind, key, err)
            self.remove(kind, key)
            return None

    def _read_verified(self, payload_path: Path, manifest_path: Path, kind: str, key: str,
                       spec: dict) -> tuple[Any, dict]:
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise CacheCorruptError(f"manifest {manifest_path.name} unreadable: {err}") from err
        if not isinstance(manifest, dict):
            raise CacheCorruptError(f"manifest {manifest_path.name} is not a JSON object")
        if manifest.get("kind") != kind or manifest.get("key") != key:
            raise CacheCorruptError(
                f"manifest {manifest_path.name} belongs to {manifest.get('kind')}/{manifest.get('key')}, "
                f"not {kind}/{key} (an entry copied over another?)")
        if canonical_json(manifest.get("spec")) != canonical_json(json.loads(canonical_json(spec))):
            raise CacheCorruptError(f"manifest {manifest_path.name} records a different spec than the one requested")
        try:
            data = payload_path.read_bytes()
        except OSError as err:
            raise CacheCorruptError(f"payload {payload_path.name} missing: {err}") from err
        if len(data) != manifest.get("size"):
            raise CacheCorruptError(
                f"payload {payload_path.name} has {len(data)} bytes, manifest says {manifest.get('size')} (truncated?)"
            )
        if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            raise CacheCorruptError(f"payload {payload_path.name} does not match its sha256")
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), manifest
        except Exception as err:  # noqa: BLE001 - any unpickling failure means corrupt
            raise CacheCorruptError(f"payload {payload_path.name} cannot be loaded: {err}") from err

    def _write_failed(self, err: OSError) -> None:
        if self.write_error is None:
            self.write_error = f"{type(err).__name__}: {err}"
            log.warning("cache directory %s cannot be written (%s); continuing without caching: new artifacts "
                        "are not stored for the rest of this run (existing entries are still read). Free space "
                        "or set paths.cache_dir to a writable directory.", self.root, self.write_error)

    def save(self, kind: str, spec: dict, payload: Any, build_seconds: float | None = None) -> Path | None:
        """Store an entry; returns its payload path, or None when the cache cannot be written
        (reported once; no partial entry is left)."""
        if self.write_error is not None:
            return None
        key = content_key(spec)
        payload_path, manifest_path = self.paths(kind, key)
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        manifest = {
            "kind": kind,
            "key": key,
            "spec": spec,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "build_seconds": None if build_seconds is None else round(float(build_seconds), 6),
        }
        payload_written = False
        try:
            atomic_write_bytes(payload_path, data)
            payload_written = True
            atomic_write_text(manifest_path, json.dumps(manifest, indent=1, default=str))
        except OSError as err:
            self._write_failed(err)
            if payload_written:  # a payload without its manifest is no entry: drop both halves
                self.remove(kind, key)
            return None
        return payload_path

    def remove(self, kind: str, key: str) -> None:
        for p in self.paths(kind, key):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                self._write_failed(err)

    def get_or_create_record(self, kind: str, spec: dict, build: Callable[[], Any]) -> CacheRecord:
        """Like `get_or_create`, and says whether the value came from the cache and how long it
        took to produce (measured now, or as recorded in the manifest when it was built)."""
        hit = self._load_entry(kind, spec)
        if hit is not None:
            log.info("cache hit: %s/%s", kind, content_key(spec))
            seconds = hit[1].get("build_seconds")
            return CacheRecord(hit[0], True, float(seconds) if isinstance(seconds, (int, float)) else None)
        t0 = time.perf_counter()
        payload = build()
        seconds = time.perf_counter() - t0
        if self.enabled:
            self.save(kind, spec, payload, build_seconds=seconds)
        return CacheRecord(payload, False, seconds)

    def get_or_create(self, kind: str, spec: dict, build: Callable[[], Any]) -> Any:
        return self.get_or_create_record(kind, spec, build).value
