"""Tables laid out like a paper's table: our numbers, the paper's and the difference, per row.

    ditq-table --experiment qdit/table2_imagenet256              # latest sweep of that experiment
    ditq-table --sweep outputs/multirun/...                      # one sweep
    ditq-table --experiment digits/rtn_table --format latex      # md | latex | csv | json
    ditq-table --experiment digits/rtn_table --out docs/tables   # all four, atomically

The rows are the labels the paper gives (`table.paper`, in its order), then the labels of the runs
found that the paper does not give (launch order). A cell holds ours, the paper's value and ours -
paper; a paper row no run filled shows ours as missing, never a number. A paper value "FP+x" /
"FP-x" is our FP row of the same setting (the label with its method/bits part read "FP") plus x;
with no such row it is missing. Every row names the runs its cells came from (its own, and the FP
run a relative paper value was computed from). The layout (`table:` rows, columns, paper) comes
from the experiment file when one is named and found, else from the newest row's config.
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ditq.tracking.render import FORMATS, header_cells, render, text_cells
from ditq.tracking.render import fmt as _fmt  # the tables' number format (tests import it from here)

log = logging.getLogger(__name__)

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




# ------------------------------------------------------------------------------ paper values
class TableSpecError(ValueError):
    """A `table:` setting the tables cannot use (a paper value that is neither a number nor FP+x)."""


_RELATIVE = re.compile(r"^\s*FP\s*([+-])\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*$")


def parse_paper_value(value: Any) -> tuple[float | None, float | None]:
    """(number, None) for a paper number, (None, offset) for "FP+x"/"FP-x", (None, None) for null.
    Raises TableSpecError for anything else."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        raise TableSpecError(f"{value!r} is a boolean")
    if isinstance(value, (int, float)):
        return float(value), None
    if isinstance(value, str):
        m = _RELATIVE.match(value)
        if m:
            return None, float(m.group(2)) * (1 if m.group(1) == "+" else -1)
        try:
            return float(value), None
        except ValueError:
            pass
    raise TableSpecError(f"{value!r} is neither a number nor 'FP+x'/'FP-x'")


def paper_value_problem(label: str, column: str, value: Any) -> str | None:
    """Why table.paper[label][column] cannot be used (with the fix), or None (for config checks)."""
    try:
        parse_paper_value(value)
    except TableSpecError as err:
        return (f"table.paper.{label!r}.{column} = {value!r}: {err}; write the paper's number (e.g. 12.4), "
                f"'FP+0.12' (our FP row of the same setting plus 0.12) or null (no number in the paper)")
    return None


def fp_label(label: str, keys: list[str]) -> str | None:
    """The label of the FP row of the same setting as `label` (see row_label), or None when the
    label does not split into one value per key."""
    parts = label.split(" ")
    if len(parts) != len(keys):
        return None
    out: list[str] = []
    for part, k in zip(parts, keys):
        if k.split(".")[0] not in ("method", "bits"):
            out.append(part)
        elif "FP" not in out:
            out.append("FP")
    return " ".join(out) or "FP"


# ------------------------------------------------------------------------------ the model
@dataclass
class RunRef:
    """A run a row's cells came from: its result row's id and where its row (with the full config) is."""
    run_id: str
    run_key: str | None
    run_name: str | None
    run_dir: str | None  # the run's output directory (`output_dir` of its row)
    result: str | None  # <run_dir>/result.json: the row, `config` holding the resolved config
    sweep_dir: str | None
    job_num: int | None
    used_for: str  # "ours", or the cells it supplied ("paper sfid = our FP + 0.12")


@dataclass
class Cell:
    ours: Any = None
    paper: float | None = None
    diff: float | None = None
    paper_spec: Any = None  # the table's entry as written (12.4 or "FP+0.12"), None when the paper has none
    paper_base: str | None = None  # for "FP+x": the label of our FP row it is relative to
    note: str | None = None  # how a relative paper value was resolved, or why it is missing


@dataclass
class Column:
    key: str
    header: str
    has_paper: bool  # the paper gives a value in this column for some row


@dataclass
class TableRow:
    label: str
    wa: str | None  # "w/a" bits of our run; None without a run
    cells: dict[str, Cell]
    runs: list[RunRef] = field(default_factory=list)
    in_paper: bool = False  # the paper gives this label


@dataclass
class TableModel:
    title: str | None
    row_keys: list[str]
    columns: list[Column]
    rows: list[TableRow]

    @property
    def has_paper(self) -> bool:
        return any(c.has_paper for c in self.columns)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "row_keys": self.row_keys, "columns": [asdict(c) for c in self.columns],
                "rows": [asdict(r) for r in self.rows]}


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _ref(row: dict, used_for: str) -> RunRef:
    run_dir = row.get("output_dir")
    job = row.get("job_num")
    return RunRef(run_id=str(row.get("run_id") or row.get("id") or "?"), run_key=row.get("run_key"),
                  run_name=row.get("run_name"), run_dir=run_dir,
                  result=str(Path(run_dir) / "result.json") if run_dir else None,
                  sweep_dir=row.get("sweep_dir"), job_num=job if isinstance(job, int) else None, used_for=used_for)


def _spec(table: Any) -> tuple[list[str], dict[str, str], dict[str, dict]]:
    """(row keys, columns, paper) of a `table:` setting (a dict or an OmegaConf node), checked."""
    if table is not None and not isinstance(table, dict):
        from omegaconf import OmegaConf

        table = OmegaConf.to_container(table, resolve=True)
    table = table or {}
    keys = list(table.get("rows") or ["method.name", "bits.name"])
    columns = dict(table.get("columns") or DEFAULT_COLUMNS)
    paper = dict(table.get("paper") or {})
    for label, cells in paper.items():
        if not isinstance(cells, dict):
            raise TableSpecError(f"table.paper.{label!r} must map column keys to the paper's values, got {cells!r}")
        for col, value in cells.items():
            problem = paper_value_problem(label, col, value)
            if problem:
                raise TableSpecError(problem)
    return keys, columns, paper


def build_table(rows: list[dict], table: dict | None, title: str | None = None,
                paper_rows: bool = True) -> TableModel:
    """The table of `rows` under the layout `table` (rows, columns, paper). A run with several
    rows (a forced rerun) counts once, its newest. `paper_rows=False` leaves out the paper's rows
    that no run filled (a single run's own table)."""
    from ditq.tracking.identity import latest_per_run

    keys, columns, paper = _spec(table)
    runs = launch_order(latest_per_run(rows))
    labelled = [(row_label(r, keys), r) for r in runs]
    fp_runs: dict[str, list[dict]] = {}
    for label, r in labelled:
        if r.get("is_fp"):
            fp_runs.setdefault(label, []).append(r)

    order: list[tuple[str, dict | None]] = []
    for label in paper:
        mine = [r for lab, r in labelled if lab == label]
        order += [(label, r) for r in mine] or ([(label, None)] if paper_rows else [])
    order += [(lab, r) for lab, r in labelled if lab not in paper]

    model_cols = [Column(k, h, any(paper.get(lab, {}).get(k) is not None for lab in paper))
                  for k, h in columns.items()]
    out = []
    for label, run in order:
        refs = [_ref(run, "ours")] if run is not None else []
        cells = {}
        for key in columns:
            cell = Cell(ours=lookup(run, key) if run is not None else None, paper_spec=paper.get(label, {}).get(key))
            value, offset = parse_paper_value(cell.paper_spec)
            if offset is not None:
                cell.paper = _relative(cell, label, keys, key, offset, run, fp_runs, refs)
            else:
                cell.paper = value
            ours = _number(cell.ours)
            if ours is not None and cell.paper is not None:
                cell.diff = round(ours - cell.paper, 10)  # no float noise (0.379999999999999)
            cells[key] = cell
        wa = None if run is None else (
            "32/32" if run.get("is_fp") else f"{run.get('wbits', '-')}/{run.get('abits', '-')}")
        out.append(TableRow(label, wa, cells, refs, label in paper))
    return TableModel(title if title is not None else (table or {}).get("title") or None, keys, model_cols, out)


def _relative(cell: Cell, label: str, keys: list[str], key: str, offset: float, run: dict | None,
              fp_runs: dict[str, list[dict]], refs: list[RunRef]) -> float | None:
    """The paper value "FP+offset": our FP row of the same setting plus offset (None, with a note, when
    that row or its value is missing or ambiguous); the FP run joins the row's provenance."""
    base = row_label({**run, "is_fp": True}, keys) if run is not None else fp_label(label, keys)
    if base is None:
        cell.note = f"paper = {cell.paper_spec!r}: the label does not name one value per table key; missing"
        return None
    cell.paper_base = base
    found = fp_runs.get(base, [])
    if len(found) > 1 and run is not None:  # the FP run of this run's own sweep
        same = [r for r in found if r.get("sweep_dir") == run.get("sweep_dir")]
        found = same or found
    if not found:
        cell.note = f"paper = our FP row {base!r} {offset:+g}; no such run: missing"
        return None
    if len(found) > 1:
        ids = ", ".join(str(r.get("run_id")) for r in found)
        cell.note = f"paper = our FP row {base!r} {offset:+g}; several FP runs ({ids}): missing"
        return None
    fp = found[0]
    ours_fp = _number(lookup(fp, key))
    fp_id = str(fp.get("run_id") or fp.get("id") or "?")
    if ours_fp is None:
        cell.note = f"paper = our FP row {base!r} (run {fp_id}) {offset:+g}; that run has no {key}: missing"
        return None
    cell.note = f"paper = our FP row {base!r} (run {fp_id}: {_fmt(ours_fp)}) {offset:+g}"
    used = f"paper {key} = our FP {offset:+g}"
    for ref in refs:
        if ref.run_id == fp_id:
            if used not in ref.used_for:
                ref.used_for += f"; {used}"
            break
    else:
        refs.append(_ref(fp, used))
    return ours_fp + offset


# ------------------------------------------------------------------------------ renderings
def table_rows(rows: list[dict], table: dict | None) -> tuple[list[str], list[list[str]]]:
    """Header and text cells (Markdown's) of the table of `rows`, with the runs column."""
    model = build_table(rows, table)
    return header_cells(model, runs=True), text_cells(model, runs=True)


def render_markdown(rows: list[dict], table: dict | None, title: str | None = None, *, runs: bool = True,
                    paper_rows: bool = True) -> str:
    return render(build_table(rows, table, title, paper_rows=paper_rows), "md", runs=runs).rstrip("\n")


def render_csv(rows: list[dict], table: dict | None, *, runs: bool = True, paper_rows: bool = True) -> str:
    return render(build_table(rows, table, paper_rows=paper_rows), "csv", runs=runs)


def render_latex(rows: list[dict], table: dict | None, title: str | None = None, *, runs: bool = True,
                 paper_rows: bool = True) -> str:
    return render(build_table(rows, table, title, paper_rows=paper_rows), "latex", runs=runs)


def file_stem(experiment: str | None) -> str:
    """`qdit/table2_imagenet256` -> `qdit__table2_imagenet256` (the --out files' name)."""
    return (experiment or "table").strip("/").replace("/", "__") or "table"


def write_tables(model: TableModel, out_dir: str | Path, stem: str, runs: bool = True) -> list[Path]:
    """`<out_dir>/<stem>.{md,tex,csv,json}`, each written atomically; returns the paths."""
    from ditq.utils.atomic import atomic_write_text

    paths = []
    for name, suffix in FORMATS.items():
        path = Path(out_dir) / f"{stem}.{suffix}"
        atomic_write_text(path, render(model, name, runs=runs))
        paths.append(path)
    return paths


def latest_sweep(rows: list[dict]) -> str | None:
    sweeps = [(str(r.get("finished") or ""), str(r["sweep_dir"])) for r in rows if r.get("sweep_dir")]
    return max(sweeps)[1] if sweeps else None


def experiment_table(experiment: str) -> dict | None:
    """The `table:` of experiments/<experiment>.yaml (the current layout and paper numbers), or None
    when there is no such file or it has no table."""
    from omegaconf import OmegaConf

    from ditq.paths import project_root

    path = project_root() / "experiments" / f"{experiment}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.load(path).get("table")
    if node is None:
        return None
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception as err:  # an interpolation that needs the composed config
        log.warning("the table of %s does not resolve on its own (%s); using the runs' recorded table", path, err)
        return None


def main(argv: list[str] | None = None) -> None:
    from ditq.paths import project_root
    from ditq.tracking.store import ResultsStore
    from ditq.tracking.sweep import sweep_rows

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(project_root() / "results"), help="results store directory")
    p.add_argument("--experiment", help="experiment name (e.g. digits/rtn_table)")
    p.add_argument("--sweep", help="a multirun sweep directory; default: the experiment's latest")
    p.add_argument("--all", action="store_true", help="every row of the experiment, not only one sweep")
    p.add_argument("--format", choices=list(FORMATS), default="md")
    p.add_argument("--out", metavar="DIR", help="write <DIR>/<experiment, / as __>.{md,tex,csv,json} (atomically) "
                                                "instead of printing one format")
    p.add_argument("--no-runs", dest="runs", action="store_false",
                   help="leave out the runs column and run list (md, latex) / the runs columns (csv)")
    args = p.parse_args(argv)

    rows = list(ResultsStore(args.results).rows())
    if args.experiment:
        rows = [r for r in rows if r.get("experiment") == args.experiment]
    if not args.all:
        sweep = args.sweep or latest_sweep(rows)
        if sweep:  # the rows its jobs wrote or reused
            rows = sweep_rows(rows, sweep)
    table = experiment_table(args.experiment) if args.experiment else None
    if table is None and rows:
        table = (rows[-1].get("config") or {}).get("table")
    if not rows and not (table or {}).get("paper"):
        raise SystemExit(f"no result rows found in {args.results} for the given filters")
    try:
        model = build_table(rows, table)
    except TableSpecError as err:
        raise SystemExit(f"ditq-table: bad table layout: {err}") from None
    if args.out:
        experiment = args.experiment or next((r.get("experiment") for r in reversed(rows) if r.get("experiment")), None)
        for path in write_tables(model, args.out, file_stem(experiment), runs=args.runs):
            print(path)
    else:
        print(render(model, args.format, runs=args.runs), end="")


if __name__ == "__main__":
    main()
