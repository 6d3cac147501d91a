"""Plots of the diagnostics: layers x timesteps, and the denoiser's error along the trajectory.

Both take what a notebook has at hand: the table (DataFrame, CSV path or run directory) or, for the
denoiser plot, a result row (its `diagnostics.errors` summary). Exact results (SQNR = inf) show as
grey cells / gaps."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import io

import numpy as np

from ditq.diagnostics.table import as_table, summarize
from ditq.utils.atomic import atomic_write_bytes


def _figure(**kw):
    """A figure outside pyplot: no backend switch, nothing left open in a notebook's state."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def _finite(values) -> np.ndarray:
    a = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    return np.where(np.isfinite(a), a, np.nan)


def _save(fig, path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_layer_errors(table: Any, path: str | os.PathLike) -> Path:
    """Left: heatmap of every layer's output SQNR (dB) per timestep; right: per layer, the mean
    over timesteps of the weight, input-activation, input-drift and output SQNR."""
    from matplotlib import colormaps

    df = as_table(table)
    layers = df[df["scope"] == "layer"]
    if layers.empty:
        raise ValueError("the diagnostics table has no layer rows to plot")
    names = list(dict.fromkeys(layers["name"]))
    steps = sorted(layers["step"].unique())
    t_of = dict(zip(layers["step"], layers["t"]))
    grid = layers.pivot_table(index="name", columns="step", values="output_sqnr_db", aggfunc="mean", dropna=False)
    grid = grid.reindex(index=names, columns=steps)
    values = np.where(np.isfinite(grid.values), grid.values, np.nan)
    means = layers.groupby("name", sort=False)[["weight_sqnr_db", "act_sqnr_db", "input_sqnr_db",
                                                "output_sqnr_db"]].mean().reindex(names)

    height = min(60.0, 1.8 + 0.2 * len(names))
    fig = _figure(figsize=(12, height))
    ax, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [max(2, len(steps)) * 0.5 + 2, 5]})
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xticks(range(len(steps)), [f"{int(t_of[s])}" for s in steps], rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=7 if len(names) <= 60 else 5)
    ax.set_xlabel("timestep t (sampling order: left to right)")
    ax.set_title("layer output SQNR [dB] vs FP")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.01, label="dB (grey: exact)")
    y = np.arange(len(names))
    for col, label, marker in (("weight_sqnr_db", "weight", "s"), ("act_sqnr_db", "input act. quantizer", "^"),
                               ("input_sqnr_db", "input drift", "x"), ("output_sqnr_db", "output", "o")):
        ax2.plot(_finite(means[col]), y, marker=marker, linestyle="-", linewidth=0.8, markersize=3, label=label)
    ax2.set_xlabel("SQNR [dB], mean over timesteps (exact: not drawn)")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False,
               title="per layer", title_fontsize=9)
    ax.set_ylim(len(names) - 0.5, -0.5)
    fig.tight_layout()
    return _save(fig, path)


def _denoiser_summary(obj: Any) -> dict:
    if isinstance(obj, dict):
        summary = obj.get("diagnostics", {}).get("errors", obj)
        if "denoiser" not in summary:
            raise ValueError("this row has no diagnostics.errors summary (run with diagnostics.enabled=true)")
        return summary
    return summarize(as_table(obj))


def plot_denoiser_error(table_or_row: Any, path: str | os.PathLike) -> Path:
    """The denoiser's eps SQNR vs FP per timestep (per branch, and guided), and next to it the mean
    output SQNR of the layers of each role; from a table, a CSV/run directory or a result row."""
    s = _denoiser_summary(table_or_row)
    t = np.asarray(s["t"], dtype=float)
    fig = _figure(figsize=(11, 4))
    ax, ax2 = fig.subplots(1, 2, sharex=True)
    for br, vals in s["denoiser"]["sqnr_db"].items():
        ax.plot(t, _finite(vals), marker="o", label=br)
    ax.set_title("denoiser eps SQNR [dB] vs FP")
    for role, vals in s.get("role_output_sqnr_db", {}).items():
        ax2.plot(t, _finite(vals), marker=".", label=role)
    ax2.set_title("layer output SQNR [dB], mean per role")
    for a in (ax, ax2):
        a.set_xlabel("timestep t")
        a.grid(True, alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    ax.invert_xaxis()  # sampling runs from high to low t
    fig.tight_layout()
    return _save(fig, path)
