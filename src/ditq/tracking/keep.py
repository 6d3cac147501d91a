"""Keep a finished run's row: first in its own run directory (`<run dir>/result.json`, atomic),
then in the results store. Computed metrics are never lost to a store that fails late."""
from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from ditq.tracking.store import ResultsStore
from ditq.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


class RowNotStoredError(OSError):
    """The results store could not take the row; `row` holds it and `saved_at` where it was kept."""

    def __init__(self, message: str, row: dict[str, Any], saved_at: Path | None):
        super().__init__(message)
        self.row = row
        self.saved_at = saved_at


def keep_row(row: dict[str, Any], output_dir: str | Path, results_dir: str | Path) -> Path:
    """Write `row` (given a run_id here if it has none) to the run dir, then the store; returns the
    store's path. Raises RowNotStoredError naming the kept copy when the store write fails."""
    row.setdefault("run_id", f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    local: Path | None = Path(output_dir) / RESULT_FILE
    local_err = None
    try:
        atomic_write_text(local, json.dumps(row, indent=1, default=str, allow_nan=True))
    except OSError as err:
        local, local_err = None, err
        log.error("could not write the result row to %s: %s", Path(output_dir) / RESULT_FILE, err)
    try:
        return ResultsStore(results_dir).append(row)
    except OSError as err:
        kept = (f"the row is kept in {local}; copy it to {Path(results_dir) / 'rows'}/ once that is writable"
                if local is not None else
                f"nor could it be written to {Path(output_dir) / RESULT_FILE} ({local_err}); the metrics are "
                f"{json.dumps(row.get('metrics'), default=str)}")
        raise RowNotStoredError(f"could not write the result row to the results store paths.results_dir="
                                f"{results_dir} ({err}); {kept}", row, local) from err
