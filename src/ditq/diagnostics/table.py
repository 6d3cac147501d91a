"""The diagnostics table on disk (CSV, written atomically) and its compact summary for a result row."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ditq.utils.atomic import atomic_write_text

TABLE_NAME = "diagnostics.csv"


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def as_table(obj: Any) -> pd.DataFrame:
    """A diagnostics table from a DataFrame, a list of row dicts, a CSV path or a run directory."""
    if isinstance(obj, pd.DataFrame):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if path.is_dir():
            path = path / TABLE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no diagnostics table at {path}: give a {TABLE_NAME} or the run directory "
                                    "holding one (a quantized run with diagnostics.enabled=true writes it)")
        return pd.read_csv(path)
    if isinstance(obj, list):
        return pd.DataFrame(obj)
    raise TypeError(f"expected a DataFrame, row dicts, or a path to {TABLE_NAME}; got {type(obj).__name__}")


def _num(v) -> float | None:
    """JSON-friendly float (inf stays inf: an exact result; nan becomes None)."""
    v = float(v)
    return None if math.isnan(v) else v


def _mean(values) -> float | None:
    s = pd.Series(values, dtype=float).dropna()
    return _num(s.mean()) if len(s) else None


def summarize(table: pd.DataFrame, worst: int = 5) -> dict[str, Any]:
    """The row's compact view of the table: the denoiser's error per timestep and its mean, mean
    SQNRs per layer role, output SQNR per role and timestep, and the `worst` layers by output error."""
    layers = table[table["scope"] == "layer"]
    den = table[table["scope"] == "denoiser"].sort_values("step")
    steps = sorted(int(s) for s in table["step"].unique())
    t_of = dict(zip(table["step"].astype(int), table["t"].astype(int)))
    out: dict[str, Any] = {
        "table": TABLE_NAME,
        "steps": steps,
        "t": [t_of[s] for s in steps],
        "records_per_step": int(den["records"].max()) if len(den) else 0,
        "denoiser": {"sqnr_db": {}, "rel_mse": {}},
        "denoiser_sqnr_db_mean": {},
    }
    for br, g in den.groupby("branch", sort=False):
        out["denoiser"]["sqnr_db"][br] = [_num(v) for v in g["output_sqnr_db"]]
        out["denoiser"]["rel_mse"][br] = [_num(v) for v in g["output_rel_mse"]]
        out["denoiser_sqnr_db_mean"][br] = _mean(g["output_sqnr_db"])
    by_role: dict[str, dict[str, float | None]] = {}
    role_steps: dict[str, list[float | None]] = {}
    for role, g in layers.groupby("role", sort=False):
        by_role[role] = {c: _mean(g[c]) for c in ("weight_sqnr_db", "act_sqnr_db", "input_sqnr_db", "output_sqnr_db")}
        per_step = g.groupby("step")["output_sqnr_db"].mean()
        role_steps[role] = [_num(per_step.get(s, math.nan)) for s in steps]
    out["by_role"] = by_role
    out["role_output_sqnr_db"] = role_steps
    per_layer = layers.groupby("name", sort=False).agg(
        role=("role", "first"), output_rel_mse=("output_rel_mse", "mean"), output_sqnr_db=("output_sqnr_db", "mean"))
    top = per_layer.sort_values("output_rel_mse", ascending=False).head(worst)
    out["worst_layers"] = [{"name": n, "role": r.role, "output_rel_mse": _num(r.output_rel_mse),
                            "output_sqnr_db": _num(r.output_sqnr_db)} for n, r in top.iterrows()]
    return out
