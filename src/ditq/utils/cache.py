"""A content-keyed, verified, atomically written disk cache for expensive artifacts.

An entry is produced by a *spec*: a JSON-able dict naming everything that determines the
artifact (model, sampler, seeds, code version, ...). Its key is a hash of the canonical JSON
of the spec, so a changed input yields a new entry and never a stale one.

Each entry is two files in `<root>/<kind>/`:
  `<key>.pt`    the payload (torch.save, loaded with weights_only=True),
  `<key>.json`  the manifest: spec, payload size and sha256, creation time.
Both are written to a temporary file and renamed into place (payload first, manifest last),
so an interrupted write leaves no entry. On load the payload is checked against the
manifest; a truncated or corrupt payload is reported, deleted and rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
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
    """A cache entry exists but does not match its manifest."""


class DiskCache:
    """`get_or_create(kind, spec, build)` returns the cached artifact or builds and stores it."""

    def __init__(self, root: str | os.PathLike, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def paths(self, kind: str, key: str) -> tuple[Path, Path]:
        d = self.root / kind
        return d / f"{key}.pt", d / f"{key}.json"

    def load(self, kind: str, spec: dict) -> Any | None:
        """The cached payload for `spec`, or None if absent. Corrupt entries are removed."""
        if not self.enabled:
            return None
        key = content_key(spec)
        payload_path, manifest_path = self.paths(kind, key)
        if not manifest_path.exists():
            return None
        try:
            return self._read_verified(payload_path, manifest_path)
        except CacheCorruptError as err:
            log.warning("cache entry %s/%s is unusable (%s); removing it and rebuilding", kind, key, err)
            self.remove(kind, key)
            return None

    def _read_verified(self, payload_path: Path, manifest_path: Path) -> Any:
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CacheCorruptError(f"manifest {manifest_path.name} unreadable: {err}") from err
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
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means corrupt
            raise CacheCorruptError(f"payload {payload_path.name} cannot be loaded: {err}") from err

    def save(self, kind: str, spec: dict, payload: Any) -> Path:
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
        }
        atomic_write_bytes(payload_path, data)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1, default=str))
        return payload_path

    def remove(self, kind: str, key: str) -> None:
        for p in self.paths(kind, key):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def get_or_create(self, kind: str, spec: dict, build: Callable[[], Any]) -> Any:
        cached = self.load(kind, spec)
        if cached is not None:
            log.info("cache hit: %s/%s", kind, content_key(spec))
            return cached
        payload = build()
        if self.enabled:
            self.save(kind, spec, payload)
        return payload
