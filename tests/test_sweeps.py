"""Sweeps never mix (unique dirs, own rows), die with their launcher, and never redo a finished run."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ditq.config import validate_config
from ditq.tracking.store import ResultsStore
from tests.conftest import SHRINK

ROOT = Path(__file__).resolve().parents[1]


def make_row(run_id: str, **kw) -> dict:
    row = {"run_id": run_id, "run_key": run_id, "is_fp": False, "wbits": 8, "abits": 8, "job_num": None,
           "sweep_dir": None, "started": "2026-01-01T00:00:00", "finished": "2026-01-01T00:01:00",
           "metrics": {"fid": 1.0}, "config": {"method": {"name": "rtn"}, "bits": {"name": run_id}}}
    row.update(kw)
    return row


class _FrozenClock(dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5)


# -- 1. sweep and run directories -----------------------------------------------------------------

def test_two_sweeps_started_in_the_same_second_get_distinct_dirs(compose, monkeypatch):
    import hydra.core.utils

    monkeypatch.setattr(hydra.core.utils, "datetime", _FrozenClock)  # Hydra's ${now:} resolver
    a, b = (compose(["bits=w8a8"], return_hydra_config=True) for _ in range(2))
    assert "03-04-05" in a.hydra.sweep.dir and "03-04-05" in b.hydra.sweep.dir  # the same second
    assert a.hydra.sweep.dir != b.hydra.sweep.dir
    assert a.hydra.run.dir != b.hydra.run.dir


def test_all_jobs_of_one_sweep_resolve_the_same_dir(compose):
    master = compose(["bits=w8a8"], return_hydra_config=True)
    sweep_dir = master.hydra.sweep.dir  # the launcher resolves it once, before dispatching jobs
    for bits in ("w8a8", "w4a4"):  # what Hydra's load_sweep_config does for each job
        job = compose([f"bits={bits}"], return_hydra_config=True)
        OmegaConf.copy_cache(from_config=master, to_config=job)
        assert job.hydra.sweep.dir == sweep_dir
        assert pickle.loads(pickle.dumps(job)).hydra.sweep.dir == sweep_dir  # as sent to a joblib worker


def _callback_config(tmp_path, sweep_dir):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}, "paths": {"results_dir": str(tmp_path / "results")},
                             "table": {}, "experiment": None, "logger": {"wandb": False, "mode": "disabled"}})


def test_sweep_table_lists_only_its_own_rows_when_two_sweeps_share_a_dir(tmp_path, monkeypatch):
    from ditq.tracking.callbacks import TableCallback
    from ditq.tracking.sweep import ENV, record_job

    monkeypatch.delenv(ENV, raising=False)
    sweep_dir = tmp_path / "sweep"
    store = ResultsStore(tmp_path / "results")
    cfg = _callback_config(tmp_path, sweep_dir)
    other = TableCallback()
    other.on_multirun_start(cfg)  # another sweep, same directory, its job w4a4
    store.append(make_row("other-w4a4", sweep_dir=str(sweep_dir), job_num=0))
    record_job(sweep_dir / "0_rtn_w4a4_other", {"run_id": "other-w4a4"}, 0)
    mine = TableCallback()
    mine.on_multirun_start(cfg)
    for n, bits in enumerate(["w8a8", "w6a6"]):
        store.append(make_row(f"mine-{bits}", sweep_dir=str(sweep_dir), job_num=n))
        record_job(sweep_dir / f"{n}_rtn_{bits}", {"run_id": f"mine-{bits}"}, n)
    mine.on_multirun_end(cfg)
    table = (sweep_dir / "table.md").read_text()
    assert "rtn mine-w8a8" in table and "rtn mine-w6a6" in table
    assert "other" not in table
    assert os.environ.get(ENV) is None  # the sweep's record ends with it


def test_sweep_table_includes_rows_its_jobs_reused(tmp_path, monkeypatch):
    """A rerun sweep whose jobs all found identical finished runs still prints their rows."""
    from ditq.tracking.callbacks import TableCallback
    from ditq.tracking.sweep import ENV, record_job

    monkeypatch.delenv(ENV, raising=False)
    store = ResultsStore(tmp_path / "results")
    store.append(make_row("w8a8", sweep_dir=str(tmp_path / "old"), job_num=3))
    sweep_dir = tmp_path / "new"
    cfg = _callback_config(tmp_path, sweep_dir)
    cb = TableCallback()
    cb.on_multirun_start(cfg)
    record_job(sweep_dir / "0_rtn_w8a8", {"run_id": "w8a8"}, 0)
    cb.on_multirun_end(cfg)
    assert "rtn w8a8" in (sweep_dir / "table.md").read_text()


# -- 3. workers die with their sweep ---------------------------------------------------------------

def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _wait_gone(pids, timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if not _gone(p)}
        time.sleep(0.2)
    return alive


def _kill(pids) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


LAUNCHER = """
import subprocess, sys, time
from ditq.tracking.sweep import begin_sweep
begin_sweep()
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stderr=open(sys.argv[2], "w"))
print(worker.pid, flush=True)
time.sleep(120)
"""
WORKER = """
import time
from ditq.tracking.sweep import start_watchdog
assert start_watchdog(interval_s=0.2) is not None
print("watching", flush=True)
time.sleep(60)
"""


def test_watchdog_stops_a_worker_whose_launcher_was_killed(tmp_path):
    err = tmp_path / "worker.err"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER, str(err)], stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    try:
        time.sleep(1.0)
        assert not _gone(worker)  # the launcher is alive: the worker keeps working
        launcher.kill()
        launcher.wait()
        assert not _wait_gone([worker], 10.0), "the worker outlived its sweep's launcher"
        assert f"the sweep's launching process (pid {launcher.pid}) is gone" in err.read_text()
    finally:
        _kill([worker])


def test_launcher_alive_sees_exit_zombie_and_pid_reuse(monkeypatch):
    from ditq.tracking import sweep

    me = sweep.begin_sweep()
    try:
        assert sweep.launcher_alive(me)
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        gone = sweep.SweepInfo("x", me.host, child.pid, None)
        assert not sweep.launcher_alive(gone)
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, not reaped yet
        assert not _wait_gone([zombie.pid], 10.0)
        assert not sweep.launcher_alive(sweep.SweepInfo("x", me.host, zombie.pid, None))
        zombie.wait()
        parent = os.getppid()  # alive, but not the process that started the sweep
        reused = sweep.SweepInfo("x", me.host, parent, sweep._proc_stat(parent)[1] + 1)
        assert not sweep.launcher_alive(reused)
        assert sweep.launcher_alive(sweep.SweepInfo("x", "another-host", child.pid, None))  # cannot tell: alive
    finally:
        sweep.end_sweep()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def test_killing_a_joblib_sweep_stops_its_workers_and_no_rows_appear(tmp_path):
    results = tmp_path / "results"
    # long jobs (many samples): without the watchdog they would run for minutes and then write rows
    overrides = [o for o in SHRINK if not o.startswith("eval.num_samples")] + [
        "eval.num_samples=2000", f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={results}",
        f"hydra.sweep.dir={tmp_path}/sweep", "bits=w8a8,w4a4", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
    ]
    main = subprocess.Popen([sys.executable, "-m", "ditq.cli", "-m", *overrides], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(list((tmp_path / "sweep").glob("*/.hydra/config.yaml"))) < 2:
            assert main.poll() is None, "the sweep ended before its jobs started"
            time.sleep(0.2)
        assert len(list((tmp_path / "sweep").glob("*/.hydra/config.yaml"))) == 2, "jobs did not start in 90 s"
        time.sleep(2.0)  # the jobs are past their start (watchdog running)
        workers = _descendants(main.pid)
        assert workers
        main.send_signal(signal.SIGKILL)  # only the main process
        main.wait()
        survivors = _wait_gone(workers, 20.0)
        assert not survivors, f"workers {sorted(survivors)} outlived the sweep"
        assert not list(results.rglob("*.json"))
    finally:
        _kill(workers)
        if main.poll() is None:
            main.kill()
            main.wait()


# -- 4. an identical finished run is not redone --------------------------------------------------

def test_identity_ignores_output_locations_but_not_weights_or_names(compose, tmp_path):
    from ditq.tracking.identity import run_key

    base = validate_config(compose(SHRINK + ["bits=w8a8"]))
    moved = validate_config(compose(SHRINK + ["bits=w8a8", f"paths.results_dir={tmp_path}/r",
                                              f"paths.cache_dir={tmp_path}/c", "logger=wandb_offline", "force=true"]))
    fp = {"files": {"transformer/model.safetensors": "abc"}}
    assert run_key(base, fp, "cpu") == run_key(moved, fp, "cpu")
    assert run_key(base, fp, "cpu") != run_key(base, {"files": {"transformer/model.safetensors": "abd"}}, "cpu")
    assert run_key(base, fp, "cpu") != run_key(validate_config(compose(SHRINK + ["bits=w4a4"])), fp, "cpu")
    named = validate_config(compose(SHRINK + ["bits=w8a8", "run_name=my-special-run"]))
    assert run_key(base, fp, "cpu") != run_key(named, fp, "cpu")


def test_rerun_of_a_finished_run_does_nothing_unless_forced(compose, tmp_path, caplog):
    from ditq.pipeline import run
    from ditq.tracking.table import _fmt, render_markdown

    paths = [f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results"]
    cfg = validate_config(compose(SHRINK + paths + ["bits=w8a8"]))
    first = run(cfg, output_dir=tmp_path / "a", progress=False)
    store = ResultsStore(tmp_path / "results")
    [(path, stored)] = list(store.entries())
    assert stored["run_key"] == first["run_key"] and stored["supersedes"] is None
    with caplog.at_level(logging.INFO, logger="ditq.pipeline"):
        again = run(validate_config(compose(SHRINK + paths + ["bits=w8a8"])), output_dir=tmp_path / "b", progress=False)
    assert again["run_id"] == first["run_id"]
    assert f"identical run already finished: {path}; force=true to redo" in caplog.text
    assert len(list(store.rows())) == 1
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file()]  # no work, nothing written
    forced = run(validate_config(compose(SHRINK + paths + ["bits=w8a8", "force=true"])), output_dir=tmp_path / "c",
                 progress=False)
    assert forced["run_id"] != first["run_id"] and forced["supersedes"] == first["run_id"]
    rows = list(store.rows())
    assert len(rows) == 2
    table = render_markdown(rows, None)
    assert table.count("| rtn w8a8") == 1  # the forced row supersedes the first
    assert _fmt(forced['timings']['sample_s']) in table  # the table's own number format


def test_rerun_sweep_reuses_rows_in_a_new_dir_and_prints_them(tmp_path):
    """Default sweep dirs (unique id), run twice: the second sweep computes nothing, writes no row,
    and its table still lists the run."""
    overrides = SHRINK + [f"paths.root={tmp_path}", "bits=w8a8"]
    outs = [subprocess.run([sys.executable, "-m", "ditq.cli", "-m", *overrides], cwd=ROOT, capture_output=True,
                           text=True, timeout=600) for _ in range(2)]
    for out in outs:
        assert out.returncode == 0, out.stderr[-3000:]
        assert "| rtn w8a8" in out.stdout
    assert "identical run already finished" in outs[1].stdout + outs[1].stderr
    rows = list(ResultsStore(tmp_path / "results").rows())
    assert len(rows) == 1
    sweeps = sorted(p.parent for p in (tmp_path / "outputs" / "multirun").rglob("table.md"))
    assert len(sweeps) == 2  # two sweeps, two directories
    assert rows[0]["sweep_dir"] in {str(s.resolve()) for s in sweeps}
    for s in sweeps:
        assert "| rtn w8a8" in (s / "table.md").read_text()
        [job] = [json.loads(p.read_text()) for p in s.rglob("sweep_job.json")]
        assert job["run_id"] == rows[0]["run_id"]
