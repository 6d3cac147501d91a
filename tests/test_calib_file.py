"""calib.file: a calibration set kept as a file, refused when another model, sampler or setting made it."""
from __future__ import annotations

import pytest
import torch

from ditq.calibration import files as calib_files
from ditq.calibration.files import CalibrationFileError
from tests.helpers import run_pipeline


def test_file_round_trip_and_mismatch_names_the_fields(tmp_path):
    spec = {"model": {"sha": "a"}, "sampler": {"kind": "ddim", "num_steps": 25}, "calib": {"num_samples": 8}}
    rec = {"x": torch.randn(3, 1, 8, 8), "t": torch.tensor([1, 2, 3])}
    path = tmp_path / "c.pt"
    assert calib_files.check(path, spec) is False
    calib_files.save(path, spec, rec)
    assert calib_files.check(path, spec) is True
    assert torch.equal(calib_files.load(path, spec)["x"], rec["x"])
    other = {**spec, "sampler": {"kind": "ddim", "num_steps": 50}}
    with pytest.raises(CalibrationFileError, match=r"sampler.num_steps: file 25, this run 50"):
        calib_files.check(path, other)
    assert torch.equal(calib_files.load(path, spec)["x"], rec["x"])  # the file is left as it was
    path.write_bytes(b"not a calibration file")
    with pytest.raises(CalibrationFileError, match="cannot be read"):
        calib_files.check(path, spec)


def test_run_writes_then_reuses_the_file_and_refuses_another_sampler(compose, paths, tmp_path, monkeypatch):
    from ditq import pipeline

    path = tmp_path / "calib.pt"
    base = ["method=gptq", "bits=w8a8", "diagnostics.enabled=false", f"calib.file={path}"] + paths
    run_pipeline(compose, base, tmp_path / "a")
    assert path.is_file() and calib_files.read(path)["records"]["x"].shape[0] > 0
    # a second run with the same settings reads the file (no trajectories sampled)
    def no_sampling(*a, **k):
        raise AssertionError("calibration trajectories were sampled again")
    monkeypatch.setattr(pipeline, "collect_trajectory_inputs", no_sampling, raising=False)
    import ditq.calibration as calibration
    monkeypatch.setattr(calibration, "collect_trajectory_inputs", no_sampling)
    run_pipeline(compose, base + ["force=true", f"paths.cache_dir={tmp_path}/fresh_cache"], tmp_path / "b")
    # another sampler: refused before any sampling
    monkeypatch.setattr(pipeline, "sample_images", no_sampling)
    with pytest.raises(CalibrationFileError, match="sampler.num_steps: file 4, this run 5"):
        run_pipeline(compose, base + ["sampler.num_steps=5"], tmp_path / "c")
