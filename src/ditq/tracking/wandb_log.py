"""W&B logging: one W&B run per ditq run (config, summary metrics, a one-row results table and
the sample grid), and one per multirun holding the whole table. Offline by default: nothing
waits on a network, and files stay inside the run directory (`<run_dir>/wandb`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _settings():
    import wandb

    return wandb.Settings(silent=True, console="off", disable_git=True, save_code=False, x_disable_stats=True)


def _init(cfg_logger: Any, run_dir: str | Path, name: str, group: str | None, job_type: str, config: dict):
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg_logger.project,
        entity=cfg_logger.entity,
        mode=cfg_logger.mode,
        dir=str(run_dir),
        name=name,
        group=group,
        job_type=job_type,
        config=config,
        tags=list(cfg_logger.tags),
        settings=_settings(),
    )


def flat_scalars(row: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for section in ("metrics", "timings"):
        for k, v in row.get(section, {}).items():
            if isinstance(v, (int, float)):
                out[f"{section}/{k}"] = v
    for k in ("size_mb", "bits_per_weight"):
        if isinstance(row.get(k), (int, float)):
            out[k] = row[k]
    return out


def log_run(row: dict, cfg_logger: Any, run_dir: str | Path, table: dict | None, grid_path: str | Path | None) -> str:
    """Log one finished run; returns the W&B run directory."""
    import wandb

    from ditq.tracking.table import table_rows

    run = _init(cfg_logger, run_dir, row["run_name"], row.get("experiment"), row["config"]["method"]["name"], row["config"])
    try:
        run.summary.update(flat_scalars(row))
        header, body = table_rows([row], table)
        payload: dict[str, Any] = {"results": wandb.Table(columns=header, data=body)}
        if grid_path is not None and Path(grid_path).exists():
            payload["samples"] = wandb.Image(str(grid_path))
        run.log(payload)
        return run.dir
    finally:
        run.finish()


def log_sweep_table(rows: list[dict], table: dict | None, config: Any, sweep_dir: str | Path) -> None:
    import wandb

    from ditq.tracking.table import table_rows

    name = f"table-{config.get('experiment') or 'sweep'}"
    run = _init(config.logger, sweep_dir, name, config.get("experiment"), "table", {"sweep_dir": str(sweep_dir)})
    try:
        header, body = table_rows(rows, table)
        run.log({"table": wandb.Table(columns=header, data=body)})
    finally:
        run.finish()
