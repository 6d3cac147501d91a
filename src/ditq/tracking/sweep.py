"""A multirun's bookkeeping: which process launched it, which rows belong to it.

- The launching process records itself (`begin_sweep`, called by TableCallback.on_multirun_start)
  in the environment variable DITQ_SWEEP before any job is dispatched; worker processes (joblib)
  inherit it.
- Every job starts a daemon watchdog (`start_watchdog`) that stops the job's process with
  `os._exit(EXIT_LAUNCHER_GONE)`, writing nothing, once the launcher is gone; the pipeline also
  calls `stop_if_launcher_gone` right before writing a row. Jobs running inside the launcher
  itself, or on another host (SLURM), are not watched.
- Every job writes `<job dir>/sweep_job.json`: its sweep id, job number and the run_id of the row
  it wrote or reused (an identical finished run is reused, not repeated). The sweep's table is the
  rows those files name, so two sweeps sharing a directory never mix.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from ditq.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

ENV = "DITQ_SWEEP"
JOB_FILE = "sweep_job.json"
EXIT_LAUNCHER_GONE = 75
_watched: set[str] = set()


@dataclass(frozen=True)
class SweepInfo:
    sweep_id: str
    host: str
    pid: int
    start: int | None  # the launcher's start time (clock ticks since boot; /proc), against pid reuse


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process from /proc, or None where /proc is unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[19])


def begin_sweep() -> SweepInfo:
    """Record the calling process as the launcher of a new sweep (in os.environ)."""
    stat = _proc_stat(os.getpid())
    info = SweepInfo(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), stat[1] if stat else None)
    os.environ[ENV] = json.dumps(asdict(info))
    return info


def end_sweep() -> None:
    os.environ.pop(ENV, None)


def current_sweep() -> SweepInfo | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        return SweepInfo(**json.loads(raw))
    except (ValueError, TypeError) as err:
        log.warning("ignoring malformed %s=%r: %s", ENV, raw, err)
        return None


def launcher_alive(info: SweepInfo) -> bool:
    """False only when the launcher is known to be gone (exited, a zombie, or its pid reused)."""
    if info.host != socket.gethostname() or info.pid == os.getpid():
        return True  # another machine (cannot tell), or we are the launcher
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(info.pid)
    if stat is None:
        return True
    state, start = stat
    return state not in ("Z", "X", "x") and (info.start is None or start == info.start)


def _stop(info: SweepInfo) -> None:
    sys.stderr.write(f"ditq: the sweep's launching process (pid {info.pid}) is gone; stopping this job "
                     f"(pid {os.getpid()}) without writing a result row\n")
    sys.stderr.flush()
    os._exit(EXIT_LAUNCHER_GONE)


def stop_if_launcher_gone(info: SweepInfo | None = None) -> None:
    """Exit this process at once (no row, no cleanup) when the sweep that started it is gone."""
    info = info or current_sweep()
    if info is not None and not launcher_alive(info):
        _stop(info)


def start_watchdog(interval_s: float = 1.0) -> threading.Thread | None:
    """In a worker of a sweep, a daemon thread that stops the process once the launcher is gone;
    None (nothing to watch) outside a sweep or inside the launcher itself."""
    info = current_sweep()
    if info is None or info.pid == os.getpid() or info.host != socket.gethostname() or info.sweep_id in _watched:
        return None
    _watched.add(info.sweep_id)

    def watch() -> None:
        while True:
            if not launcher_alive(info):
                _stop(info)
            time.sleep(interval_s)

    thread = threading.Thread(target=watch, name=f"ditq-sweep-watchdog-{info.pid}", daemon=True)
    thread.start()
    return thread


def record_job(job_dir: str | Path, row: dict[str, Any], job_num: int | None) -> Path | None:
    """Note in the job's directory which row the job produced or reused (see module doc)."""
    info = current_sweep()
    if info is None:
        return None
    path = Path(job_dir) / JOB_FILE
    atomic_write_text(path, json.dumps({"sweep_id": info.sweep_id, "job_num": job_num, "run_id": row.get("run_id"),
                                        "run_key": row.get("run_key")}, indent=1))
    return path


def read_records(sweep_dir: str | Path, file_name: str, sweep_id: str | None = None) -> list[dict[str, Any]]:
    """The JSON records named `file_name` under a sweep directory (of one sweep when `sweep_id` is
    given), in path order; unreadable ones are skipped with a warning."""
    out = []
    for path in sorted(Path(sweep_dir).rglob(file_name)):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("skipping unreadable %s %s: %s", file_name, path, err)
            continue
        if isinstance(rec, dict) and (sweep_id is None or rec.get("sweep_id") == sweep_id):
            out.append(rec)
    return out


def job_records(sweep_dir: str | Path, sweep_id: str | None = None) -> list[dict[str, Any]]:
    """The job files under a sweep directory (of one sweep when `sweep_id` is given)."""
    return read_records(sweep_dir, JOB_FILE, sweep_id)


def sweep_rows(rows: Iterable[dict], sweep_dir: str | Path, sweep_id: str | None = None) -> list[dict]:
    """The rows of one sweep: those its job files name (each as a job of this sweep: its job_num and
    sweep_dir here, also for a row reused from an earlier run);
    a sweep without job files (older ones) falls back to rows whose sweep_dir is `sweep_dir`."""
    rows = list(rows)
    records = job_records(sweep_dir, sweep_id)
    if not records:
        if sweep_id is not None:
            return []
        resolved = str(Path(sweep_dir).resolve())
        return [r for r in rows if r.get("sweep_dir") in (str(sweep_dir), resolved)]
    by_id = {r.get("run_id"): r for r in rows}
    out = []
    for rec in records:
        row = by_id.get(rec.get("run_id"))
        if row is None:
            log.warning("job %s of sweep %s names result row %s, which is not in the store",
                        rec.get("job_num"), sweep_dir, rec.get("run_id"))
            continue
        out.append({**row, "job_num": rec.get("job_num"), "sweep_dir": str(Path(sweep_dir).resolve())})
    return out
