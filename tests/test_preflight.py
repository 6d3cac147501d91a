"""Preflight: every value a run uses is checked before any work (the error names the key and the
valid range or choices), unwritable outputs fail before the model loads, and computed metrics
are never lost to a results store that fails late."""
import json

import pytest

from ditq.config import ConfigError, validate_config
from tests.conftest import SHRINK
from tests.helpers import run_pipeline

DIT256 = ["model=dit_xl_256", "dataset=imagenet"]


@pytest.mark.parametrize("overrides, key", [
    # the examples of the issue
    (["sampler.eta=-1"], "sampler.eta"),
    (["calib.batch_size=0"], "calib.batch_size"),
    (["sampler.timestep_spacing=bogus"], "sampler.timestep_spacing"),
    (["sampler=dpm20", "sampler.algorithm=bogus"], "sampler.algorithm"),
    (["model.weights=random"], "model.arch"),  # the embedded model has no arch to build
    (["dataset=imagenet"], "dataset.num_classes"),  # ImageNet reference for the 10-class digits model
    # the class: ranges, choices and combinations of every group
    (["sampler.eta=1.5"], "sampler.eta"),
    (["sampler=dpm20", "++sampler.eta=0.5"], "sampler.eta"),  # eta is DDIM's
    (["sampler=dpm20", "sampler.algorithm=sde-dpmsolver++"], "sampler.algorithm"),  # shared-RNG step noise
    (["sampler=dpm20", "sampler.solver_order=4"], "sampler.solver_order"),
    (["++sampler.solver_order=0"], "sampler.solver_order"),
    (["sampler.cfg_scale=nan"], "sampler.cfg_scale"),
    (["calib.max_tokens_per_layer=0"], "calib.max_tokens_per_layer"),
    (["eval.grid_size=-1"], "eval.grid_size"),
    (["eval.seed_start=-1"], "eval.seed_start"),
    (["eval.metrics=[]"], "eval.metrics"),
    (["eval.metrics=[fid,cls_acc,fid]"], "eval.metrics"),
    (["model.family=mmdit"], "model.family"),
    (["++model.dtype=int8"], "model.dtype"),
    (["++model.vae_scale=0"], "model.vae_scale"),
    (["model.cfg_channels=0"], "model.cfg_channels"),
    (DIT256 + ["model.cfg_channels=5"], "model.cfg_channels"),  # DiT-XL/2 samples 4 latent channels
    (DIT256 + ["model.weights=random", "model.arch.num_embeds_ada_norm=10"], "model.arch.num_embeds_ada_norm"),
    (DIT256 + ["model.weights=random", "model.arch.sample_size=16"], "model.arch.sample_size"),
    (DIT256 + ["model.resolution=300", "model.arch.sample_size=37"], "model.resolution"),  # no ADM reference at 300
    (["model.resolution=16"], "model.resolution"),  # the digits reference is 8x8
    (["dataset.kind=mnist"], "dataset.kind"),
    (["dataset.reference=/data/ref.npz"], "dataset.reference"),  # ignored by the bundled digits
    (["method.layers=[]"], "method.layers"),
    (["method.layers=[qkv]", "+bits.overrides={fc2: {weight: int4}}"], "bits.overrides.fc2"),
    (["logger.project=''"], "logger.project"),
    (["paths.results_dir=''"], "paths.results_dir"),
    (["+table.rows=[method.nam]"], "table.rows"),
    (["+table.columns={fid: FID}", "+table.paper={x: {fidd: 1.0}}"], "table.paper.x"),
])
def test_bad_values_fail_in_validation_naming_the_key(compose, overrides, key):
    with pytest.raises(ConfigError) as err:
        validate_config(compose(overrides))
    assert key in str(err.value)


def test_good_variants_still_validate(compose):
    for overrides in (["sampler.eta=0.3"], ["sampler=dpm20", "sampler.algorithm=dpmsolver", "sampler.solver_order=3"],
                      ["sampler=ddpm250", "sampler.timestep_spacing=trailing"], ["eval.grid_size=0"],
                      DIT256 + ["model.weights=random"], ["+table.columns={fid: FID}", "+table.paper={x: {fid: 1.0}}"]):
        validate_config(compose(overrides))


def test_metric_minimum_sample_counts_come_from_the_registry():
    from ditq.metrics import Evaluator

    ev = Evaluator(["fid", "cls_acc", "precision", "recall"], feature_net="digits", options={"pr_k": 5})
    assert ev.min_samples() == {"fid": 2, "cls_acc": 1, "precision": 6, "recall": 6}


@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling (and, with load=True, loading) explodes: a test passing with it failed before the work."""
    import ditq.models
    from ditq.sampling.sampler import Sampler

    def sample(*a, **k):
        raise AssertionError("sampling was reached")

    monkeypatch.setattr(Sampler, "sample", sample)

    def forbid_load():
        def load(*a, **k):
            raise AssertionError("the model was loaded")

        monkeypatch.setattr(ditq.models, "load_adapter", load)

    return forbid_load


def _run(compose, overrides, out_dir):
    return run_pipeline(compose, overrides, out_dir)


def _paths(tmp_path):
    return [f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results"]


def test_too_few_samples_for_fid_fail_before_sampling(compose, tmp_path, no_sampling):
    from ditq.metrics import MetricInputError

    no_sampling()
    with pytest.raises(MetricInputError) as err:
        _run(compose, _paths(tmp_path) + ["eval.num_samples=1", "eval.batch_size=1", "eval.grid_size=1"],
             tmp_path / "run")
    msg = str(err.value)
    assert "eval.num_samples=1" in msg and "fid needs >= 2" in msg


@pytest.mark.parametrize("overrides, key", [
    (["sampler.num_steps=1001"], "sampler.num_steps"),  # the model was trained with 1000 timesteps
    (["model.cfg_channels=2"], "model.cfg_channels"),  # the digits model samples 1 channel
])
def test_loaded_model_mismatch_fails_before_sampling(compose, tmp_path, no_sampling, overrides, key):
    with pytest.raises(ConfigError) as err:
        _run(compose, _paths(tmp_path) + overrides, tmp_path / "run")
    assert key in str(err.value)


def test_reference_at_another_resolution_fails_before_loading(compose, tmp_path, no_sampling):
    no_sampling()
    with pytest.raises(ConfigError) as err:  # no dataset.resolutions to catch it: the reference's 8x8 does
        _run(compose, _paths(tmp_path) + ["dataset.resolutions=[]", "model.resolution=16"], tmp_path / "run")
    assert "model.resolution=16" in str(err.value) and "8x8" in str(err.value)


@pytest.mark.parametrize("where, key", [("results", "paths.results_dir"), ("run", "hydra.run.dir"),
                                        ("wandb", "wandb")])
def test_unwritable_output_fails_before_the_model_loads(compose, tmp_path, no_sampling, where, key):
    no_sampling()
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file: nothing can be created under it, not even by root")
    overrides = [f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results"]
    out_dir = tmp_path / "run"
    if where == "results":
        overrides[1] = f"paths.results_dir={blocker}/results"
    elif where == "run":
        out_dir = blocker / "run"
    else:
        out_dir.mkdir()
        (out_dir / "wandb").write_text("not a directory")
        overrides.append("logger=wandb_offline")
    with pytest.raises(ConfigError) as err:
        _run(compose, overrides, out_dir)
    assert key in str(err.value) and "writable" in str(err.value)


def test_store_failure_after_scoring_keeps_the_row_in_the_run_dir(compose, tmp_path, monkeypatch):
    from ditq.tracking.keep import RESULT_FILE, RowNotStoredError
    from ditq.tracking.store import ResultsStore

    def fail(self, row):
        raise PermissionError(13, "Permission denied", str(self.rows_dir))

    monkeypatch.setattr(ResultsStore, "append", fail)
    with pytest.raises(RowNotStoredError) as err:
        _run(compose, _paths(tmp_path) + ["bits=fp"], tmp_path / "run")
    kept = tmp_path / "run" / RESULT_FILE
    assert str(kept) in str(err.value) and "paths.results_dir" in str(err.value)
    row = json.loads(kept.read_text())
    assert row["metrics"] == err.value.row["metrics"] and {"fid", "cls_acc"} <= set(row["metrics"])
    assert err.value.saved_at == kept


def test_kept_row_and_stored_row_are_the_same(tmp_path):
    from ditq.tracking.keep import RESULT_FILE, keep_row
    from ditq.tracking.store import ResultsStore

    row = {"run_name": "r", "metrics": {"fid": 1.5}}
    path = keep_row(row, tmp_path / "run", tmp_path / "results")
    kept = json.loads((tmp_path / "run" / RESULT_FILE).read_text())
    assert kept == json.loads(path.read_text()) == next(ResultsStore(tmp_path / "results").rows())
    assert kept["run_id"] == row["run_id"] and path.name == f"{row['run_id']}.json"


def test_cli_prints_the_table_when_the_store_fails(compose, tmp_path, monkeypatch, capsys):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import ditq.pipeline
    from ditq.cli import task
    from ditq.tracking.keep import RowNotStoredError

    cfg = compose(SHRINK + _paths(tmp_path), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    row = {"metrics": {"fid": 12.345}, "is_fp": False, "wbits": 8, "abits": 8, "timings": {},
           "config": {"method": {"name": "rtn"}, "bits": {"name": "w8a8"}}}

    def run(*a, **k):
        raise RowNotStoredError("store failed; the row is kept in X", row, None)

    monkeypatch.setattr(ditq.pipeline, "run", run)
    with pytest.raises(RowNotStoredError):
        task(cfg)
    out = capsys.readouterr().out
    assert "| rtn w8a8" in out and "12.35" in out
