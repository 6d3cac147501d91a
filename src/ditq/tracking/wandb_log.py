"""W&B logging: one W&B run per ditq run (config, summary metrics, its row of the results table and
the sample grid), and one per multirun holding the whole table, laid out as the rendered table
(`ditq.tracking.table.build_table`: a row per paper label and per run; ours, the paper's value and
the difference per column; the runs each row came from). A sweep's runs and its table share one
W&B group (`group_name`). Offline by default: nothing waits on a network, and files stay inside
the run directory (`<run_dir>/wandb/offline-run-*`, the sweep's table under `<sweep_dir>/wandb/`);
upload later with `wandb sync <dir>/wandb/offline-run-*`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ditq.tracking.table import TableModel


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


def group_name(experiment: str | None, sweep_dir: str | Path | None) -> str | None:
    """The W&B group of a run: its sweep (`<experiment or "sweep">/<sweep dir name>`), so a sweep's
    runs and its table are one group; a single run is grouped by its experiment (or not at all)."""
    if sweep_dir:
        return f"{experiment or 'sweep'}/{Path(str(sweep_dir)).name}"
    return experiment or None


def flat_scalars(row: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for section in ("metrics", "timings"):
        for k, v in (row.get(section) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{section}/{k}"] = v
    for k in ("size_mb", "bits_per_weight", "wbits", "abits"):
        if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool):
            out[k] = row[k]
    return out


def table_data(model: "TableModel") -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the W&B table: the rendered table's header (ours, "<col> paper",
    "<col> Δ" where the paper has values, "Runs"), values as numbers (None where missing)."""
    from ditq.tracking.render import header_cells

    columns = header_cells(model, runs=True)
    data = []
    for row in model.rows:
        cells: list[Any] = [row.label, row.wa]
        for col in model.columns:
            cell = row.cells[col.key]
            ours = cell.ours if cell.ours is None or isinstance(cell.ours, (int, float, str)) else str(cell.ours)
            cells.append(ours)
            if col.has_paper:
                cells += [cell.paper, cell.diff]
        cells.append(", ".join(r.run_id for r in row.runs) or None)
        data.append(cells)
    return columns, data


def _wandb_table(model: "TableModel"):
    import wandb

    columns, data = table_data(model)
    return wandb.Table(columns=columns, data=data, allow_mixed_types=True)


def log_run(row: dict, cfg_logger: Any, run_dir: str | Path, table: dict | None, grid_path: str | Path | None) -> str:
    """Log one finished run (its summary holds every numeric metric and timing); returns the W&B
    run directory."""
    import wandb

    from ditq.tracking.table import build_table

    config = {**row["config"], "ditq_run": {k: row.get(k) for k in ("run_id", "run_key", "sweep_dir", "job_num",
                                                                    "output_dir")}}
    run = _init(cfg_logger, run_dir, row["run_name"], group_name(row.get("experiment"), row.get("sweep_dir")),
                row["config"]["method"]["name"], config)
    try:
        run.summary.update(flat_scalars(row))
        payload: dict[str, Any] = {"results": _wandb_table(build_table([row], table, paper_rows=False))}
        if grid_path is not None and Path(grid_path).exists():
            payload["samples"] = wandb.Image(str(grid_path))
        run.log(payload)
        return run.dir
    finally:
        run.finish()


def log_sweep_table(rows: list[dict], table: dict | None, config: Any, sweep_dir: str | Path) -> str:
    """Log the sweep's table (the same model `ditq-table` renders) as one W&B run of the sweep's
    group; returns the W&B run directory."""
    from ditq.tracking.table import build_table

    experiment = config.get("experiment")
    model = build_table(rows, table, (table or {}).get("title") or experiment)
    run = _init(config.logger, sweep_dir, f"table-{experiment or 'sweep'}", group_name(experiment, sweep_dir), "table",
                {"sweep_dir": str(sweep_dir), "experiment": experiment, "table": table or {}})
    try:
        used = {r.run_id for x in model.rows for r in x.runs}
        run.summary.update({"table_rows": len(model.rows), "table_runs": len(used),
                            "table_rows_without_run": sum(1 for x in model.rows if not x.runs)})
        run.log({"table": _wandb_table(model)})
        return run.dir
    finally:
        run.finish()
