"""Hydra callback: record the sweep's launcher before jobs start; after the multirun, print and
save the table of the sweep's own rows (see ditq.tracking.sweep)."""
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
        from ditq.tracking.sweep import current_sweep, end_sweep, sweep_rows
        from ditq.tracking.table import render_csv, render_markdown

        info = getattr(self, "sweep", None) or current_sweep()
        end_sweep()
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        rows = sweep_rows(ResultsStore(config.paths.results_dir).rows(), sweep_dir,
                          sweep_id=info.sweep_id if info else None)
        if not rows:
            log.warning("no result rows were written by the sweep in %s", sweep_dir)
            return
        table = OmegaConf.to_container(config.table, resolve=True) if "table" in config else None
        text = render_markdown(rows, table, title=(table or {}).get("title") or config.get("experiment"))
        print("\n" + text + "\n", flush=True)
        Path(sweep_dir, "table.md").write_text(text + "\n")
        Path(sweep_dir, "table.csv").write_text(render_csv(rows, table))
        if config.logger.wandb and config.logger.mode != "disabled":
            from ditq.tracking.wandb_log import log_sweep_table

            log_sweep_table(rows, table, config, sweep_dir)
