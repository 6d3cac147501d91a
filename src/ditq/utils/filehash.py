"""Whole-file sha256 of (large) files, memoised on disk so a multi-GB checkpoint is read once.

`file_sha256(path)` hashes the whole file (streamed in 4 MiB chunks) and remembers the digest
in a small JSON memo keyed by the resolved path, with the file's size, mtime_ns and ctime_ns.
A later call reuses the digest only while all three still match; any other entry is ignored
and replaced. ctime cannot be set by tools (unlike mtime, which `cp -p`/`rsync -t` copy), so a
file replaced in place by one of the same size and mtime is still re-hashed.

Where the memo lives: `$DITQ_HASH_MEMO` if set, else `$XDG_CACHE_HOME/ditq/file_sha256.json`
(`~/.cache/ditq/file_sha256.json`). It is per user, not per run cache: a file's digest does not
depend on which cache a run uses. The memo is written atomically; an unreadable or corrupt memo
is reported and rebuilt, an unwritable one is reported once and the digest is simply not
remembered. Neither ever fails the caller.

Racy files: a file whose ctime is less than `RACY_WINDOW_NS` old when hashing starts is hashed
but not memoised (as git's "racily clean" rule): a write in the same timestamp tick as the
hashing would otherwise leave size and times unchanged and the stale digest trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from ditq.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

MEMO_ENV = "DITQ_HASH_MEMO"
MEMO_VERSION = 1
CHUNK = 1 << 22
RACY_WINDOW_NS = 2_000_000_000  # 2 s: covers coarse (FAT, network) timestamp granularity
MAX_ENTRIES = 4096  # oldest entries are dropped beyond this

_warned_unwritable: set[str] = set()


def default_memo_path() -> Path:
    env = os.environ.get(MEMO_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ditq" / "file_sha256.json"


def sha256_stream(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """sha256 of a file's whole content, read in chunks (no full copy in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _stat_id(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _read_memo(memo_path: Path) -> dict[str, dict]:
    """The memo's entries; {} when absent, unreadable or corrupt (reported; the next write rebuilds it)."""
    try:
        text = memo_path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        log.warning("file-hash memo %s cannot be read (%s); hashing without it", memo_path, err)
        return {}
    try:
        memo = json.loads(text)
        if not isinstance(memo, dict) or memo.get("version") != MEMO_VERSION or not isinstance(memo.get("entries"), dict):
            raise ValueError("not a ditq file-hash memo of version %d" % MEMO_VERSION)
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        log.warning("file-hash memo %s is corrupt (%s); rebuilding it", memo_path, err)
        return {}
    return {k: v for k, v in memo["entries"].items() if isinstance(v, dict)}


def _write_memo(memo_path: Path, entries: dict[str, dict]) -> None:
    if len(entries) > MAX_ENTRIES:
        keep = sorted(entries, key=lambda k: entries[k].get("hashed_at_ns", 0))[-MAX_ENTRIES:]
        entries = {k: entries[k] for k in keep}
    try:
        atomic_write_text(memo_path, json.dumps({"version": MEMO_VERSION, "entries": entries}, indent=1, sort_keys=True))
    except OSError as err:
        if str(memo_path) not in _warned_unwritable:
            _warned_unwritable.add(str(memo_path))
            log.warning("file-hash memo %s cannot be written (%s); checkpoints will be re-hashed on every run "
                        "(set %s to a writable file to avoid that)", memo_path, err, MEMO_ENV)


def _match(entry: dict | None, st: os.stat_result) -> str | None:
    if entry is None:
        return None
    digest = entry.get("sha256")
    if not (isinstance(digest, str) and len(digest) == 64):
        return None
    return digest if {k: entry.get(k) for k in ("size", "mtime_ns", "ctime_ns")} == _stat_id(st) else None


def lookup(path: str | os.PathLike, memo_path: str | os.PathLike | None = None) -> str | None:
    """The memoised digest of `path` if its entry still matches the file, else None."""
    p = Path(path).resolve()
    return _match(_read_memo(Path(memo_path) if memo_path else default_memo_path()).get(str(p)), p.stat())


def file_sha256(path: str | os.PathLike, memo_path: str | os.PathLike | None = None) -> str:
    """Hex sha256 of the whole file at `path`, from the memo while the file is unchanged."""
    p = Path(path).resolve()
    memo_file = Path(memo_path) if memo_path else default_memo_path()
    entries = _read_memo(memo_file)
    st = p.stat()
    cached = _match(entries.get(str(p)), st)
    if cached is not None:
        return cached
    started = time.time_ns()
    digest = sha256_stream(p)
    after = p.stat()
    if _stat_id(after) == _stat_id(st) and after.st_ctime_ns <= started - RACY_WINDOW_NS:
        entries[str(p)] = {**_stat_id(st), "sha256": digest, "hashed_at_ns": started}
        _write_memo(memo_file, entries)
    return digest
