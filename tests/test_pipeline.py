"""End to end on the embedded model: real configs composed with Hydra, shrunk to seconds."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ditq.config import validate_config
from ditq.tracking.store import ResultsStore
from tests.conftest import SHRINK
from tests.helpers import run_pipeline






def test_fp_and_quantized_rows_are_paired(compose, paths, tmp_path):
    fp = run_pipeline(compose, paths + ["bits=fp"], tmp_path / "fp")
    w8 = run_pipeline(compose, paths + ["bits=w8a8"], tmp_path / "w8")
    w4 = run_pipeline(compose, paths + ["bits=w4a4"], tmp_path / "w4")
    assert fp["is_fp"] and not w8["is_fp"]
    assert {"fid", "cls_acc"} <= set(fp["metrics"]) and "psnr" not in fp["metrics"]
    assert {"fid", "cls_acc", "psnr", "fid_to_fp"} <= set(w8["metrics"])
    # W8A8 images stay close to the FP images of the same seeds; W4A4 far less so
    assert w8["metrics"]["psnr"] > w4["metrics"]["psnr"]
    assert w8["quantized_layers"] == 6 * 7  # q, k, v, proj, fc1, fc2, adaLN per block
    assert w4["size_mb"] < w8["size_mb"] < fp["size_mb"]
    rows = list(ResultsStore(tmp_path / "results").rows())
    assert len(rows) == 3
    for r in rows:
        assert r["config"]["model"]["name"] == "tiny_dit_digits"
        assert r["protocol"]["seeds"] == [0, 20]
        assert set(r["timings"]) >= {"preflight", "load", "fp_sample", "score", "total_s", "sample_s"}
        assert Path(r["output_dir"], "samples_grid.png").exists()
        npz = Path(r["output_dir"], "samples.npz")
        import numpy as np

        assert np.load(npz)["arr_0"].shape == (20, 8, 8, 3)  # ADM batches are RGB


def test_fp_samples_are_cached_and_reused(compose, paths, tmp_path):
    a = run_pipeline(compose, paths + ["bits=fp"], tmp_path / "a")
    cache_files = sorted((tmp_path / "cache" / "samples").glob("*.pt"))
    assert len(cache_files) == 2  # 20 seeds in shards of sampler.batch_size=10
    stamps = [f.stat().st_mtime_ns for f in cache_files]
    b = run_pipeline(compose, paths + ["bits=w8a8"], tmp_path / "b")
    assert [f.stat().st_mtime_ns for f in cache_files] == stamps  # reused, not rewritten
    assert b["timings"]["fp_sample"] < a["timings"]["fp_sample"]
    # calibration inputs and layer inputs are cached too
    assert list((tmp_path / "cache" / "calib_inputs").glob("*.pt"))
    assert list((tmp_path / "cache" / "layer_inputs").glob("*.pt"))


def test_corrupt_cache_is_rebuilt_not_used(compose, paths, tmp_path):
    first = run_pipeline(compose, paths + ["bits=w8a8"], tmp_path / "a")
    for f in (tmp_path / "cache").rglob("*.pt"):
        f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])  # truncate every entry
    second = run_pipeline(compose, paths + ["bits=w8a8", "force=true"], tmp_path / "b")  # redo, not reuse
    assert second["run_id"] != first["run_id"] and second["supersedes"] == first["run_id"]
    assert second["metrics"] == pytest.approx(first["metrics"], rel=1e-6)


def test_interrupted_run_writes_no_row_and_keeps_caches(compose, paths, tmp_path, monkeypatch):
    import ditq.metrics.evaluator as ev

    def boom(self, *a, **k):
        raise KeyboardInterrupt("interrupted while scoring")

    monkeypatch.setattr(ev.Evaluator, "evaluate", boom)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(compose, paths + ["bits=w8a8"], tmp_path / "a")
    assert not list((tmp_path / "results").rglob("*.json"))
    assert len(list((tmp_path / "cache" / "samples").glob("*.pt"))) == 2  # finished FP shards kept
    monkeypatch.undo()
    row = run_pipeline(compose, paths + ["bits=w8a8"], tmp_path / "b")
    assert row["timings"]["fp_sample"] < 5.0  # the rerun reused them
    assert len(list(ResultsStore(tmp_path / "results").rows())) == 1


def test_missing_reference_fails_before_loading(compose, paths, tmp_path):
    from ditq.pipeline import run

    cfg = validate_config(compose(SHRINK + paths + ["model=dit_xl_256", "dataset=imagenet", "eval=adm",
                                                    f"paths.data_dir={tmp_path}/nodata"]))
    with pytest.raises(FileNotFoundError) as err:
        run(cfg, output_dir=tmp_path / "x", progress=False)
    msg = str(err.value)
    assert "VIRTUAL_imagenet256_labeled.npz" in msg or "pt_inception" in msg


def test_cli_single_run_prints_table_and_logs_wandb(tmp_path):
    overrides = [o for o in SHRINK if not o.startswith("logger")] + [
        f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results",
        f"hydra.run.dir={tmp_path}/run", "bits=w8a8",
    ]
    out = subprocess.run([sys.executable, "-m", "ditq.cli", *overrides], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| rtn w8a8" in out.stdout and "FID" in out.stdout
    wandb_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    row = next(ResultsStore(tmp_path / "results").rows())
    assert row["run_name"] == "tiny_dit_digits-rtn-w8a8-ddim25-cfg1.5-n20"
    json.dumps(row)  # fully serialisable


def test_multirun_2x2_yields_one_row_per_job_and_a_table(tmp_path):
    overrides = SHRINK + [
        f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results",
        f"hydra.sweep.dir={tmp_path}/sweep", "bits=w8a8,w4a4", "method=rtn,rtn_dynamic",
    ]
    out = subprocess.run([sys.executable, "-m", "ditq.cli", "-m", *overrides], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(ResultsStore(tmp_path / "results").rows())
    assert len(rows) == 4
    assert {(r["config"]["method"]["name"], r["config"]["bits"]["name"]) for r in rows} == {
        ("rtn", "w8a8"), ("rtn", "w4a4"), ("rtn_dynamic", "w8a8"), ("rtn_dynamic", "w4a4")}
    assert all(r["sweep_dir"] == str((tmp_path / "sweep").resolve()) for r in rows)
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert table.count("| rtn") == 4 and "rtn_dynamic w4a4" in table
    assert "rtn_dynamic w4a4" in out.stdout


def test_results_notebook_runs_on_a_fresh_store(compose, paths, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from ditq.paths import project_root

    for bits in ("fp", "w4a8"):
        run_pipeline(compose, paths + [f"bits={bits}"], tmp_path / bits)
    monkeypatch.setenv("DITQ_RESULTS", str(tmp_path / "results"))
    nb = nbformat.read(project_root() / "notebooks" / "results.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "2 rows" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the bit-width plot and the sample grids


def test_row_records_effective_quantizers(compose, paths, tmp_path):
    row = run_pipeline(compose, paths + ["bits=w4a4_mxfp4"], tmp_path / "mx")
    q = row["diagnostics"]["quantizers"]
    assert set(q) == {"qkv", "proj", "fc1", "fc2", "adaln"}
    assert "mxfp4" in q["fc1"]["weight"] and "mxfp4" in q["fc1"]["act"]
    assert "dynamic" in q["fc1"]["act"]  # the block format made rtn's static activations dynamic
