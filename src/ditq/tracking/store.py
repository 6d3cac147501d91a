"""The local results store: one JSON file per finished run under `<results_dir>/rows/`.

A row is written atomically when a run has finished scoring, so an interrupted run leaves no
partial row; concurrent jobs (joblib, SLURM) never write the same file. A file that is not a
result row (not UTF-8, not JSON, not a JSON object, `metrics` not an object) is skipped, and one
warning names every skipped file, so one bad file never hides the others.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from ditq.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

# Fields a row must hold as JSON objects when present (`metrics` must be present).
_OBJECT_FIELDS = ("metrics", "timings", "config", "protocol")


def row_problem(obj: Any) -> str | None:
    """Why `obj` (a parsed JSON file) is not a usable result row, or None when it is one."""
    if not isinstance(obj, dict):
        return f"not a JSON object but a JSON {type(obj).__name__}"
    if "metrics" not in obj:
        return "no 'metrics'"
    for key in _OBJECT_FIELDS:
        if key in obj and not isinstance(obj[key], dict):
            return f"'{key}' is {json.dumps(obj[key])[:40]}, not an object"
    return None


class ResultsStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.rows_dir = self.root / "rows"

    def append(self, row: dict[str, Any]) -> Path:
        """Write `row` as a new file; sets row['run_id'] (the file's name) when it has none."""
        row.setdefault("run_id", f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        path = self.rows_dir / f"{row['run_id']}.json"
        atomic_write_text(path, json.dumps(row, indent=1, default=str, allow_nan=True))
        return path

    def entries(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """(path, row) of every readable row, in file-name order (oldest first); the unreadable
        ones are skipped and named in one warning once the iteration is complete."""
        if not self.rows_dir.is_dir():
            return
        skipped: list[str] = []
        for path in sorted(self.rows_dir.glob("*.json")):
            try:
                obj = json.loads(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError:
                skipped.append(f"{path} (not UTF-8)")
                continue
            except json.JSONDecodeError as err:
                skipped.append(f"{path} (not JSON: {err})")
                continue
            except OSError as err:
                skipped.append(f"{path} ({err.strerror or err})")
                continue
            problem = row_problem(obj)
            if problem:
                skipped.append(f"{path} ({problem})")
                continue
            yield path, obj
        if skipped:
            log.warning("skipped %d unreadable result row(s); fix or move them out of %s:\n  %s",
                        len(skipped), self.rows_dir, "\n  ".join(skipped))

    def rows(self) -> Iterator[dict[str, Any]]:
        """All readable rows, oldest first (see `entries`)."""
        for _, row in self.entries():
            yield row

    def select(self, **where: Any) -> list[dict[str, Any]]:
        """Rows whose top-level fields equal the given values."""
        return [r for r in self.rows() if all(r.get(k) == v for k, v in where.items())]
