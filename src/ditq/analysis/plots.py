"""The notebooks' figures, each drawn on a given matplotlib Axes (the notebook owns the figure)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

ROLE_COLORS = {"qkv": "tab:blue", "proj": "tab:orange", "fc1": "tab:green", "fc2": "tab:red",
               "adaln": "tab:purple", "embed": "tab:brown", "final": "tab:gray"}


def channel_ranges(ax, lo, hi, title: str = "", sort: bool = False) -> None:
    """Per input channel the [min, max] of a layer's input as a vertical bar (Q-DiT Fig. 3): a few
    channels far beyond the rest are the outliers per-tensor quantization suffers from."""
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    order = np.argsort(np.maximum(-lo, hi))[::-1] if sort else np.arange(len(lo))
    c = np.arange(len(lo))
    ax.vlines(c, lo[order], hi[order], lw=0.8, color="tab:blue")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("input channel" + (" (sorted by max |x|)" if sort else ""))
    ax.set_ylabel("activation range")
    ax.set_title(title, fontsize=9)


def value_over_timesteps(ax, stats: Sequence[dict[str, Any]], role: str, field: str = "std") -> None:
    """`field` of each layer of `role` against the timestep (Q-DiT Fig. 4: activation std drifts with t);
    t decreases left to right, as sampling runs."""
    rows = [r for r in stats if r["role"] == role]
    if not rows:
        raise ValueError(f"no statistics for role {role!r}; roles present: {sorted({r['role'] for r in stats})}")
    for name in dict.fromkeys(r["layer"] for r in rows):
        pts = sorted(((r["t"], r[field]) for r in rows if r["layer"] == name), reverse=True)
        block = next(r["block"] for r in rows if r["layer"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1, label=f"block {block}")
    ax.set_xlabel("timestep t")
    ax.set_ylabel(field)
    ax.invert_xaxis()
    ax.set_title(f"{role} input: {field} per timestep", fontsize=9)
    ax.grid(alpha=0.3)


def timestep_boxes(ax, by_t: dict[int, dict[str, dict]], layer: str, title: str = "") -> None:
    """Box plot of one layer's sampled input values at each timestep (Q-DiT Fig. 5), whiskers at the
    0.1 / 99.9 percentiles, the exact min and max as dots."""
    ts = list(by_t)
    data = [by_t[t][layer]["rows"].flatten().numpy() for t in ts]
    ax.boxplot(data, whis=(0.1, 99.9), showfliers=False)
    ax.plot(range(1, len(ts) + 1), [float(by_t[t][layer]["max"].max()) for t in ts], "v", color="tab:red", ms=4,
            label="max")
    ax.plot(range(1, len(ts) + 1), [float(by_t[t][layer]["min"].min()) for t in ts], "^", color="tab:blue", ms=4,
            label="min")
    ax.set_xticks(range(1, len(ts) + 1), [str(t) for t in ts], fontsize=7, rotation=90)
    ax.set_xlabel("timestep t")
    ax.set_title(title or layer, fontsize=9)
    ax.legend(fontsize=7)


def histogram_pair(ax, before, after, labels=("original", "Hadamard-rotated"), bins: int = 120) -> None:
    """Histograms (log counts) of the same values before and after a transform, on one axis."""
    b, a = np.asarray(before).ravel(), np.asarray(after).ravel()
    lim = float(max(np.abs(b).max(), np.abs(a).max()))
    edges = np.linspace(-lim, lim, bins + 1)
    for vals, lab in zip((b, a), labels):
        ax.hist(vals, bins=edges, histtype="step", lw=1.2, log=True,
                label=f"{lab}: max|x|/std = {np.abs(vals).max() / vals.std():.1f}")
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)")
    ax.legend(fontsize=7)


def format_grids(ax, table: Sequence[dict[str, Any]]) -> None:
    """FP4DiT Fig. 1: each format's (normalised) values as dots on its own line."""
    for i, entry in enumerate(table):
        v = np.asarray(entry["values"])
        ax.plot(v, np.full(len(v), i), "o", ms=5)
    ax.set_yticks(range(len(table)), [f"{e['name']} ({e['n']})" for e in table])
    ax.set_ylim(len(table) - 0.5, -0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("value / max value")
    ax.grid(axis="x", alpha=0.3)


def layer_bars(ax, sens, column: str = "output_sqnr_db", title: str = "") -> None:
    """One bar per layer (model order), coloured by role."""
    vals = np.asarray(sens[column], dtype=float)
    vals = np.where(np.isfinite(vals), vals, np.nan)
    colors = [ROLE_COLORS.get(r, "k") for r in sens["role"]]
    ax.bar(range(len(vals)), vals, color=colors)
    ax.set_xticks(range(len(vals)), [n.replace("transformer_blocks.", "b").replace("attn1.", "")
                                     for n in sens["name"]], rotation=90, fontsize=6)
    ax.set_ylabel(column)
    ax.set_title(title or column, fontsize=9, loc="left")
    handles = [ax.bar(0, 0, color=c, label=r) for r, c in ROLE_COLORS.items() if r in set(sens["role"])]
    ax.legend(handles=handles, fontsize=7, ncol=len(handles), loc="lower right", bbox_to_anchor=(1.0, 1.0),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)


def rows_over_timesteps(ax, table, ylabel: str = "relative MSE", log: bool = True) -> None:
    """One line per row of a (row x timestep) table, t decreasing left to right."""
    ts = list(table.columns)
    for name, vals in table.iterrows():
        den = str(name).startswith("denoiser")
        ax.plot(ts, np.asarray(vals, dtype=float), "o--" if den else ".-", ms=4, lw=1.6 if den else 1,
                color=None if den else ROLE_COLORS.get(str(name)), label=str(name))
    if log:
        ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("timestep t")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def metric_vs_bits(ax, table, metric: str, fp_value: float | None = None) -> None:
    """One line per method (rows of a method x bits pivot) over the bit settings (columns)."""
    x = np.arange(len(table.columns))
    for method, vals in table.iterrows():
        ax.plot(x, np.asarray(vals, dtype=float), "o-", label=str(method))
    if fp_value is not None and np.isfinite(fp_value):
        ax.axhline(fp_value, color="k", ls="--", lw=1, label="FP")
    ax.set_xticks(x, [str(c) for c in table.columns])
    ax.set_xlabel("bits")
    ax.set_title(metric, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
