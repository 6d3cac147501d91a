"""Tables never crash on a bad row, order rows without job numbers, and never count a run twice."""
from __future__ import annotations

import json
import logging

from omegaconf import OmegaConf

from ditq.tracking.store import ResultsStore
from ditq.tracking.table import main as table_main
from ditq.tracking.table import render_csv, render_markdown
from tests.test_sweeps import make_row

BAD_ROWS = {
    "bad-bytes.json": b"\xff\xfe{\"metrics\": {}}",  # not UTF-8
    "bad-list.json": b"[1, 2, 3]",  # JSON, not an object
    "bad-null.json": b"{\"run_id\": \"bad-null\", \"metrics\": null}",
    "bad-json.json": b"{\"metrics\": ",  # truncated
}


def _store_with_bad_rows(tmp_path) -> ResultsStore:
    store = ResultsStore(tmp_path / "results")
    store.append(make_row("good", sweep_dir=str(tmp_path / "sweep"), job_num=0))
    for name, data in BAD_ROWS.items():
        (store.rows_dir / name).write_bytes(data)
    return store


def test_unreadable_rows_are_skipped_and_named(tmp_path, capsys, caplog):
    store = _store_with_bad_rows(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ditq.tracking.store"):
        table_main(["--results", str(store.root)])
    out = capsys.readouterr().out
    assert "| rtn good" in out
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 4 unreadable result row(s)" in warning
    for name in BAD_ROWS:
        assert str(store.rows_dir / name) in warning
    assert "not UTF-8" in warning and "not a JSON object" in warning and "'metrics' is null" in warning


def test_sweep_table_is_written_despite_a_bad_row(tmp_path, monkeypatch):
    from ditq.tracking.callbacks import TableCallback
    from ditq.tracking.sweep import ENV, record_job

    monkeypatch.delenv(ENV, raising=False)
    store = _store_with_bad_rows(tmp_path)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}, "paths": {"results_dir": str(store.root)},
                            "table": {}, "experiment": None, "logger": {"wandb": False, "mode": "disabled"}})
    cb = TableCallback()
    cb.on_multirun_start(cfg)
    record_job(tmp_path / "sweep" / "0_rtn_good", {"run_id": "good"}, 0)
    cb.on_multirun_end(cfg)
    assert "| rtn good" in (tmp_path / "sweep" / "table.md").read_text()
    assert "rtn good" in (tmp_path / "sweep" / "table.csv").read_text()


def test_table_all_orders_single_runs_and_sweep_rows(tmp_path, capsys):
    store = ResultsStore(tmp_path / "results")
    sweep = str(tmp_path / "sweep")
    store.append(make_row("b-sweep1", sweep_dir=sweep, job_num=1, started="2026-01-01T00:00:05"))
    store.append(make_row("c-single", started="2026-01-01T00:00:00"))  # job_num None, sweep_dir None
    store.append(make_row("a-sweep0", sweep_dir=sweep, job_num=0, started="2026-01-01T00:00:06"))
    store.append(make_row("d-fp", is_fp=True, sweep_dir=sweep, job_num=2, started="2026-01-01T00:00:07"))
    table_main(["--results", str(store.root), "--all"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "Method" not in ln]
    assert [ln.split("|")[1].strip() for ln in lines] == ["FP", "rtn c-single", "rtn a-sweep0", "rtn b-sweep1"]


def test_a_run_with_several_rows_counts_once_newest_first(tmp_path):
    old = make_row("r1", run_key="k", finished="2026-01-01T00:05:00", metrics={"fid": 9.0},
                   config={"method": {"name": "rtn"}, "bits": {"name": "w8a8"}})
    new = make_row("r2", run_key="k", finished="2026-01-01T00:01:00", supersedes="r1", metrics={"fid": 3.0},
                   config={"method": {"name": "rtn"}, "bits": {"name": "w8a8"}})  # forced rerun, clock went back
    other = make_row("r3", run_key="k2", metrics={"fid": 5.0})
    again = make_row("r4", run_key="k2", finished="2026-01-02T00:00:00", metrics={"fid": 6.0}, config=other["config"])
    md = render_markdown([old, other, new, again], None)
    assert md.count("| rtn w8a8") == 1 and "3.00" in md and "9.00" not in md
    assert md.count("| rtn r3") == 1 and "6.00" in md and "5.00" not in md
    assert render_csv([old, new], None).count("rtn w8a8") == 1


def test_ditq_table_never_double_counts_a_forced_rerun(tmp_path, capsys):
    store = ResultsStore(tmp_path / "results")
    sweep = str(tmp_path / "sweep")
    store.append(make_row("r1", run_key="k", sweep_dir=sweep, job_num=0, metrics={"fid": 9.0}))
    store.append(make_row("r2", run_key="k", sweep_dir=sweep, job_num=0, supersedes="r1", metrics={"fid": 3.0}))
    table_main(["--results", str(store.root)])
    out = capsys.readouterr().out
    assert out.count("| rtn r") == 1 and "3.00" in out
    assert json.loads((store.rows_dir / "r1.json").read_text())["metrics"]["fid"] == 9.0  # the old row is kept
