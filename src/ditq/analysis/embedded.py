"""Configs, models and runs for the notebooks: the same Hydra composition and pipeline as the CLI,
called in-process (no Hydra job directories)."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable, Sequence

# Overrides that shrink a run on the embedded model to seconds (as tests.conftest.SHRINK).
QUICK = (
    "eval.num_samples=20",
    "eval.batch_size=20",
    "eval.grid_size=20",
    "sampler.num_steps=4",
    "sampler.batch_size=10",
    "calib.num_samples=8",
    "calib.num_timesteps=2",
    "calib.batch_size=8",
    "calib.max_tokens_per_layer=256",
    "logger=none",
)


def compose_run(overrides: Sequence[str] = ()):
    """The validated run config of `conf/config.yaml` with `overrides` (Hydra override strings)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ditq.config import validate_config
    from ditq.paths import config_dir

    overrides = list(overrides)
    bad = [o for o in overrides if not isinstance(o, str) or "=" not in o]
    if bad:
        raise ValueError(f"overrides must be Hydra strings like 'bits=w4a8'; got {bad!r}")
    if GlobalHydra.instance().is_initialized():  # e.g. a notebook that composed before
        GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return validate_config(cfg)


def load_model(run, device: str = "cpu"):
    """(adapter, sampler) of a validated run config: the FP model, as the pipeline loads it."""
    from ditq.models import load_adapter
    from ditq.sampling import Sampler

    adapter = load_adapter(run.model, device=device, dtype=run.dtype_inference)
    return adapter, Sampler(adapter, run.sampler, clip_sample=run.model.clip_sample)


def run_one(overrides: Sequence[str], output_dir: str | Path, *, quick: bool = True) -> dict[str, Any]:
    """One pipeline run (shrunk by `QUICK` unless quick=False; `overrides` win); returns its row."""
    from ditq.pipeline import run

    cfg = compose_run([*(QUICK if quick else ()), *overrides])
    return run(cfg, output_dir=Path(output_dir), progress=False)


def grid_overrides(grid: dict[str, Iterable[Any]]) -> list[list[str]]:
    """Every combination of a {key: values} grid as override lists, in the order Hydra's basic
    sweeper launches them (last key fastest)."""
    if not grid:
        raise ValueError("the grid is empty: give at least one key with values, e.g. {'bits': ['w8a8', 'w4a4']}")
    keys = list(grid)
    values = [list(grid[k]) for k in keys]
    empty = [k for k, v in zip(keys, values) if not v]
    if empty:
        raise ValueError(f"grid key(s) {empty} have no values")
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*values)]


def run_grid(grid: dict[str, Iterable[Any]], root: str | Path, base: Sequence[str] = (), *,
             quick: bool = True, cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """A small in-process sweep: one run per combination of `grid`, all sharing one cache
    (`cache_dir`, default `root/cache`) and the results store `root/results` (run dirs
    `root/runs/<k>`); returns the rows. Finished identical runs are reused (the pipeline's run
    identity), not redone."""
    root = Path(root)
    where = [f"paths.cache_dir={cache_dir or root / 'cache'}", f"paths.results_dir={root / 'results'}"]
    rows = []
    for k, combo in enumerate(grid_overrides(grid)):
        rows.append(run_one([*where, *base, *combo], root / "runs" / str(k), quick=quick))
    return rows
