"""The Hydra entry point: `ditq [group=choice ...] [key=value ...]` (add -m for a sweep).

    ditq                                   # embedded digits DiT, RTN W8A8
    ditq experiment=digits/rtn_table       # the main job: FP/W8A8/W4A8/W4A4 table
    ditq -m bits=w8a8,w4a4 method=rtn,rtn_dynamic

The config is validated (schemas, formats, combinations) before torch is imported, so a bad
choice fails in well under a second.
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ditq.config import ConfigError, validate_config
from ditq.paths import config_dir


def task(cfg: DictConfig) -> float | None:
    try:
        run_cfg = validate_config(cfg)
    except ConfigError as err:
        print(f"ditq: bad config: {err}", file=sys.stderr)
        raise SystemExit(2) from None

    from ditq.pipeline import run
    from ditq.tracking.keep import RowNotStoredError
    from ditq.tracking.table import render_markdown

    hc = HydraConfig.get()
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    if multirun:  # a worker process stops, writing nothing, once the process that launched the sweep is gone
        from ditq.tracking.sweep import start_watchdog

        start_watchdog()

    def print_table(row):
        if not multirun:
            from omegaconf import OmegaConf

            print("\n" + render_markdown([row], OmegaConf.to_container(run_cfg.table)) + "\n", flush=True)

    try:
        row = run(run_cfg, output_dir=hc.runtime.output_dir, sweep_dir=hc.sweep.dir if multirun else None,
                  job_num=hc.job.num if multirun else None)
    except ConfigError as err:  # the run's preflight (output dirs, reference, loaded model)
        print(f"ditq: bad config: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RowNotStoredError as err:  # the metrics were computed: show them, then fail
        print_table(err.row)
        raise
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
