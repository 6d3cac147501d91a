"""Hydra callback: record the sweep's launcher before jobs start; after the multirun, print and
save the table of the sweep's own rows (see ditq.tracking.sweep), then its failed jobs, if any
(ditq.tracking.failures: the process then exits with status 1)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class TableCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ditq.tracking.sweep import begin_sweep

        self.sweep = begin_sweep()  # before the launcher dispatches any job (workers inherit it)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ditq.tracking.store import ResultsStore
        from ditq.tracking.failures import failure_records, summarize, swept_keys
        from ditq.tracking.sweep import current_sweep, end_sweep, job_records, sweep_rows
        from ditq.tracking.table import build_table, render, write_tables
        from ditq.utils.atomic import atomic_write_text

        info = getattr(self, "sweep", None) or current_sweep()
        end_sweep()
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        sweep_id = info.sweep_id if info else None
        rows = sweep_rows(ResultsStore(config.paths.results_dir).rows(), sweep_dir, sweep_id=sweep_id)
        failures = failure_records(sweep_dir, sweep_id)
        failed = summarize(failures, len(job_records(sweep_dir, sweep_id)) + len(failures),
                           swept_keys(OmegaConf.select(config, "hydra.overrides.task", default=[]))) if failures else ""
        if not rows:
            log.warning("no result rows were written by the sweep in %s", sweep_dir)
            if failed:
                print("\n" + failed + "\n", flush=True)
                atomic_write_text(Path(sweep_dir, "table.md"), failed + "\n")
                raise SystemExit(f"ditq: {failed.splitlines()[0]} see {sweep_dir}/table.md")
            return
        table = OmegaConf.to_container(config.table, resolve=True) if "table" in config else None
        model = build_table(rows, table, title=(table or {}).get("title") or config.get("experiment"))
        write_tables(model, sweep_dir, "table")  # table.{md,tex,csv,json}, each atomically
        text = render(model, "md").rstrip("\n")
        if failed:
            text += "\n\n" + failed
            atomic_write_text(Path(sweep_dir, "table.md"), text + "\n")
        print("\n" + text + "\n", flush=True)
        if config.logger.wandb and config.logger.mode != "disabled":
            from ditq.tracking.wandb_log import log_sweep_table

            log_sweep_table(rows, table, config, sweep_dir)
        if failed:  # after the table: the jobs that finished are kept and shown
            raise SystemExit(f"ditq: {failed.splitlines()[0]} see {sweep_dir}/table.md")
