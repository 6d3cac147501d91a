"""Formats of a `TableModel` (ditq.tracking.table): Markdown, LaTeX (booktabs), CSV and JSON.

Pure formatting: the model decides what a cell holds (ours, the paper's value, the difference, or
nothing); here a cell with no value is written as missing ("—" in Markdown, \\textemdash in LaTeX,
an empty field in CSV, null in JSON), never as a number. A column the paper gives no value for has
no paper/difference sub-columns, so a table without paper numbers reads as ours only.
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the model imports this module, not the other way round
    from ditq.tracking.table import TableModel

MISSING_MD = "—"
MISSING_TEX = r"\textemdash{}"
DERIVED = "†"  # a paper value computed from our FP row ("FP+0.12")


def fmt(v: Any) -> str:
    """A value as the tables print it: 4 decimals below 1, else 2; None as "-"."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf"
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def fmt_diff(v: float) -> str:
    """A difference, signed, with fmt's precision."""
    if math.isnan(v) or math.isinf(v):
        return fmt(v)
    return f"{v:+.4f}" if abs(v) < 1 else f"{v:+.2f}"


def _text(v: Any, missing: str, diff: bool = False) -> str:
    if v is None:
        return missing
    return fmt_diff(float(v)) if diff else fmt(v)


def header_cells(model: "TableModel", runs: bool, paper_name: str = "paper", diff_name: str = "Δ") -> list[str]:
    out = ["Method", "W/A"]
    for col in model.columns:
        out.append(col.header)
        if col.has_paper:
            out += [f"{col.header} {paper_name}", f"{col.header} {diff_name}"]
    if runs:
        out.append("Runs")
    return out


def text_cells(model: "TableModel", runs: bool, missing: str = MISSING_MD, derived: str = DERIVED) -> list[list[str]]:
    """Every row's cells as text (Markdown's and W&B's string form)."""
    body = []
    for row in model.rows:
        cells = [row.label, row.wa if row.wa is not None else missing]
        for col in model.columns:
            cell = row.cells[col.key]
            cells.append(_text(cell.ours, missing))
            if col.has_paper:
                paper = _text(cell.paper, missing)
                cells.append(paper + derived if cell.paper_base is not None else paper)
                cells.append(_text(cell.diff, missing, diff=True))
        if runs:
            cells.append(", ".join(r.run_id for r in row.runs) or missing)
        body.append(cells)
    return body


def _notes(model: "TableModel") -> list[str]:
    return [f"{row.label}, {col.header}: {row.cells[col.key].note}"
            for row in model.rows for col in model.columns if row.cells[col.key].note]


def _run_list(model: "TableModel") -> list[tuple[str, str]]:
    """(run id, where its row and config are) of every run the table uses, in table order."""
    seen: dict[str, str] = {}
    for row in model.rows:
        for r in row.runs:
            seen.setdefault(r.run_id, r.result or "(no run dir recorded)")
    return list(seen.items())


def to_markdown(model: "TableModel", runs: bool = True) -> str:
    header, body = header_cells(model, runs), text_cells(model, runs)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = [f"### {model.title}"] if model.title else []
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |")
    if model.has_paper:
        lines.append(f"\n{MISSING_MD}: no run or no value; paper: the paper's number; Δ = ours − paper")
    notes = _notes(model)
    if notes:
        lines.append(f"\n{DERIVED} paper value relative to our FP row:")
        lines += [f"- {n}" for n in notes]
    if runs:
        used = _run_list(model)
        if used:
            lines.append("\nRuns (id: result row with its config):")
            lines += [f"- `{rid}`: {where}" for rid, where in used]
    return "\n".join(lines)


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(s))


def _tex_comment(s: str) -> str:
    return "% " + str(s).replace("\n", " ")


def to_latex(model: "TableModel", runs: bool = True) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); ours | paper | $\\Delta$ under each column
    the paper has values for; the title, the derived-value notes and the run dirs as comments."""
    spec = "ll"
    top = ["Method", "W/A"]
    sub = ["", ""]
    rules = []
    pos = 3
    for col in model.columns:
        if col.has_paper:
            spec += "rrr"
            top.append(rf"\multicolumn{{3}}{{c}}{{{tex_escape(col.header)}}}")
            sub += ["ours", "paper", r"$\Delta$"]
            rules.append(rf"\cmidrule(lr){{{pos}-{pos + 2}}}")
            pos += 3
        else:
            spec += "r"
            top.append(tex_escape(col.header))
            sub.append("")
            pos += 1
    if runs:
        spec += "l"
        top.append("Runs")
        sub.append("")
    lines = [_tex_comment(model.title)] if model.title else []
    lines += [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(top) + r" \\"]
    if rules:
        lines += [" ".join(rules), " & ".join(sub) + r" \\"]
    lines.append(r"\midrule")
    for row in model.rows:
        cells = [tex_escape(row.label), tex_escape(row.wa) if row.wa is not None else MISSING_TEX]
        for col in model.columns:
            cell = row.cells[col.key]
            cells.append(_text(cell.ours, MISSING_TEX))
            if col.has_paper:
                paper = _text(cell.paper, MISSING_TEX)
                cells.append(paper + r"$^\dagger$" if cell.paper_base is not None else paper)
                diff = _text(cell.diff, MISSING_TEX, diff=True)
                cells.append("$-$" + diff[1:] if diff.startswith("-") else diff)
        if runs:
            ids = ", ".join(rf"\texttt{{{tex_escape(r.run_id)}}}" for r in row.runs)
            cells.append(ids or MISSING_TEX)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = _notes(model)
    if notes:
        lines.append(_tex_comment(r"$^\dagger$ paper value relative to our FP row:"))
        lines += [_tex_comment(n) for n in notes]
    if runs:
        lines += [_tex_comment(f"run {rid}: {where}") for rid, where in _run_list(model)]
    return "\n".join(lines) + "\n"


def csv_header(model: "TableModel", runs: bool = True) -> list[str]:
    out = header_cells(model, runs=False, diff_name="diff")
    return out + (["runs", "run_dirs"] if runs else [])


def to_csv(model: "TableModel", runs: bool = True) -> str:
    """Values unrounded (Python's repr: read back exactly), missing as an empty field; `runs` and
    `run_dirs` are ';'-separated."""
    def raw(v: Any) -> Any:
        return "" if v is None else v

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(csv_header(model, runs))
    for row in model.rows:
        cells = [row.label, raw(row.wa)]
        for col in model.columns:
            cell = row.cells[col.key]
            cells.append(raw(cell.ours))
            if col.has_paper:
                cells += [raw(cell.paper), raw(cell.diff)]
        if runs:
            cells += [";".join(r.run_id for r in row.runs), ";".join(r.run_dir or "" for r in row.runs)]
        w.writerow(cells)
    return buf.getvalue()


def to_json(model: "TableModel") -> str:
    return json.dumps(model.to_dict(), indent=1, default=str, allow_nan=True) + "\n"


FORMATS = {"md": "md", "latex": "tex", "csv": "csv", "json": "json"}  # format -> file suffix


def render(model: "TableModel", fmt_name: str, runs: bool = True) -> str:
    if fmt_name == "md":
        return to_markdown(model, runs) + "\n"
    if fmt_name == "latex":
        return to_latex(model, runs)
    if fmt_name == "csv":
        return to_csv(model, runs)
    if fmt_name == "json":
        return to_json(model)
    raise ValueError(f"unknown table format {fmt_name!r}; use one of {sorted(FORMATS)}")
