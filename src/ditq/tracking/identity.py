"""Run identity: which finished run a new run would repeat, and which rows count in a table.

A run's identity (`run_key`, stored in its row) is a sha256 of
- the resolved config WITHOUT what only says where outputs go or how they are shown: `paths.*`
  (path values elsewhere are written relative to them), `logger`, `table`, `force`, and
  `run_name` when it is the derived one (a hand-given name makes a separate run), and for an FP
  run also `method`, `calib`, `search`, `diagnostics` (it reads none of them); Hydra's
  directories and the sweep/job info are not part of a run config at all;
- the model's fingerprint (`adapter.fingerprint()`: changed weights make a different run);
- ditq's version and the device the run samples on.
A run whose identity matches a finished row does no work unless `force=true`; the forced run's
row names the row it supersedes. Tables keep the newest row per run_key, so nothing counts twice.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

IDENTITY_VERSION = 1  # bump when what goes into the identity changes
_NOT_IDENTITY = ("paths", "logger", "table", "force")
# what an FP run (bits=fp, no plan) never reads: its method, calibration, search and diagnostics
# settings, so the FP jobs of a sweep over methods are one run (the first runs, the others reuse it)
_NOT_FP_IDENTITY = ("method", "calib", "search", "diagnostics")


@dataclass(frozen=True)
class FinishedRun:
    path: Path  # the row's file
    row: dict[str, Any]


def _relative_to_paths(value: Any, roots: list[tuple[str, str]]) -> Any:
    """Path strings under a `paths.*` directory, written as `<paths.key>/rest`."""
    if isinstance(value, dict):
        return {k: _relative_to_paths(v, roots) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_to_paths(v, roots) for v in value]
    if isinstance(value, str):
        for key, root in roots:
            if value == root or value.startswith(root + os.sep):
                return f"<paths.{key}>" + value[len(root):]
    return value


def identity_payload(run, model_fingerprint: dict, device: str) -> dict[str, Any]:
    """What `run_key` hashes (kept readable for debugging a surprising match or miss)."""
    from omegaconf import OmegaConf

    import ditq
    from ditq.config.schema import derive_run_name, is_full_precision

    cfg = OmegaConf.to_container(run, resolve=True)
    paths = cfg.get("paths") or {}
    roots = sorted(((k, str(v).rstrip(os.sep)) for k, v in paths.items() if isinstance(v, str) and os.path.isabs(v)),
                   key=lambda kv: -len(kv[1]))
    if cfg.get("run_name") == derive_run_name(run):
        cfg.pop("run_name", None)
    for key in _NOT_IDENTITY:
        cfg.pop(key, None)
    if is_full_precision(run):
        for key in _NOT_FP_IDENTITY:
            cfg.pop(key, None)
    payload = {"v": IDENTITY_VERSION, "config": _relative_to_paths(cfg, roots), "model": model_fingerprint,
               "ditq": ditq.__version__, "device": device}
    plan = (cfg.get("method") or {}).get("plan")
    if plan:  # a per-layer plan file edited in place makes a different run
        payload["plan_sha256"] = hashlib.sha256(Path(plan).read_bytes()).hexdigest()
    return payload


def run_key(run, model_fingerprint: dict, device: str) -> str:
    payload = json.dumps(identity_payload(run, model_fingerprint, device), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def latest_per_run(rows: Iterable[dict]) -> list[dict]:
    """One row per run_key: the newest that no other row supersedes (rows without a run_key,
    written before identities existed, are all kept). Order of first appearance is kept."""
    rows = list(rows)
    superseded = {r.get("supersedes") for r in rows if r.get("supersedes")}
    best: dict[str, dict] = {}
    for r in rows:
        key = r.get("run_key")
        if not key:
            continue
        cur = best.get(key)
        if cur is None or _newer(r, cur, superseded):
            best[key] = r
    out, seen = [], set()
    for r in rows:
        key = r.get("run_key")
        if not key:
            out.append(r)
        elif key not in seen:
            seen.add(key)
            out.append(best[key])
    return out


def _newer(a: dict, b: dict, superseded: set) -> bool:
    def rank(r: dict) -> tuple:
        return (r.get("run_id") not in superseded, str(r.get("finished") or ""), str(r.get("run_id") or ""))

    return rank(a) > rank(b)


def previous_run(run, model_fingerprint: dict, device: str) -> tuple[str, FinishedRun | None]:
    """(run_key of `run`, the newest finished row with that key in run.paths.results_dir or None)."""
    from ditq.tracking.store import ResultsStore

    key = run_key(run, model_fingerprint, device)
    found = {id(row): FinishedRun(path, row) for path, row in ResultsStore(run.paths.results_dir).entries()
             if row.get("run_key") == key}
    if not found:
        return key, None
    newest = latest_per_run(f.row for f in found.values())[0]
    return key, found[id(newest)]
