"""The Hydra entry point: `ditq [group=choice ...] [key=value ...]` (add -m for a sweep).

    ditq                                   # embedded digits DiT, RTN W8A8
    ditq experiment=digits/rtn_table       # the main job: FP/W8A8/W4A8/W4A4 table
    ditq -m bits=w8a8,w4a4 method=rtn,rtn_dynamic
    torchrun --standalone --nproc_per_node=2 -m ditq.cli bits=w8a8   # sampling sharded over 2 processes

The config is validated (schemas, formats, combinations) before torch is imported, so a bad
choice fails in well under a second.
"""
from __future__ import annotations

import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ditq.config import ConfigError, validate_config
from ditq.paths import config_dir

# conf/hydra/launcher/*.yaml deliberately extend the plugins' configs of the same name (checked
# against them); Hydra 1.3 calls that schema matching deprecated on every compose. At import, so that
# joblib workers and submitit jobs (which import this module with the task, then compose) are quiet too.
LAUNCHER_SCHEMA_NOTICE = r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema with the same name"
warnings.filterwarnings("ignore", message=LAUNCHER_SCHEMA_NOTICE, category=UserWarning)


def task(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        try:
            return run_task(cfg, hc, multirun=True)
        except Exception as err:  # recorded; the launcher runs the other jobs, the sweep's end reports it
            from ditq.tracking.failures import record_job_failure

            record_job_failure(err, hc)
            return None
    try:
        return run_task(cfg, hc, multirun=False)
    except ConfigError as err:  # the config's checks, or the run's preflight (output dirs, reference, loaded model)
        print(f"ditq: bad config: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_task(cfg: DictConfig, hc, multirun: bool) -> float | None:
    """Validate, run, and show or record the row (`task` decides what an exception means)."""
    run_cfg = validate_config(cfg)

    from ditq.pipeline import run
    from ditq.tracking.keep import RowNotStoredError
    from ditq.tracking.table import render_markdown

    if multirun:  # a worker process stops, writing nothing, once the process that launched the sweep is gone
        from ditq.tracking.sweep import start_watchdog

        start_watchdog()

    def print_table(row):
        if not multirun:
            from omegaconf import OmegaConf

            # this run's row only (a paper table's other rows are for ditq-table / the sweep's table)
            print("\n" + render_markdown([row], OmegaConf.to_container(run_cfg.table), paper_rows=False) + "\n",
                  flush=True)

    try:
        row = run(run_cfg, output_dir=hc.runtime.output_dir, sweep_dir=hc.sweep.dir if multirun else None,
                  job_num=hc.job.num if multirun else None)
    except RowNotStoredError as err:  # the metrics were computed: show them, then fail
        print_table(err.row)
        raise
    if row is None:  # torchrun rank > 0: its shards are written; rank 0 scores and records the row
        return None
    print_table(row)
    if multirun:  # the row this job wrote or reused: the sweep's table lists exactly these
        from ditq.tracking.sweep import record_job

        record_job(hc.runtime.output_dir, row, hc.job.num)
    return row["metrics"].get("fid")


def main() -> None:
    from ditq.config.resolvers import register_resolvers

    register_resolvers()
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(task)()


if __name__ == "__main__":
    main()
