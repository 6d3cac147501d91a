"""Render result rows as a table laid out like a paper's table (ours next to the paper's numbers).

    ditq-table --experiment digits/rtn_table            # latest sweep of that experiment
    ditq-table --sweep outputs/multirun/...              # one sweep
    ditq-table --experiment digits/rtn_table --format csv
"""
from __future__ import annotations

import argparse
import math
from typing import Any

DEFAULT_COLUMNS = {
    "fid": "FID",
    "fid_to_fp": "FID to FP",
    "psnr": "PSNR vs FP (dB)",
    "cls_acc": "Class acc.",
    "size_mb": "Size (MB)",
    "sample_s": "Sampling (s)",
}


def lookup(row: dict, key: str) -> Any:
    """A value of a row by dotted key: metrics first, then top-level fields, then the config."""
    for section in ("metrics", "timings"):
        values = row.get(section)
        if isinstance(values, dict) and key in values:
            return values[key]
    if key in row:
        return row[key]
    node: Any = row.get("config")
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def row_label(row: dict, keys: list[str]) -> str:
    """The row's values of `keys`, joined by spaces. An FP row reads "FP" in place of the keys that
    name the quantization (method.*, bits.*); other keys (sampler, model: the setting) stay, so a
    table over several settings has one FP label per setting ("100 1.5 FP")."""
    if not row.get("is_fp"):
        return " ".join(str(lookup(row, k)) for k in keys)
    parts: list[str] = []
    for k in keys:
        if k.split(".")[0] not in ("method", "bits"):
            parts.append(str(lookup(row, k)))
        elif "FP" not in parts:
            parts.append("FP")
    return " ".join(parts) or "FP"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf"
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def launch_order(rows: list[dict]) -> list[dict]:
    """FP first, then the order runs were launched in: sweeps (and single runs) by when they
    started, jobs of a sweep by job number. Missing fields (a single run has no job_num) sort
    first, never compare None with a number."""
    start: dict[str, str] = {}
    for r in rows:
        group = str(r.get("sweep_dir") or r.get("run_id") or "")
        start[group] = min(start.get(group, "~"), str(r.get("started") or ""))

    def key(r: dict) -> tuple:
        job = r.get("job_num")
        return (not r.get("is_fp"), start[str(r.get("sweep_dir") or r.get("run_id") or "")],
                str(r.get("sweep_dir") or ""), job if isinstance(job, int) else -1,
                str(r.get("started") or ""), str(r.get("run_id") or ""))

    return sorted(rows, key=key)


def table_rows(rows: list[dict], table: dict | None) -> tuple[list[str], list[list[str]]]:
    """Header and cells; a run that has several rows (a forced rerun) counts once, its newest."""
    from ditq.tracking.identity import latest_per_run

    table = table or {}
    keys = list(table.get("rows") or ["method.name", "bits.name"])
    columns = dict(table.get("columns") or DEFAULT_COLUMNS)
    paper = table.get("paper") or {}
    header = ["Method", "W/A"] + list(columns.values())
    body = []
    for r in launch_order(latest_per_run(rows)):
        label = row_label(r, keys)
        wa = "32/32" if r.get("is_fp") else f"{r.get('wbits', '-')}/{r.get('abits', '-')}"
        cells = [label, wa]
        for key in columns:
            ours = _fmt(lookup(r, key))
            ref = paper.get(label, {}).get(key) if isinstance(paper.get(label), dict) else None
            cells.append(f"{ours} ({_fmt(ref)})" if ref is not None else ours)
        body.append(cells)
    return header, body


def render_markdown(rows: list[dict], table: dict | None, title: str | None = None) -> str:
    header, body = table_rows(rows, table)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = []
    if title:
        lines.append(f"### {title}")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |")
    if table and table.get("paper"):
        lines.append("(paper's numbers in parentheses)")
    return "\n".join(lines)


def render_csv(rows: list[dict], table: dict | None) -> str:
    import csv
    import io

    header, body = table_rows(rows, table)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(body)
    return buf.getvalue()


def latest_sweep(rows: list[dict]) -> str | None:
    sweeps = [(str(r.get("finished") or ""), str(r["sweep_dir"])) for r in rows if r.get("sweep_dir")]
    return max(sweeps)[1] if sweeps else None


def main(argv: list[str] | None = None) -> None:
    from ditq.paths import project_root
    from ditq.tracking.store import ResultsStore
    from ditq.tracking.sweep import sweep_rows

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(project_root() / "results"), help="results store directory")
    p.add_argument("--experiment", help="experiment name (e.g. digits/rtn_table)")
    p.add_argument("--sweep", help="a multirun sweep directory; default: the experiment's latest")
    p.add_argument("--all", action="store_true", help="every row of the experiment, not only one sweep")
    p.add_argument("--format", choices=["md", "csv"], default="md")
    args = p.parse_args(argv)

    rows = list(ResultsStore(args.results).rows())
    if args.experiment:
        rows = [r for r in rows if r.get("experiment") == args.experiment]
    if not args.all:
        sweep = args.sweep or latest_sweep(rows)
        if sweep:  # the rows its jobs wrote or reused
            rows = sweep_rows(rows, sweep)
    if not rows:
        raise SystemExit(f"no result rows found in {args.results} for the given filters")
    table = (rows[-1].get("config") or {}).get("table")
    if args.format == "md":
        print(render_markdown(rows, table, title=(table or {}).get("title")))
    else:
        print(render_csv(rows, table), end="")


if __name__ == "__main__":
    main()
