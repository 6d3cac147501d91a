"""Diagnostics (ditq.diagnostics): per-layer and denoiser errors on held-out trajectory records."""
import math

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from ditq.config import ConfigError, validate_config
from ditq.config.schema import DiagnosticsConfig
from tests.conftest import SHRINK
from tests.helpers import random_dit, sampler_cfg


def _quantized_dit(compose, bits):
    """A small random DiT wrapped like the pipeline does, weights fitted by RTN, dynamic activations."""
    from ditq.methods.wrap import wrap_layers

    run = validate_config(compose([f"bits={bits}", "method=rtn_dynamic", "logger=none"]))
    adapter = random_dit()
    qlayers, roles = wrap_layers(adapter, run)
    for q in qlayers.values():
        q.weight_quantizer.fit(q.weight.data)
        q.refresh()
    return adapter, qlayers, roles


def _records(adapter, num_steps=5, **kw):
    from ditq.diagnostics import heldout_records
    from ditq.sampling import Sampler

    cfg = OmegaConf.structured(DiagnosticsConfig(**{"num_samples": 3, "num_timesteps": 3, **kw}))
    return heldout_records(Sampler(adapter, sampler_cfg(num_steps=num_steps)), cfg, adapter.num_classes,
                           progress=False), cfg


def _table(adapter, qlayers, roles, records, **kw):
    from ditq.diagnostics import error_table

    return error_table(adapter, qlayers, records, roles=roles, cfg_scale=1.5, progress=False, **kw)


@pytest.fixture
def w4(compose):
    adapter, qlayers, roles = _quantized_dit(compose, "w4a8")
    records, cfg = _records(adapter)
    return adapter, qlayers, roles, records, cfg


def test_errors_vanish_in_full_precision_and_are_positive_when_quantized(w4):
    adapter, qlayers, roles, records, _ = w4
    for q in qlayers.values():
        q.quant_enabled = False
    fp = _table(adapter, qlayers, roles, records)
    assert all(not q.quant_enabled for q in qlayers.values())  # the caller's switches are restored
    for col in ("weight_rel_mse", "act_rel_mse", "input_rel_mse", "output_rel_mse"):
        assert fp[col].fillna(0).abs().max() < 1e-10, col
    for q in qlayers.values():
        q.quant_enabled = True
    qt = _table(adapter, qlayers, roles, records)
    layers, den = qt[qt.scope == "layer"], qt[qt.scope == "denoiser"]
    assert len(layers) == len(qlayers) * 3 and set(den.branch) == {"cond", "uncond", "guided"}
    for col in ("weight_rel_mse", "act_rel_mse", "output_rel_mse"):
        assert (layers[col] > 0).all(), col
        assert (layers[col.replace("rel_mse", "sqnr_db")] < 60).all(), col
    assert (den.output_rel_mse > 0).all()
    # the first layers' inputs (adaLN: the timestep/class embedding) are not quantized upstream: no drift
    assert (layers[layers.role == "adaln"].input_rel_mse == 0).all()
    assert (layers[layers.role == "proj"].input_rel_mse > 0).all()  # attention output drifts


def test_w8_errors_are_smaller_than_w4(compose):
    tables = {}
    for bits in ("w8a8", "w4a8"):
        adapter, qlayers, roles = _quantized_dit(compose, bits)
        records, _ = _records(adapter)
        tables[bits] = _table(adapter, qlayers, roles, records).set_index(["scope", "name", "branch", "step"])
    w8, w4 = tables["w8a8"], tables["w4a8"]
    layers = w8.index.get_level_values("scope") == "layer"
    assert (w8.weight_rel_mse[layers] < w4.weight_rel_mse[layers] / 10).all()
    assert (w8.output_rel_mse < w4.output_rel_mse).all()  # every layer and the denoiser, at every timestep
    assert w8.output_sqnr_db.mean() > w4.output_sqnr_db.mean() + 6


def test_timestep_coverage_equals_the_selected_steps(w4):
    from ditq.diagnostics import selected_steps
    from ditq.sampling import Sampler

    adapter, qlayers, roles, records, cfg = w4
    steps = selected_steps(5, cfg)
    assert steps == [0, 2, 4]
    assert sorted(set(records["step"].tolist())) == steps
    assert sorted(set(records["seed"].tolist())) == [2_000_000, 2_000_001, 2_000_002]
    table = _table(adapter, qlayers, roles, records)
    schedule = Sampler(adapter, sampler_cfg(num_steps=5)).timesteps()
    for _, g in table.groupby(["scope", "name", "branch"]):
        assert sorted(g.step) == steps
        assert sorted(g.t, reverse=True) == [schedule[s] for s in steps]
    assert (table[table.scope == "denoiser"].records == 3).all()
    # more timesteps than the sampler has steps: every step
    assert selected_steps(4, OmegaConf.structured(DiagnosticsConfig(num_timesteps=10))) == [0, 1, 2, 3]


def test_results_do_not_depend_on_batching(w4):
    """Per-sample independence: one record per batch, or batches shrunk by the memory bound, give the
    same table as one batch."""
    adapter, qlayers, roles, records, _ = w4
    seen = []  # model batch sizes: both branches of each record
    denoise = adapter.denoise
    adapter.denoise = lambda x, t, y: seen.append(len(x)) or denoise(x, t, y)
    whole = _table(adapter, qlayers, roles, records, batch_size=64)
    assert seen == [2, 2, 2 * 8, 2 * 8]  # FP + quantized: one record measures the memory, then the rest
    num = [c for c in whole.columns if c.endswith(("rel_mse", "sqnr_db"))]
    for kw in ({"batch_size": 1}, {"batch_size": 64, "max_stored_mb": 1e-3}):
        seen.clear()
        other = _table(adapter, qlayers, roles, records, **kw)
        assert set(seen) == {2}  # one record per batch
        pd.testing.assert_frame_equal(whole[num], other[num], rtol=1e-4)


def test_without_uncond_only_the_conditional_branch(w4):
    adapter, qlayers, roles, records, _ = w4
    table = _table(adapter, qlayers, roles, records, include_uncond=False)
    assert set(table[table.scope == "denoiser"].branch) == {"cond"}
    assert set(table[table.scope == "layer"].branch) == {"cond"}
    assert (table[table.scope == "layer"].records == 3).all()


def test_summary_and_plots(w4, tmp_path):
    from ditq.diagnostics import as_table, plot_denoiser_error, plot_layer_errors, summarize, write_table

    adapter, qlayers, roles, records, _ = w4
    table = _table(adapter, qlayers, roles, records)
    csv = write_table(table, tmp_path / "diagnostics.csv")
    back = as_table(tmp_path)
    assert len(back) == len(table) and list(back.columns) == list(table.columns)
    s = summarize(table, worst=3)
    assert s["steps"] == [0, 2, 4] and len(s["t"]) == 3
    assert set(s["denoiser"]["sqnr_db"]) == {"cond", "uncond", "guided"}
    assert all(len(v) == 3 for v in s["denoiser"]["sqnr_db"].values())
    assert set(s["by_role"]) == set(roles.values())
    worst = [w["output_rel_mse"] for w in s["worst_layers"]]
    assert len(worst) == 3 and worst == sorted(worst, reverse=True)
    layer_means = table[table.scope == "layer"].groupby("name").output_rel_mse.mean()
    assert worst[0] == pytest.approx(layer_means.max())
    for source in (table, csv, {"diagnostics": {"errors": s}}):
        for fn, name in ((plot_denoiser_error, "d.png"), (plot_layer_errors, "l.png")):
            if fn is plot_layer_errors and isinstance(source, dict):
                continue  # the layer heatmap needs the table
            path = fn(source, tmp_path / name)
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            path.unlink()
    with pytest.raises(ValueError, match="diagnostics.enabled"):
        plot_denoiser_error({"diagnostics": {"quantizers": {}}}, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="diagnostics.csv"):
        as_table(tmp_path / "nowhere")


@pytest.mark.parametrize("override, needle", [
    ("diagnostics.seed_start=1000010", "overlap calib seeds.*diagnostics.seed_start or calib.seed_start"),
    ("diagnostics.seed_start=500", "overlap eval seeds.*diagnostics.seed_start or eval.seed_start"),
    ("diagnostics.num_samples=0", "diagnostics.num_samples"),
    ("diagnostics.num_timesteps=0", "diagnostics.num_timesteps"),
    ("diagnostics.batch_size=-1", "diagnostics.batch_size"),
    ("diagnostics.labels=odd", "diagnostics.labels"),
])
def test_bad_diagnostics_config_fails_naming_the_key(compose, override, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config(compose([override]))


def test_disabled_diagnostics_skip_the_checks(compose):
    run = validate_config(compose(["diagnostics.enabled=false", "diagnostics.seed_start=0"]))
    assert run.diagnostics.enabled is False
    default = validate_config(compose([]))
    assert default.diagnostics.seed_start == 2_000_000 and default.diagnostics.enabled


def test_pipeline_writes_table_plots_and_row_summary(compose, tmp_path):
    from ditq.pipeline import run as run_pipeline

    paths = [f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results"]
    row = run_pipeline(validate_config(compose(SHRINK + paths + ["bits=w4a8"])), output_dir=tmp_path / "q",
                       progress=False)
    errors = row["diagnostics"]["errors"]
    assert "quantizers" in row["diagnostics"]  # extended, not replaced
    assert row["timings"]["diagnostics"] > 0
    assert errors["steps"] == [0, 1, 2, 3]  # the shrunk sampler has 4 steps: every one of them
    assert errors["seeds"] == [2_000_000, 8]
    assert math.isfinite(errors["denoiser_sqnr_db_mean"]["guided"])
    assert len(errors["worst_layers"]) == 5
    table = pd.read_csv(tmp_path / "q" / "diagnostics.csv")
    assert (table.scope == "layer").sum() == row["quantized_layers"] * 4
    assert (table[table.scope == "layer"].output_rel_mse > 0).all()
    for png in ("diagnostics_layers.png", "diagnostics_timesteps.png"):
        assert (tmp_path / "q" / png).read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "cache" / "diag_inputs").glob("*.pt"))  # held-out records are cached
    off = run_pipeline(validate_config(compose(SHRINK + paths + ["bits=w4a8", "diagnostics.enabled=false"])),
                       output_dir=tmp_path / "off", progress=False)
    assert "errors" not in off["diagnostics"] and "diagnostics" not in off["timings"]
    assert not (tmp_path / "off" / "diagnostics.csv").exists()


def test_layer_without_batch_dimension_first_is_an_error_naming_it(w4):
    adapter, qlayers, roles, records, _ = w4
    name = next(n for n in qlayers if n.endswith("to_q"))
    # fold the batch into the tokens: the model still runs, but per-record errors would be wrong
    qlayers[name].register_forward_pre_hook(lambda m, args: (args[0].reshape(1, -1, args[0].shape[-1]),))
    with pytest.raises(RuntimeError, match=f"layer {name} .*batch dimension first"):
        _table(adapter, qlayers, roles, records)
