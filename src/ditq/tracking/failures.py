"""Failed jobs of a sweep: each one's record, and the sweep's summary of them.

Hydra's launchers catch a job's exception and run the other jobs, but the sweeper then re-raises the
first failure, so the sweep's end (its table) never comes. So in a multirun `ditq.cli.task` catches
the exception itself, writes `<job dir>/job_failure.json` (sweep id, job number, overrides, error
type and message, the traceback file) and `<job dir>/traceback.txt`, and returns;
`TableCallback.on_multirun_end` then prints the table of the jobs that finished, followed by
"N of M jobs failed: ..." (also in `<sweep dir>/table.md`), and ends the process with status 1.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Iterable

from ditq.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

FAILURE_FILE = "job_failure.json"
TRACEBACK_FILE = "traceback.txt"
_MESSAGE_CHARS = 300  # of the error's first line in the summary (the record keeps all of it)


def record_failure(job_dir: str | Path, err: BaseException, job_num: int | None,
                   overrides: Iterable[str], sweep_id: str | None) -> Path:
    """Write the failure record and the traceback of `err` into the job's directory; returns the
    record's path. Called inside the `except` block that caught `err`."""
    job_dir = Path(job_dir)
    tb_path = job_dir / TRACEBACK_FILE
    atomic_write_text(tb_path, "".join(traceback.format_exception(type(err), err, err.__traceback__)))
    record = {"sweep_id": sweep_id, "job_num": job_num, "overrides": list(overrides),
              "error_type": type(err).__name__, "message": str(err), "traceback": str(tb_path.resolve()),
              "job_dir": str(job_dir.resolve()), "failed": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = job_dir / FAILURE_FILE
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


def record_job_failure(err: BaseException, hydra_cfg: Any) -> Path:
    """In a sweep's job (`hydra_cfg` = HydraConfig.get()): record `err` in the job's directory and
    log where; the job then returns normally so that the launcher runs the other jobs."""
    from ditq.tracking.sweep import current_sweep

    info = current_sweep()
    path = record_failure(hydra_cfg.runtime.output_dir, err, hydra_cfg.job.num, hydra_cfg.overrides.task,
                          info.sweep_id if info else None)
    log.error("job %s failed: %s: %s\n(recorded in %s, traceback in %s; the sweep's other jobs go on)",
              hydra_cfg.job.num, type(err).__name__, err, path, path.parent / TRACEBACK_FILE)
    return path


def failure_records(sweep_dir: str | Path, sweep_id: str | None = None) -> list[dict[str, Any]]:
    """The failure records under a sweep directory (of one sweep when `sweep_id` is given), by job."""
    from ditq.tracking.sweep import read_records

    out = read_records(sweep_dir, FAILURE_FILE, sweep_id)
    return sorted(out, key=lambda r: (r.get("job_num") is None, r.get("job_num") or 0))


def summarize(failures: list[dict[str, Any]], num_jobs: int, swept_keys: Iterable[str] = ()) -> str:
    """Markdown: "N of M jobs failed:" and one line per failed job (its swept overrides, error type and
    first message line, traceback file)."""
    keys = set(swept_keys)
    lines = [f"{len(failures)} of {num_jobs} jobs failed:"]
    for rec in failures:
        overrides = rec.get("overrides") or []
        shown = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys] if keys else overrides
        message = (str(rec.get("message") or "").strip().splitlines() or [""])[0]
        if len(message) > _MESSAGE_CHARS:
            message = message[:_MESSAGE_CHARS] + "..."
        lines.append(f"- job {rec.get('job_num')} ({' '.join(shown)}): {rec.get('error_type')}: {message} "
                     f"(traceback: {rec.get('traceback')})")
    return "\n".join(lines)


def swept_keys(task_overrides: Iterable[str]) -> list[str]:
    """The keys a sweep varies (`bits=w8a8,w4a8`, `range(...)`, ...), from the launching config's
    `hydra.overrides.task`; [] when they cannot be parsed."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    except Exception as err:  # a summary without the filter is still a summary
        log.debug("could not parse the sweep's overrides: %s", err)
        return []
    return [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
