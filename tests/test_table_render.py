"""Paper-versus-ours tables (ditq.tracking.table / render): missing cells stay missing, differences
(also against "FP+x" paper values), provenance, the four formats, --out, and the W&B sweep table."""
from __future__ import annotations

import csv
import glob
import io
import json
import re
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ditq.tracking.render import MISSING_MD, to_csv, to_latex, to_markdown
from ditq.tracking.store import ResultsStore
from ditq.tracking.table import (TableSpecError, build_table, fp_label, main as table_main, paper_value_problem,
                                 render_csv, render_latex, render_markdown, row_label)

KEYS = ["sampler.num_steps", "method.name", "bits.name"]


def run_row(rid: str, method: str, bits: str, steps: int = 100, fp: bool = False, sweep: str | None = "/sw/a",
            job: int = 0, started: str = "2026-01-01T00:00:00", **metrics) -> dict:
    """A result row shaped like the pipeline's (the fields the tables read)."""
    return {"run_id": rid, "run_key": rid, "run_name": f"dit-{method}-{bits}", "experiment": "tests/fake",
            "is_fp": fp, "wbits": 32 if fp else 4, "abits": 32 if fp else 8, "job_num": job, "sweep_dir": sweep,
            "output_dir": f"/runs/{rid}", "started": started, "finished": started, "supersedes": None,
            "metrics": dict(metrics), "size_mb": 12.5,
            "config": {"method": {"name": method}, "bits": {"name": bits}, "sampler": {"num_steps": steps}}}


def layout(paper: dict | None = None, **kw) -> dict:
    return {"title": "Fake table", "rows": KEYS, "columns": {"fid": "FID", "sfid": "sFID"}, "paper": paper or {}, **kw}


def cells_of(md: str, label: str) -> list[str]:
    [line] = [ln for ln in md.splitlines() if ln.startswith(f"| {label} ")]
    return [c.strip() for c in line.strip("|").split("|")]


def header_of(md: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith("| Method"))
    return [c.strip() for c in line.strip("|").split("|")]


# ----------------------------------------------------------------------------- the model
def test_paper_rows_without_a_run_are_missing_never_numbers():
    table = layout({"100 gptq w8a8": {"fid": 16.44, "sfid": 23.51}, "100 qdit w8a8": {"fid": 11.93}})
    rows = [run_row("r-q", "qdit", "w8a8", fid=12.0, sfid=18.0)]
    model = build_table(rows, table)
    assert [r.label for r in model.rows] == ["100 gptq w8a8", "100 qdit w8a8"]
    empty = model.rows[0]
    assert empty.runs == [] and empty.wa is None
    assert all(c.ours is None and c.diff is None for c in empty.cells.values())
    assert empty.cells["fid"].paper == 16.44

    md = render_markdown(rows, table)
    header, cells = header_of(md), cells_of(md, "100 gptq w8a8")
    got = dict(zip(header, cells))
    assert got["FID"] == got["sFID"] == got["FID Δ"] == got["W/A"] == got["Runs"] == MISSING_MD
    assert got["FID paper"] == "16.44" and got["sFID paper"] == "23.51"

    [csv_row] = [r for r in csv.DictReader(io.StringIO(render_csv(rows, table))) if r["Method"] == "100 gptq w8a8"]
    assert csv_row["FID"] == csv_row["FID diff"] == csv_row["sFID"] == csv_row["runs"] == csv_row["run_dirs"] == ""
    assert float(csv_row["FID paper"]) == 16.44

    [tex_line] = [ln for ln in render_latex(rows, table).splitlines() if ln.startswith("100 gptq")]
    tex_cells = [c.strip() for c in tex_line.removesuffix(r"\\").split("&")]
    assert tex_cells[1:5] == [r"\textemdash{}", r"\textemdash{}", "16.44", r"\textemdash{}"]
    assert not re.search(r"\d", "".join(c for c in tex_cells[1:] if c not in ("16.44", "23.51")))


def test_difference_is_ours_minus_paper_and_signed():
    table = layout({"100 gptq w8a8": {"fid": 16.44, "sfid": 23.51}})
    rows = [run_row("r-g", "gptq", "w8a8", fid=17.0, sfid=23.0)]
    cells = build_table(rows, table).rows[0].cells
    assert cells["fid"].diff == pytest.approx(0.56) and cells["sfid"].diff == pytest.approx(-0.51)
    got = dict(zip(header_of(render_markdown(rows, table)), cells_of(render_markdown(rows, table), "100 gptq w8a8")))
    assert got["FID"] == "17.00" and got["FID paper"] == "16.44" and got["FID Δ"] == "+0.5600"
    assert got["sFID Δ"] == "-0.5100"
    assert r"$-$0.5100" in render_latex(rows, table)


def test_fp_relative_paper_value_is_our_fp_row_plus_x():
    table = layout({"100 hqdit w4a4_fp4": {"sfid": "FP+0.12"}, "50 hqdit w4a4_fp4": {"sfid": "FP-0.5"},
                    "100 gptq w4a4": {"sfid": "FP+1"}})
    rows = [run_row("fp100", "hqdit", "fp", fp=True, sfid=17.5, fid=5.0),
            run_row("hq100", "hqdit", "w4a4_fp4", sfid=18.0, job=1),
            run_row("hq50", "hqdit", "w4a4_fp4", steps=50, sfid=19.0, job=2)]  # no FP run at 50 steps
    model = build_table(rows, table)
    by = {r.label: r for r in model.rows}
    hq = by["100 hqdit w4a4_fp4"].cells["sfid"]
    assert hq.paper == pytest.approx(17.62) and hq.diff == pytest.approx(0.38) and hq.paper_base == "100 FP"
    assert [(r.run_id, r.used_for) for r in by["100 hqdit w4a4_fp4"].runs] == [
        ("hq100", "ours"), ("fp100", "paper sfid = our FP +0.12")]
    missing = by["50 hqdit w4a4_fp4"].cells["sfid"]
    assert missing.ours == 19.0 and missing.paper is None and missing.diff is None
    assert "'50 FP'" in missing.note and "missing" in missing.note
    assert [r.run_id for r in by["50 hqdit w4a4_fp4"].runs] == ["hq50"]
    no_run = by["100 gptq w4a4"]  # no run of its own, but our FP row exists: the paper value is known
    assert no_run.cells["sfid"].paper == pytest.approx(18.5) and no_run.cells["sfid"].ours is None
    assert [r.run_id for r in no_run.runs] == ["fp100"]
    md = render_markdown(rows, table)
    assert "17.62†" in md and "our FP row '100 FP' (run fp100: 17.50) +0.12" in md
    assert dict(zip(header_of(md), cells_of(md, "50 hqdit w4a4_fp4")))["sFID paper"] == MISSING_MD + "†"


def test_fp_relative_value_takes_the_fp_run_of_the_same_sweep():
    table = layout({"100 hqdit w4a4_fp4": {"sfid": "FP+0.12"}})
    rows = [run_row("fp-a", "hqdit", "fp", fp=True, sfid=17.0, sweep="/sw/a"),
            run_row("fp-b", "hqdit", "fp", fp=True, sfid=30.0, sweep="/sw/b"),
            run_row("hq-b", "hqdit", "w4a4_fp4", sfid=31.0, sweep="/sw/b")]
    [row] = [r for r in build_table(rows, table).rows if r.label == "100 hqdit w4a4_fp4"]
    assert row.cells["sfid"].paper == pytest.approx(30.12) and [r.run_id for r in row.runs] == ["hq-b", "fp-b"]
    no_run = build_table(rows[:2], table).rows[0]  # no run to pick the sweep by: two candidates, missing
    assert no_run.cells["sfid"].paper is None and "several FP runs" in no_run.cells["sfid"].note


def test_bad_paper_values_are_refused_naming_cell_and_fix(tmp_path, capsys):
    for bad in ("FP*2", "n/a", True, [1]):
        with pytest.raises(TableSpecError) as err:
            build_table([], layout({"100 gptq w8a8": {"fid": bad}}))
        msg = str(err.value)
        assert "table.paper.'100 gptq w8a8'.fid" in msg and "FP+0.12" in msg
    assert paper_value_problem("x", "fid", "FP + 0.12") is None and paper_value_problem("x", "fid", "12.4") is None
    store = ResultsStore(tmp_path / "results")
    store.append({**run_row("r1", "gptq", "w8a8", fid=1.0), "config": {**run_row("r1", "gptq", "w8a8")["config"],
                                                                        "table": layout({"a b c": {"fid": "FPx"}})}})
    with pytest.raises(SystemExit) as exit_:
        table_main(["--results", str(store.root), "--all"])
    assert "bad table layout" in str(exit_.value) and "'FPx'" in str(exit_.value)


def test_rows_are_paper_order_then_runs_in_launch_order():
    table = layout({"100 qdit w8a8": {"fid": 1.0}, "100 FP": {"fid": 2.0}, "100 gptq w8a8": {"fid": 3.0}})
    rows = [run_row("late", "rtn", "w4a4", job=3, started="2026-01-01T00:00:09"),
            run_row("g", "gptq", "w8a8", job=2), run_row("fp", "gptq", "fp", fp=True, job=1),
            run_row("early", "rtn", "w8a8", job=0)]
    labels = [r.label for r in build_table(rows, table).rows]
    assert labels == ["100 qdit w8a8", "100 FP", "100 gptq w8a8", "100 rtn w8a8", "100 rtn w4a4"]
    assert [r.label for r in build_table(rows, table, paper_rows=False).rows] == labels[1:]


def test_fp_label_matches_row_label_of_the_fp_run():
    keys = ["sampler.num_steps", "sampler.cfg_scale", "method.name", "bits.name"]
    fp = {"is_fp": True, "config": {"sampler": {"num_steps": 100, "cfg_scale": 1.0}, "method": {"name": "gptq"},
                                    "bits": {"name": "fp"}}}
    assert fp_label("100 1.0 gptq w8a8", keys) == row_label(fp, keys) == "100 1.0 FP"
    assert fp_label("gptq w8a8", ["method.name", "bits.name"]) == "FP"
    assert fp_label("a label with spaces", keys[:2]) is None


# ----------------------------------------------------------------------------- provenance
def test_provenance_lists_exactly_the_runs_used():
    table = layout({"100 hqdit w4a4_fp4": {"sfid": "FP+0.12"}})
    old = run_row("hq-old", "hqdit", "w4a4_fp4", sfid=99.0)
    new = {**run_row("hq-new", "hqdit", "w4a4_fp4", sfid=18.0, job=1), "run_key": "hq-old", "supersedes": "hq-old"}
    rows = [run_row("fp", "hqdit", "fp", fp=True, sfid=17.5), old, new, run_row("g", "gptq", "w4a4", sfid=25.0)]
    model = build_table(rows, table)
    runs = {r.label: [(x.run_id, x.run_dir, x.result) for x in r.runs] for r in model.rows}
    assert runs == {"100 hqdit w4a4_fp4": [("hq-new", "/runs/hq-new", "/runs/hq-new/result.json"),
                                           ("fp", "/runs/fp", "/runs/fp/result.json")],
                    "100 FP": [("fp", "/runs/fp", "/runs/fp/result.json")],
                    "100 gptq w4a4": [("g", "/runs/g", "/runs/g/result.json")]}
    for text in (render_markdown(rows, table), render_latex(rows, table), render_csv(rows, table)):
        assert "hq-old" not in text  # the superseded run fed no cell
    md = render_markdown(rows, table)
    assert cells_of(md, "100 hqdit w4a4_fp4")[-1] == "hq-new, fp"
    assert "- `hq-new`: /runs/hq-new/result.json" in md and "- `g`: /runs/g/result.json" in md
    [csv_row] = [r for r in csv.DictReader(io.StringIO(render_csv(rows, table))) if r["Method"].startswith("100 hq")]
    assert csv_row["runs"] == "hq-new;fp" and csv_row["run_dirs"] == "/runs/hq-new;/runs/fp"
    as_json = model.to_dict()
    assert as_json["rows"][0]["runs"][1]["used_for"] == "paper sfid = our FP +0.12"
    assert as_json["rows"][0]["runs"][0]["sweep_dir"] == "/sw/a"


def test_no_runs_drops_the_runs_column_and_list():
    rows = [run_row("g", "gptq", "w4a4", fid=2.0)]
    table = layout({"100 gptq w4a4": {"fid": 1.0}})
    md = render_markdown(rows, table, runs=False)
    assert "Runs" not in md and "`g`" not in md
    assert "runs" not in next(csv.reader(io.StringIO(render_csv(rows, table, runs=False))))
    assert r"\texttt" not in render_latex(rows, table, runs=False) and "% run g" not in render_latex(rows, table,
                                                                                                   runs=False)


# ----------------------------------------------------------------------------- formats
def test_table_without_paper_renders_like_before():
    rows = [run_row("fp", "rtn", "fp", fp=True, fid=0.77), run_row("q", "rtn", "w8a8", fid=1.5)]
    table = {"rows": ["method.name", "bits.name"], "columns": {"fid": "FID", "size_mb": "Size (MB)"}}
    md = render_markdown(rows, table, runs=False)
    assert header_of(md) == ["Method", "W/A", "FID", "Size (MB)"]  # no paper / Δ columns
    assert cells_of(md, "FP") == ["FP", "32/32", "0.7700", "12.50"]
    assert "paper" not in md and "Δ" not in md
    assert next(csv.reader(io.StringIO(render_csv(rows, table)))) == ["Method", "W/A", "FID", "Size (MB)", "runs",
                                                                       "run_dirs"]
    assert r"\cmidrule" not in render_latex(rows, table) and "ours" not in render_latex(rows, table)
    # a column the paper leaves empty gets no paper columns either
    md = render_markdown(rows, {**table, "paper": {"rtn w8a8": {"fid": 1.4, "size_mb": None}}}, runs=False)
    assert header_of(md) == ["Method", "W/A", "FID", "FID paper", "FID Δ", "Size (MB)"]


def _braces_balanced(text: str) -> bool:
    depth = 0
    for line in text.splitlines():
        if line.startswith("%"):
            continue
        for m in re.finditer(r"\\[{}]|[{}]", line):
            if m.group() in ("\\{", "\\}"):
                continue
            depth += 1 if m.group() == "{" else -1
            if depth < 0:
                return False
    return depth == 0


def test_latex_is_booktabs_with_escaped_labels():
    table = layout({"100 hqdit w4a4_fp4": {"sfid": "FP+0.12", "fid": 7.0}}, title="HQ-DiT: 10% & W4A4_FP4 #1")
    rows = [run_row("fp_1", "hqdit", "fp", fp=True, sfid=17.5, fid=5.0),
            run_row("hq_1", "hqdit", "w4a4_fp4", sfid=18.0, fid=6.0, job=1),
            run_row("x", "my_method{&}", "w4a4", fid=float("nan"), job=2)]
    tex = render_latex(rows, table)
    lines = tex.splitlines()
    assert lines[0].startswith("% HQ-DiT")  # the title as a comment
    body = [ln for ln in lines if not ln.startswith("%")]
    assert body[0] == r"\begin{tabular}{llrrrrrrl}" and body[1] == r"\toprule" and body[-1] == r"\end{tabular}"
    assert body[-2] == r"\bottomrule" and r"\midrule" in body
    assert r"\cmidrule(lr){3-5} \cmidrule(lr){6-8}" in body
    assert _braces_balanced(tex)
    rows_tex = body[body.index(r"\midrule") + 1:-2]
    assert len(rows_tex) == 3
    for ln in rows_tex:
        assert ln.endswith(r"\\") and len(re.findall(r"(?<!\\)&", ln)) == 8  # 9 columns
        assert not re.search(r"(?<!\\)_", ln)  # every underscore escaped
    assert r"100 hqdit w4a4\_fp4" in tex and r"my\_method\{\&\}" in tex and r"\texttt{fp\_1}" in tex
    assert r"17.62$^\dagger$" in tex and "nan" in tex


def test_csv_round_trips_the_model():
    table = layout({"100 gptq w8a8": {"fid": 16.44, "sfid": "FP+0.12"}, "100 qdit w8a8": {"fid": 11.93}})
    rows = [run_row("fp", "gptq", "fp", fp=True, fid=12.345678901, sfid=1 / 3),
            run_row("g", "gptq", "w8a8", fid=17.000000001, sfid=0.1 + 0.2, job=1)]
    model = build_table(rows, table)
    parsed = list(csv.reader(io.StringIO(to_csv(model))))
    assert len(parsed) == 1 + len(model.rows)
    for row, line in zip(model.rows, parsed[1:]):
        values = iter(line[2:])
        assert line[0] == row.label and line[1] == (row.wa or "")
        for col in model.columns:
            cell = row.cells[col.key]
            wanted = [cell.ours] + ([cell.paper, cell.diff] if col.has_paper else [])
            for want in wanted:
                got = next(values)
                assert (got == "") if want is None else float(got) == want
        assert next(values).split(";") == [r.run_id for r in row.runs] or not row.runs


def test_out_writes_all_four_files_atomically(tmp_path, capsys):
    store = ResultsStore(tmp_path / "results")
    for row in (run_row("g1", "gptq", "w8a8", fid=17.0, job=0), run_row("q1", "qdit", "w8a8", fid=12.0, job=1)):
        row["config"]["table"] = layout({"100 gptq w8a8": {"fid": 16.44}})
        store.append(row)
    out = tmp_path / "tables"
    table_main(["--results", str(store.root), "--experiment", "tests/fake", "--out", str(out)])
    printed = capsys.readouterr().out.split()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["tests__fake.csv", "tests__fake.json", "tests__fake.md", "tests__fake.tex"]  # no temp files
    assert sorted(Path(p).name for p in printed) == names
    table_main(["--results", str(store.root), "--experiment", "tests/fake", "--format", "md"])
    assert (out / "tests__fake.md").read_text() == capsys.readouterr().out
    for fmt, suffix in (("latex", "tex"), ("csv", "csv"), ("json", "json")):
        table_main(["--results", str(store.root), "--experiment", "tests/fake", "--format", fmt])
        assert (out / f"tests__fake.{suffix}").read_bytes().decode() == capsys.readouterr().out
    model = json.loads((out / "tests__fake.json").read_text())
    assert [r["label"] for r in model["rows"]] == ["100 gptq w8a8", "100 qdit w8a8"]
    assert model["rows"][0]["cells"]["fid"] == {"ours": 17.0, "paper": 16.44, "diff": pytest.approx(0.56),
                                                 "paper_spec": 16.44, "paper_base": None, "note": None}
    assert model["rows"][0]["runs"][0]["result"] == "/runs/g1/result.json"


def test_experiment_file_table_lists_paper_rows_before_any_run(tmp_path, capsys):
    table_main(["--results", str(tmp_path / "empty"), "--experiment", "qdit/table2_imagenet256"])
    md = capsys.readouterr().out
    got = dict(zip(header_of(md), cells_of(md, "100 1.0 gptq w8a8")))
    assert got["FID paper"] == "16.44" and got["FID"] == got["FID Δ"] == got["Runs"] == MISSING_MD
    assert md.count(f"| {MISSING_MD}") > 36  # every row's own cells are missing
    with pytest.raises(SystemExit):
        table_main(["--results", str(tmp_path / "empty"), "--experiment", "digits/no_such_table"])


def test_markdown_and_latex_keep_the_numbers_of_today():
    rows = [run_row("q", "rtn", "w8a8", fid=0.123456, sfid=123.456)]
    model = build_table(rows, layout())
    assert cells_of(to_markdown(model), "100 rtn w8a8")[2:4] == ["0.1235", "123.46"]
    assert "0.1235 & 123.46" in to_latex(model)


# ----------------------------------------------------------------------------- W&B (offline)
def _wandb_records(run_dir: str, timeout_s: float = 30.0) -> list:
    """The records of an offline run's .wandb file (W&B's leveldb-style log of protobuf records),
    once complete: wandb-core (a separate process) may finish writing it just after run.finish()."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = _read_wandb_file(run_dir)
        except Exception:  # caught mid-write (a truncated record): read again
            if time.monotonic() > deadline:
                raise
            records = []
        if any(rec.WhichOneof("record_type") == "exit" for rec in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _read_wandb_file(run_dir: str) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = glob.glob(str(Path(run_dir).parent / "run-*.wandb"))
    data, block, pos, buf, out = Path(path).read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_sweep_table_mirrors_the_rendered_table_and_runs_keep_metrics(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from ditq.tracking.wandb_log import group_name, log_run, log_sweep_table, table_data

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = SimpleNamespace(project="ditq-test", entity=None, mode="offline", tags=[])
    sweep = tmp_path / "sweep"
    table = layout({"100 hqdit w4a4_fp4": {"sfid": "FP+0.12"}, "100 gptq w4a4": {"fid": 25.48}})
    rows = [run_row("fp", "hqdit", "fp", fp=True, sfid=17.5, fid=5.0, sweep=str(sweep)),
            run_row("hq", "hqdit", "w4a4_fp4", sfid=18.0, fid=6.0, job=1, sweep=str(sweep))]
    for r in rows:
        r["config"]["table"] = table
    run_dir = log_run(rows[1], logger, tmp_path / "job1", table, None)
    records = _wandb_records(run_dir)
    assert records[-1].WhichOneof("record_type") == "exit"
    summary = {u.key: json.loads(u.value_json) for rec in records if rec.WhichOneof("record_type") == "summary"
               for u in rec.summary.update if u.key}
    assert summary["metrics/fid"] == 6.0 and summary["metrics/sfid"] == 18.0 and summary["size_mb"] == 12.5
    [run_rec] = [rec.run for rec in records if rec.WhichOneof("record_type") == "run"]
    assert run_rec.run_group == group_name("tests/fake", sweep) == "tests/fake/sweep"
    [one] = glob.glob(str(Path(run_dir) / "media" / "table" / "results_*.table.json"))
    assert json.loads(Path(one).read_text())["data"] == table_data(build_table([rows[1]], table, paper_rows=False))[1]

    cfg = OmegaConf.create({"experiment": "tests/fake", "logger": vars(logger)})
    table_dir = log_sweep_table(rows, table, cfg, sweep)
    assert Path(table_dir).is_relative_to(sweep / "wandb")
    [path] = glob.glob(str(Path(table_dir) / "media" / "table" / "table_*.table.json"))
    logged = json.loads(Path(path).read_text())
    columns, data = table_data(build_table(rows, table))
    assert logged["columns"] == columns == ["Method", "W/A", "FID", "FID paper", "FID Δ", "sFID", "sFID paper",
                                            "sFID Δ", "Runs"]
    assert logged["data"] == data
    assert [d[0] for d in data] == ["100 hqdit w4a4_fp4", "100 gptq w4a4", "100 FP"]
    assert data[1][2] is None and data[1][3] == 25.48  # no run: ours missing, never a number
    assert data[0][6] == pytest.approx(17.62) and data[0][-1] == "hq, fp"
    assert [rec.run.run_group for rec in _wandb_records(table_dir) if rec.WhichOneof("record_type") == "run"] == [
        run_rec.run_group]
