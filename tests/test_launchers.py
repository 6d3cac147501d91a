"""Hydra launchers (conf/hydra/launcher/) and sweep reliability: a failing job is recorded while the
others finish, concurrent sweeps share one results store, reruns do no work unless forced."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ditq.cli import LAUNCHER_SCHEMA_NOTICE
from ditq.tracking.store import ResultsStore
from tests.conftest import SHRINK

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_DIR = ROOT / "conf" / "hydra" / "launcher"
ASSET_MODEL = ROOT / "src" / "ditq" / "assets" / "tiny_dit_digits"
FAST = SHRINK + ["diagnostics.enabled=false"]
quiet_schema_notice = pytest.mark.filterwarnings(f"ignore:{LAUNCHER_SCHEMA_NOTICE}:UserWarning")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One content-keyed cache for this module's end-to-end sweeps (FP samples, calibration, features):
    each test keeps its own results store, so every run is still computed and written."""
    return tmp_path_factory.mktemp("cache")


def ditq_sweep(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ditq.cli", "-m", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def start_sweep(*overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ditq.cli", "-m", *overrides], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def sweep_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "outputs" / "multirun").rglob("multirun.yaml"))


# -- the launcher configs ------------------------------------------------------------------------

PLUGIN_SCHEMAS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher.config:JobLibLauncherConf",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher.config:LocalQueueConf",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher.config:SlurmQueueConf",
}


def _plugin_schema(name: str):
    import importlib

    module, cls = PLUGIN_SCHEMAS[name].split(":")
    return OmegaConf.structured(getattr(importlib.import_module(module), cls))


@quiet_schema_notice
@pytest.mark.parametrize("name", sorted(PLUGIN_SCHEMAS))
def test_launcher_choice_resolves_to_our_file_and_it_lists_every_plugin_key(compose, name):
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    ours = OmegaConf.to_container(OmegaConf.load(LAUNCHER_DIR / f"{name}.yaml"))
    composed = compose([f"hydra/launcher={name}"], return_hydra_config=True).hydra.launcher
    assert composed.keys() == ours.keys() == _plugin_schema(name).keys()  # complete: works without the schema too
    assert OmegaConf.to_container(composed, resolve=False) == ours
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):  # which source Hydra loads it from
        found = GlobalHydra.instance().config_loader().repository.load_config(f"hydra/launcher/{name}")
    assert (found.provider, found.path, found.is_schema_source) == ("main", f"file://{ROOT / 'conf'}", False)


@quiet_schema_notice
def test_launcher_files_are_checked_against_the_plugin_schema(compose):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="timeout_min"):
        compose(["hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=an_hour"], return_hydra_config=True)
    with pytest.raises(ConfigCompositionException, match="partiton"):
        compose(["hydra/launcher=submitit_slurm", "hydra.launcher.partiton=gpu"], return_hydra_config=True)


def test_the_cli_silences_only_hydras_schema_matching_notice(compose):
    import ditq.cli

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compose(["hydra/launcher=joblib"])
    notices = [w for w in seen if "validated against ConfigStore schema" in str(w.message)]
    assert notices, "Hydra no longer matches the launcher files to the plugins' schemas: revisit conf/hydra/launcher"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=ditq.cli.LAUNCHER_SCHEMA_NOTICE, category=UserWarning)
        compose(["hydra/launcher=joblib"])
        warnings.warn("another UserWarning")
    assert [str(w.message) for w in seen] == ["another UserWarning"]


@quiet_schema_notice
def test_submitit_slurm_config_makes_a_valid_sbatch_script(compose, tmp_path, monkeypatch):
    """What the plugin's launch() does with our file, up to the sbatch script: no cluster needed (submitit
    only looks for `srun` on PATH when the executor is built; the stub is never run)."""
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    import submitit

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cfg = compose(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                   "hydra.launcher.setup=[module load cuda]", f"hydra.sweep.dir={tmp_path}/sweep"],
                  return_hydra_config=True)
    params = dict(instantiate(cfg.hydra.launcher).params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "0")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=360", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --job-name=ditq", "\nmodule load cuda\n"):
        assert line in script, line


# -- failure records and the sweep's summary (no runs) --------------------------------------------

def _fail(job_dir: Path, job_num: int, sweep_id: str, message: str = "no weights at /x") -> Path:
    from ditq.tracking.failures import record_failure

    try:
        raise FileNotFoundError(message)
    except FileNotFoundError as err:
        return record_failure(job_dir, err, job_num, ["eval.num_samples=20", f"bits=w{job_num}a8"], sweep_id)


def test_failure_record_holds_job_overrides_error_and_traceback(tmp_path):
    from ditq.tracking.failures import failure_records

    path = _fail(tmp_path / "sweep" / "1_rtn_w1a8", 1, "s1")
    rec = json.loads(path.read_text())
    assert {k: rec[k] for k in ("sweep_id", "job_num", "overrides", "error_type", "message")} == {
        "sweep_id": "s1", "job_num": 1, "overrides": ["eval.num_samples=20", "bits=w1a8"],
        "error_type": "FileNotFoundError", "message": "no weights at /x"}
    trace = Path(rec["traceback"]).read_text()
    assert "Traceback" in trace and "_fail" in trace and "FileNotFoundError: no weights at /x" in trace
    _fail(tmp_path / "sweep" / "0_rtn_w0a8", 0, "other-sweep")  # same dir, another sweep
    assert [r["job_num"] for r in failure_records(tmp_path / "sweep", "s1")] == [1]
    assert [r["job_num"] for r in failure_records(tmp_path / "sweep")] == [0, 1]


def test_sweep_end_lists_failures_after_the_table_and_exits_nonzero(tmp_path, monkeypatch):
    from ditq.tracking.callbacks import TableCallback
    from ditq.tracking.sweep import ENV, record_job
    from tests.test_sweeps import make_row

    monkeypatch.delenv(ENV, raising=False)
    sweep_dir = tmp_path / "sweep"
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}, "overrides": {"task": [
        "eval.num_samples=20", "bits=w0a8,w1a8,w2a8"]}}, "paths": {"results_dir": str(tmp_path / "results")},
        "table": {}, "experiment": None, "logger": {"wandb": False, "mode": "disabled"}})
    cb = TableCallback()
    cb.on_multirun_start(cfg)
    store = ResultsStore(tmp_path / "results")
    for n in (0, 2):
        store.append(make_row(f"w{n}a8", sweep_dir=str(sweep_dir), job_num=n))
        record_job(sweep_dir / f"{n}_rtn_w{n}a8", {"run_id": f"w{n}a8"}, n)
    _fail(sweep_dir / "1_rtn_w1a8", 1, cb.sweep.sweep_id, "no weights at /x\nsecond line")
    with pytest.raises(SystemExit) as exit_:
        cb.on_multirun_end(cfg)
    assert str(exit_.value.code).startswith("ditq: 1 of 3 jobs failed")  # a message: exit status 1
    table = (sweep_dir / "table.md").read_text()
    assert "rtn w0a8" in table and "rtn w2a8" in table
    summary = table[table.index("1 of 3 jobs failed:"):]
    assert f"- job 1 (bits=w1a8): FileNotFoundError: no weights at /x (traceback: {sweep_dir.resolve()}" in summary
    assert "second line" not in summary and "eval.num_samples" not in summary  # first line; swept keys only


def test_sweep_whose_jobs_all_failed_still_reports_them(tmp_path, monkeypatch):
    from ditq.tracking.callbacks import TableCallback
    from ditq.tracking.sweep import ENV

    monkeypatch.delenv(ENV, raising=False)
    sweep_dir = tmp_path / "sweep"
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}, "paths": {"results_dir": str(tmp_path / "r")},
                            "table": {}, "experiment": None, "logger": {"wandb": False, "mode": "disabled"}})
    cb = TableCallback()
    cb.on_multirun_start(cfg)
    _fail(sweep_dir / "0_rtn_w0a8", 0, cb.sweep.sweep_id)
    with pytest.raises(SystemExit, match="1 of 1 jobs failed"):
        cb.on_multirun_end(cfg)
    assert "- job 0 (eval.num_samples=20 bits=w0a8): FileNotFoundError" in (sweep_dir / "table.md").read_text()


def test_a_sweep_job_that_fails_is_recorded_and_returns(compose, tmp_path, monkeypatch):
    """In a multirun the task records any exception (here the config check of this job's overrides)
    instead of ending the process, so the launcher goes on with the other jobs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from ditq.cli import task
    from ditq.tracking.sweep import ENV, begin_sweep, end_sweep

    monkeypatch.delenv(ENV, raising=False)
    cfg = compose(SHRINK + ["bits.weight=fp4_e4m1"], return_hydra_config=True)  # no such 4-bit format
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / "3_rtn_w4a8")
        cfg.hydra.job.num = 3
    HydraConfig.instance().set_config(cfg)
    info = begin_sweep()
    try:
        assert task(cfg) is None
    finally:
        end_sweep()
        HydraConfig.instance().cfg = None
    rec = json.loads((tmp_path / "sweep" / "3_rtn_w4a8" / "job_failure.json").read_text())
    assert (rec["sweep_id"], rec["job_num"], rec["error_type"]) == (info.sweep_id, 3, "ConfigError")
    assert "bits.weight=fp4_e4m1" in rec["overrides"] and "fp4_e4m1" in rec["message"]


# -- end to end ------------------------------------------------------------------------------------

def test_joblib_sweep_with_a_failing_job_finishes_the_others_and_records_it(tmp_path, shared_cache):
    """Job 1's model directory does not exist: the config is valid, the run fails when it loads."""
    missing = tmp_path / "no_such_model"
    (tmp_path / "model_copy").symlink_to(ASSET_MODEL)
    out = ditq_sweep(*FAST, f"paths.root={tmp_path}", f"paths.cache_dir={shared_cache}",
                     f"model.path={ASSET_MODEL},{missing},{tmp_path / 'model_copy'}",
                     "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert out.returncode == 1, out.stderr[-3000:]
    rows = list(ResultsStore(tmp_path / "results").rows())
    assert sorted(r["job_num"] for r in rows) == [0, 2]  # the other two finished and were stored
    [sweep] = sweep_dirs(tmp_path)
    rec = json.loads((sweep / "1_rtn_w8a8" / "job_failure.json").read_text())
    assert rec["job_num"] == 1 and f"model.path={missing}" in rec["overrides"]
    assert rec["error_type"] == "MissingCheckpointError" and str(missing) in rec["message"]
    assert "MissingCheckpointError" in Path(rec["traceback"]).read_text()
    table = (sweep / "table.md").read_text()
    assert all(r["run_id"] in table for r in rows)
    assert f"1 of 3 jobs failed:\n- job 1 (model.path={missing}): MissingCheckpointError: " in table
    assert "1 of 3 jobs failed" in out.stdout and f"ditq: 1 of 3 jobs failed: see {sweep}" in out.stderr


def test_two_concurrent_joblib_sweeps_share_one_store_intact(tmp_path, shared_cache):
    common = [*FAST, f"paths.root={tmp_path}", f"paths.cache_dir={shared_cache}", "hydra/launcher=joblib",
              "hydra.launcher.n_jobs=2"]
    procs = {bits: start_sweep(*common, f"bits={bits}") for bits in ("w8a8,w4a8", "w6a6,w4a4")}
    outs = {bits: p.communicate(timeout=400) for bits, p in procs.items()}
    for bits, p in procs.items():
        assert p.returncode == 0, outs[bits][1][-3000:]
    files = sorted((tmp_path / "results" / "rows").iterdir())
    assert [f.suffix for f in files] == [".json"] * 4  # no temporary or partial files left
    rows = [json.loads(f.read_text()) for f in files]  # every row parses
    assert sorted(r["config"]["bits"]["name"] for r in rows) == ["w4a4", "w4a8", "w6a6", "w8a8"]  # none lost
    by_sweep = {}
    for r in rows:
        by_sweep.setdefault(r["sweep_dir"], set()).add(r["config"]["bits"]["name"])
    assert sorted(map(sorted, by_sweep.values())) == [["w4a4", "w6a6"], ["w4a8", "w8a8"]]
    spans = [(min(r["started"] for r in rows if r["sweep_dir"] == d),
              max(r["finished"] for r in rows if r["sweep_dir"] == d)) for d in by_sweep]
    assert spans[0][0] <= spans[1][1] and spans[1][0] <= spans[0][1]  # the two sweeps ran at the same time
    for sweep_dir, names in by_sweep.items():
        table = (Path(sweep_dir) / "table.md").read_text()
        mine = {r["run_id"] for r in rows if r["sweep_dir"] == sweep_dir}
        assert all(i in table for i in mine) and not any(r["run_id"] in table for r in rows if r["run_id"] not in mine)
        assert all(f"rtn {n}" in table for n in names)


def test_extended_sweep_reuses_finished_jobs_and_computes_only_the_new_one(tmp_path, shared_cache):
    """tests/test_sweeps.py reruns a whole finished sweep and forces a finished run; here a finished
    sweep is extended by one setting: a changed config is a new row, the rest is reused. (The basic
    launcher: the skip is the pipeline's, whatever runs the jobs.)"""
    common = [*FAST, f"paths.root={tmp_path}", f"paths.cache_dir={shared_cache}"]
    first = ditq_sweep(*common, "bits=w8a8")
    assert first.returncode == 0, first.stderr[-3000:]
    store = ResultsStore(tmp_path / "results")
    [old] = list(store.rows())

    extended = ditq_sweep(*common, "bits=w8a8,w4a8")
    assert extended.returncode == 0, extended.stderr[-3000:]
    rows = {r["run_id"]: r for r in store.rows()}
    [new] = [r for i, r in rows.items() if i != old["run_id"]]
    assert new["config"]["bits"]["name"] == "w4a8" and new["supersedes"] is None and new["run_key"] != old["run_key"]
    assert (extended.stdout + extended.stderr).count("identical run already finished") == 1
    second = sweep_dirs(tmp_path)[-1]
    assert [p.parent.name for p in second.rglob("result.json")] == ["1_rtn_w4a8"]  # only the new job worked
    table = (second / "table.md").read_text()
    assert old["run_id"] in table and new["run_id"] in table  # a reused row is the sweep's row too


@pytest.mark.slow
def test_submitit_local_sweep_writes_both_rows_and_the_table(tmp_path, shared_cache):
    out = ditq_sweep(*FAST, f"paths.root={tmp_path}", f"paths.cache_dir={shared_cache}", "bits=w8a8,w4a8",
                     "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(ResultsStore(tmp_path / "results").rows())
    assert sorted(r["config"]["bits"]["name"] for r in rows) == ["w4a8", "w8a8"]
    [sweep] = sweep_dirs(tmp_path)
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # the jobs ran through submitit
    table = (sweep / "table.md").read_text()
    assert all(r["run_id"] in table and r["run_id"] in out.stdout for r in rows)
    assert "rtn w8a8" in table and "rtn w4a8" in table
