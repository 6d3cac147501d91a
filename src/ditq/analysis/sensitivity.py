"""A finished run's per-layer and per-timestep sensitivity, from its diagnostics table
(`<run dir>/diagnostics.csv`, written by `ditq.diagnostics` for every quantized run)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SQNR = ("weight_sqnr_db", "act_sqnr_db", "input_sqnr_db", "output_sqnr_db")
REL = ("weight_rel_mse", "act_rel_mse", "input_rel_mse", "output_rel_mse")


def _db(rel: float) -> float:
    if rel is None or (isinstance(rel, float) and math.isnan(rel)):
        return math.nan
    return math.inf if rel == 0 else -10.0 * math.log10(rel)


def load_table(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The run's diagnostics table (a run dir or the CSV); a run without one is named with the fix."""
    from ditq.diagnostics.table import as_table

    return as_table(Path(run_dir))


def sensitivity_from_run(run_dir_or_table: Any) -> pd.DataFrame:
    """One row per quantized layer, in model order: name, role, block, and per side (weight, act,
    input, output) the relative MSE averaged over timesteps and its SQNR in dB (-10 log10 of the
    mean relative MSE, so an exact layer reads inf); `rank` orders layers by output error (1 = worst)."""
    df = run_dir_or_table if isinstance(run_dir_or_table, pd.DataFrame) else load_table(run_dir_or_table)
    layers = df[df["scope"] == "layer"]
    if layers.empty:
        raise ValueError("the diagnostics table has no layer rows (was the run quantized?)")
    out = layers.groupby("name", sort=False).agg(role=("role", "first"), block=("block", "first"),
                                                 **{c: (c, "mean") for c in REL}).reset_index()
    for rel, db in zip(REL, SQNR):
        out[db] = [_db(v) for v in out[rel]]
    out["rank"] = out["output_rel_mse"].rank(ascending=False, method="first").astype(int)
    return out


def sensitivity_by_timestep(run_dir_or_table: Any, side: str = "output") -> pd.DataFrame:
    """Relative MSE of `side` (weight, act, input, output) per role (rows) and timestep t (columns,
    noisiest first), mean over the role's layers; plus the denoiser's eps error per branch."""
    if side not in ("weight", "act", "input", "output"):
        raise ValueError(f"side={side!r}; choose one of weight, act, input, output")
    df = run_dir_or_table if isinstance(run_dir_or_table, pd.DataFrame) else load_table(run_dir_or_table)
    col = f"{side}_rel_mse"
    layers = df[df["scope"] == "layer"]
    table = layers.pivot_table(index="role", columns="t", values=col, aggfunc="mean")
    den = df[df["scope"] == "denoiser"]
    if len(den):
        d = den.pivot_table(index="branch", columns="t", values="output_rel_mse", aggfunc="mean")
        d.index = [f"denoiser ({b})" for b in d.index]
        table = pd.concat([table, d])
    roles = list(dict.fromkeys(layers["role"]))
    table = table.reindex([*roles, *[i for i in table.index if i not in roles]])
    return table[sorted(table.columns, reverse=True)]


def worst_layers(sens: pd.DataFrame, k: int = 5) -> list[dict[str, Any]]:
    """The k layers with the largest output error: name, role, output_rel_mse, output_sqnr_db."""
    top = sens.sort_values("output_rel_mse", ascending=False).head(k)
    return [{"name": r["name"], "role": r["role"], "output_rel_mse": float(r["output_rel_mse"]),
             "output_sqnr_db": float(r["output_sqnr_db"])} for r in top.to_dict("records")]


def role_means(sens: pd.DataFrame) -> pd.DataFrame:
    """Mean relative MSE per role and side (the role's layers weigh equally), with SQNR columns."""
    out = sens.groupby("role", sort=False)[list(REL)].mean()
    for rel, db in zip(REL, SQNR):
        out[db] = [_db(v) for v in out[rel]]
    return out


def finite(values) -> np.ndarray:
    """Floats with inf / None as nan (for plotting exact results as gaps)."""
    a = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    return np.where(np.isfinite(a), a, np.nan)
