"""Result rows (the results store, `ditq.tracking.store.ResultsStore`) as a flat frame and pivots
across a sweep: method x bits -> a metric."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd


def load_rows(results_dir: str | os.PathLike, experiment: str | None = None, sweep_dir: str | None = None,
              latest_only: bool = True) -> list[dict[str, Any]]:
    """Rows of a results store (optionally one experiment / sweep dir); with `latest_only`, the
    newest row per run_key (as the tables do: a forced rerun supersedes the older row)."""
    from ditq.tracking.store import ResultsStore

    root = Path(results_dir)
    if not (root / "rows").is_dir():
        raise FileNotFoundError(f"no results store at {root} (expected {root / 'rows'}/*.json); "
                                "give paths.results_dir of a finished run or sweep")
    rows = list(ResultsStore(root).rows())
    if experiment is not None:
        rows = [r for r in rows if r.get("experiment") == experiment]
    if sweep_dir is not None:
        want = str(Path(sweep_dir).resolve())
        rows = [r for r in rows if r.get("sweep_dir") == want]
    if latest_only:
        newest: dict[Any, dict] = {}
        for r in rows:  # oldest first: later rows replace earlier ones of the same key
            newest[r.get("run_key") or r.get("run_id") or id(r)] = r
        rows = list(newest.values())
    return rows


def frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One line per row: method, bits (FP rows: "fp"), wbits, abits, W/A label, is_fp, run_name,
    output_dir, sampler, cfg_scale, every metric (as its own column) and the total seconds."""
    out = []
    for r in rows:
        cfg = r.get("config") or {}
        fp = bool(r.get("is_fp"))
        protocol = r.get("protocol") or {}
        line = {
            "method": "FP" if fp else (cfg.get("method") or {}).get("name"),
            "bits": "fp" if fp else (cfg.get("bits") or {}).get("name"),
            "wbits": r.get("wbits"), "abits": r.get("abits"),
            "W/A": "FP" if fp else f"W{r.get('wbits')}A{r.get('abits')}",
            "is_fp": fp, "run_name": r.get("run_name"), "output_dir": r.get("output_dir"),
            "sampler": protocol.get("sampler"), "cfg_scale": protocol.get("cfg_scale"),
            "total_s": (r.get("timings") or {}).get("total_s"),
        }
        line.update(r.get("metrics") or {})
        out.append(line)
    return pd.DataFrame(out)


def _num(v) -> float:
    """A bit width as a number (32 for FP rows; a mixed-plan label like "4/8" counts as 0)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


def _bits_order(df: pd.DataFrame) -> list[str]:
    """Bit settings from the widest to the narrowest (by weight, then activation bits)."""
    def key(b):
        g = df[df["bits"] == b].iloc[0]
        return (-_num(g["wbits"]), -_num(g["abits"]), str(b))

    return sorted(df["bits"].dropna().unique(), key=key)


def pivot(rows_or_frame: Any, index: str = "method", columns: str = "bits", value: str = "psnr") -> pd.DataFrame:
    """`value` laid out as index x columns (one cell per combination; a repeated combination is an
    error naming it, since averaging runs of different settings would hide it). Missing cells are NaN.
    With columns="bits" the columns run from the widest bit setting to the narrowest."""
    df = rows_or_frame if isinstance(rows_or_frame, pd.DataFrame) else frame(rows_or_frame)
    for key in (index, columns, value):
        if key not in df.columns:
            raise KeyError(f"{key!r} is not a field of these rows; fields: {sorted(map(str, df.columns))}")
    df = df.dropna(subset=[value])
    dup = df[df.duplicated([index, columns], keep=False)]
    if len(dup):
        pairs = sorted({(str(a), str(b)) for a, b in zip(dup[index], dup[columns])})
        raise ValueError(f"several rows for ({index}, {columns}) = {pairs}; select one sweep (sweep_dir=) "
                         "or add the differing field to the index")
    table = df.pivot(index=index, columns=columns, values=value)
    if columns == "bits":
        table = table[[b for b in _bits_order(df) if b in table.columns]]
    return table


def metrics_of(rows_or_frame: Any, candidates: Sequence[str] = ("psnr", "fid_to_fp", "fid", "cls_acc")) -> list[str]:
    """The metrics among `candidates` that some row has."""
    df = rows_or_frame if isinstance(rows_or_frame, pd.DataFrame) else frame(rows_or_frame)
    return [m for m in candidates if m in df.columns and df[m].notna().any()]
