"""The local results store: one JSON file per finished run under `<results_dir>/rows/`.

A row is written atomically when a run has finished scoring, so an interrupted run leaves no
partial row; concurrent jobs (joblib, SLURM) never write the same file.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from ditq.utils.atomic import atomic_write_text


class ResultsStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.rows_dir = self.root / "rows"

    def append(self, row: dict[str, Any]) -> Path:
        row = dict(row)
        row.setdefault("run_id", f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        path = self.rows_dir / f"{row['run_id']}.json"
        atomic_write_text(path, json.dumps(row, indent=1, default=str, allow_nan=True))
        return path

    def rows(self) -> Iterator[dict[str, Any]]:
        """All rows, oldest first; unreadable files are reported and skipped."""
        if not self.rows_dir.is_dir():
            return
        for path in sorted(self.rows_dir.glob("*.json")):
            try:
                yield json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                import logging

                logging.getLogger(__name__).warning("skipping unreadable result row %s: %s", path, err)

    def select(self, **where: Any) -> list[dict[str, Any]]:
        """Rows whose top-level fields equal the given values."""
        return [r for r in self.rows() if all(r.get(k) == v for k, v in where.items())]
