"""The analysis notebooks (notebooks/activations, formats, sensitivity, sweeps) executed offline on
the embedded model with small sizes, and unit tests of the helpers they call (ditq.analysis)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ditq.analysis import activations as A
from ditq.analysis import formats as F
from ditq.analysis import sensitivity as S
from ditq.analysis import sweeps as W
from ditq.analysis.embedded import QUICK, compose_run, grid_overrides
from ditq.analysis.notebook import execute, images, inject_parameters, parameters_cell_index, text
from ditq.paths import project_root
from tests.conftest import SHRINK

NOTEBOOKS = project_root() / "notebooks"


# -- formats ---------------------------------------------------------------------------------------

def test_grid_table_values_match_the_formats_definitions():
    t = {e["name"]: e for e in F.format_grid_table(["int4", "fp4_e2m1", "fp4_e3m0", "ufp4_e2m2", "nvfp4"],
                                                    normalize=False)}
    assert t["int4"]["values"] == [float(k) for k in range(-7, 8)]
    e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert t["fp4_e2m1"]["values"] == [-v for v in reversed(e2m1[1:])] + e2m1
    assert t["nvfp4"]["values"] == t["fp4_e2m1"]["values"] and "e2m1" in t["nvfp4"]["kind"]
    assert t["fp4_e3m0"]["max"] == 16.0 and t["ufp4_e2m2"]["n"] == 16 and not t["ufp4_e2m2"]["signed"]
    norm = {e["name"]: e for e in F.format_grid_table(["int4", "fp4_e2m1", "fp4_e3m0"])}
    assert all(max(abs(v) for v in e["values"]) == 1.0 for e in norm.values())
    # more exponent bits: more of the values near zero (FP4DiT Fig. 1)
    assert norm["int4"]["near_zero_share"] < norm["fp4_e2m1"]["near_zero_share"] < norm["fp4_e3m0"]["near_zero_share"]


def test_grid_table_names_an_unknown_format():
    from ditq.quant import FormatError

    with pytest.raises(FormatError, match="fp4_e9m9"):
        F.format_grid_table(["int4", "fp4_e9m9"])


def test_samples_have_unit_variance_and_reject_bad_sizes():
    for d in ("gaussian", "laplace"):
        x = F.sample(d, 64 * 1024, seed=1)
        assert x.shape == (1024, 64) and abs(float(x.var()) - 1.0) < 0.05
    assert float(F.sample("gelu", 4096).min()) >= -0.18  # GELU's minimum is about -0.17
    with pytest.raises(ValueError, match="multiple of cols"):
        F.sample("gaussian", 100)
    with pytest.raises(ValueError, match="choose one of"):
        F.sample("cauchy", 64)


def test_quant_error_is_the_mse_optimal_int4_scale():
    x = F.sample("laplace", 8192, seed=3)
    got = F.quant_error("int4", x, points=50, min_ratio=0.05)
    # independent brute force over the same clip ratios of max|x|: s = r max|x| / 7, round, clamp
    amax = float(x.abs().max())
    best = min(float(((torch.clamp(torch.round(x / (r * amax / 7)), -7, 7) * (r * amax / 7) - x) ** 2).mean())
               for r in torch.linspace(1.0, 0.05, 50).tolist())
    assert got["mse"] == pytest.approx(best, rel=1e-4)
    minmax = float(((torch.clamp(torch.round(x / (amax / 7)), -7, 7) * (amax / 7) - x) ** 2).mean())
    assert got["mse"] < 0.7 * minmax  # clipping the Laplace tail pays
    assert got["sqnr_db"] == pytest.approx(10 * math.log10(float((x.double() ** 2).mean()) / got["mse"]), rel=1e-6)


def test_format_errors_rank_as_the_grids_suggest():
    rows = pd.DataFrame(F.format_mse_table(["int4", "fp4_e1m2", "ufp4_e2m2", "nvfp4"], n=16384, points=30))
    sq = rows.pivot(index="format", columns="distribution", values="sqnr_db")
    assert sq.loc["int4"].tolist() == pytest.approx(sq.loc["fp4_e1m2"].tolist(), abs=1e-6)  # E1M2 = INT4's grid
    assert sq.loc["ufp4_e2m2", "gelu"] > sq.loc["int4", "gelu"] + 3  # a zero point fits the one-sided GELU output
    assert sq.loc["nvfp4", "laplace"] > sq.loc["int4", "laplace"]  # block scales beat one scale per tensor


# -- activations -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from tests.helpers import random_dit

    adapter = random_dit()
    g = torch.Generator().manual_seed(0)
    records = {"x": torch.randn(6, 1, 8, 8, generator=g), "t": torch.tensor([900, 900, 500, 500, 100, 100]),
               "y": torch.tensor([0, 1, 2, 3, 4, 5])}
    return adapter, records


def test_select_layers_keeps_one_qkv_per_attention_and_names_bad_roles(tiny):
    adapter, _ = tiny
    layers = A.select_layers(adapter)
    assert [n for n in layers if n.startswith("transformer_blocks.0.")] == [
        "transformer_blocks.0.norm1.linear", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_out.0",
        "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"]
    assert {m["role"] for m in layers.values()} == set(A.ROLES)
    assert set(A.select_layers(adapter, ("fc2",), blocks=[1])) == {"transformer_blocks.1.ff.net.2"}
    with pytest.raises(ValueError, match="'mlp'.*roles of this model"):
        A.select_layers(adapter, ("mlp",))


def test_inputs_by_timestep_are_exact_per_timestep(tiny):
    adapter, records = tiny
    name = "transformer_blocks.1.ff.net.2"
    layers = A.select_layers(adapter, ("fc2", "qkv"))
    by_t = A.inputs_by_timestep(adapter, records, list(layers), max_tokens=20)
    assert list(by_t) == [900, 500, 100]  # noisiest first
    # the exact range at t=500 from a hook of our own
    seen = []
    module = dict(adapter.denoiser.named_modules())[name]
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad():
            adapter.denoise(records["x"][2:4], records["t"][2:4], records["y"][2:4])
    finally:
        h.remove()
    ref = torch.cat(seen)
    assert torch.equal(by_t[500][name]["max"], ref.amax(0)) and torch.equal(by_t[500][name]["min"], ref.amin(0))
    assert ref.shape[0] == 32 and by_t[500][name]["rows"].shape == (20, ref.shape[1])  # a sample of 2 x 16 tokens

    stats = A.activation_stats(by_t, layers)
    assert len(stats) == 3 * len(layers)
    s = next(r for r in stats if r["layer"] == name and r["t"] == 500)
    assert s["role"] == "fc2" and s["block"] == 1 and s["channels"] == ref.shape[1]
    assert s["absmax"] == pytest.approx(float(ref.abs().max()))
    assert s["min"] <= s["p01"] <= s["p99"] <= s["max"]
    assert s["absmax_over_std"] == pytest.approx(s["absmax"] / s["std"])
    ts, cmax = A.channel_absmax(by_t, name)
    assert ts == [900, 500, 100] and cmax.shape == (3, ref.shape[1])
    assert np.allclose(cmax[1], ref.abs().amax(0).numpy())
    with pytest.raises(KeyError, match="not recorded"):
        A.channel_absmax(by_t, "transformer_blocks.0.ff.net.0.proj")


def test_rotation_keeps_norms_and_flattens_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 64, generator=g)
    x[:, 5] *= 30.0  # one outlier channel
    r = A.rotate(x)
    assert torch.allclose(r.norm(dim=1), x.norm(dim=1), rtol=1e-4)  # orthogonal
    eff = A.rotation_effect(x)
    assert eff["channel_outlier_ratio"] > 20 and eff["channel_outlier_ratio_rotated"] < 2
    assert eff["reduction"] == pytest.approx(eff["absmax_over_std"] / eff["absmax_over_std_rotated"])
    assert eff["reduction"] > 1.5


# -- sensitivity -----------------------------------------------------------------------------------

def _diag_table():
    from ditq.diagnostics import COLUMNS

    rows = []
    for step, t in ((0, 750), (1, 250)):
        for name, role, block, out in (("b0.fc1", "fc1", 0, (0.01, 0.03)), ("b0.fc2", "fc2", 0, (0.1, 0.3)),
                                       ("b1.adaln", "adaln", 1, (0.0, 0.0))):
            rel = out[step]
            rows.append({"scope": "layer", "name": name, "role": role, "block": block, "branch": "cond+uncond",
                         "step": step, "t": t, "records": 4, "weight_rel_mse": 0.01, "weight_sqnr_db": 20.0,
                         "act_rel_mse": 0.001, "act_sqnr_db": 30.0, "input_rel_mse": 0.0, "input_sqnr_db": math.inf,
                         "output_rel_mse": rel, "output_sqnr_db": -10 * math.log10(rel) if rel else math.inf})
        rows.append({"scope": "denoiser", "name": "denoiser", "role": None, "block": None, "branch": "cond",
                     "step": step, "t": t, "records": 4, "output_rel_mse": 0.001 * (step + 1)})
    return pd.DataFrame(rows, columns=COLUMNS)


def test_sensitivity_from_run_averages_per_layer_and_ranks(tmp_path):
    from ditq.diagnostics import write_table

    write_table(_diag_table(), tmp_path / "diagnostics.csv")
    sens = S.sensitivity_from_run(tmp_path)  # the run dir, read back from the CSV
    assert sens["name"].tolist() == ["b0.fc1", "b0.fc2", "b1.adaln"]  # model order
    fc2 = sens.set_index("name").loc["b0.fc2"]
    assert fc2["output_rel_mse"] == pytest.approx(0.2) and fc2["output_sqnr_db"] == pytest.approx(10 * math.log10(5))
    assert fc2["rank"] == 1 and sens.set_index("name").loc["b1.adaln", "output_sqnr_db"] == math.inf
    assert [w["name"] for w in S.worst_layers(sens, 2)] == ["b0.fc2", "b0.fc1"]
    assert S.role_means(sens).loc["fc1", "output_rel_mse"] == pytest.approx(0.02)

    by_t = S.sensitivity_by_timestep(tmp_path)
    assert list(by_t.columns) == [750, 250] and list(by_t.index) == ["fc1", "fc2", "adaln", "denoiser (cond)"]
    assert by_t.loc["fc2", 250] == pytest.approx(0.3) and by_t.loc["denoiser (cond)", 250] == pytest.approx(0.002)
    with pytest.raises(ValueError, match="side="):
        S.sensitivity_by_timestep(tmp_path, "bias")


def test_sensitivity_of_a_run_without_diagnostics_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="diagnostics.enabled=true"):
        S.sensitivity_from_run(tmp_path)


# -- sweeps ----------------------------------------------------------------------------------------

def _row(method, bits, wb, ab, psnr, key=None, fp=False):
    return {"run_key": key or f"{method}-{bits}", "is_fp": fp, "wbits": wb, "abits": ab, "run_name": f"{method} {bits}",
            "config": {"method": {"name": method}, "bits": {"name": bits}}, "protocol": {"sampler": "ddim"},
            "metrics": {"fid": 1.0} if fp else {"psnr": psnr, "fid": 2.0}, "timings": {"total_s": 1.0}}


def test_pivot_lays_out_method_by_bits_widest_first():
    rows = [_row("rtn", "w4a4", 4, 4, 17.0), _row("rtn", "w8a8", 8, 8, 31.0), _row("dyn", "w8a8", 8, 8, 46.0),
            _row("dyn", "w4a8", 4, 8, 25.0), _row("fp", "fp", 32, 32, None, fp=True)]
    df = W.frame(rows)
    assert df.set_index("run_name").loc["fp fp", "method"] == "FP"
    t = W.pivot(df[~df["is_fp"]], "method", "bits", "psnr")
    assert list(t.columns) == ["w8a8", "w4a8", "w4a4"]
    assert t.loc["dyn", "w8a8"] == 46.0 and math.isnan(t.loc["dyn", "w4a4"])  # a missing cell stays missing
    assert W.metrics_of(df) == ["psnr", "fid"]
    with pytest.raises(ValueError, match=r"several rows.*'rtn', 'w8a8'"):
        W.pivot(rows + [_row("rtn", "w8a8", 8, 8, 30.0, key="other")])
    with pytest.raises(KeyError, match="'lpips' is not a field"):
        W.pivot(rows, value="lpips")


def test_load_rows_keeps_the_newest_row_per_run_key(tmp_path):
    from ditq.tracking.store import ResultsStore

    store = ResultsStore(tmp_path)
    for i, r in enumerate([_row("rtn", "w8a8", 8, 8, 30.0), _row("rtn", "w4a4", 4, 4, 17.0),
                           _row("rtn", "w8a8", 8, 8, 31.0)]):  # a forced rerun of the first
        r["run_id"] = f"2026-{i}"
        store.append(r)
    rows = W.load_rows(tmp_path)
    assert len(rows) == 2 and W.pivot(rows).loc["rtn", "w8a8"] == 31.0
    assert len(W.load_rows(tmp_path, latest_only=False)) == 3
    with pytest.raises(FileNotFoundError, match="no results store"):
        W.load_rows(tmp_path / "nowhere")


def test_grid_overrides_follow_the_sweepers_order():
    assert grid_overrides({"method": ["rtn", "dyn"], "bits": ["w8a8", "w4a4"]}) == [
        ["method=rtn", "bits=w8a8"], ["method=rtn", "bits=w4a4"],
        ["method=dyn", "bits=w8a8"], ["method=dyn", "bits=w4a4"]]
    with pytest.raises(ValueError, match=r"\['bits'\] have no values"):
        grid_overrides({"method": ["rtn"], "bits": []})


def test_quick_overrides_match_the_tests_shrink():
    assert list(QUICK) == SHRINK


def test_compose_run_rejects_a_malformed_override():
    with pytest.raises(ValueError, match="Hydra strings"):
        compose_run(["bits"])


# -- notebook execution ----------------------------------------------------------------------------

def test_parameters_are_injected_after_the_tagged_cell():
    import nbformat

    nb = nbformat.read(NOTEBOOKS / "formats.ipynb", as_version=4)
    i = parameters_cell_index(nb)
    inject_parameters(nb, {"N": 128, "FORMATS": ["int4"]})
    assert nb.cells[i + 1].source.splitlines()[1:] == ["N = 128", "FORMATS = ['int4']"]
    with pytest.raises(ValueError, match="does not survive repr"):
        inject_parameters(nb, {"X": object()})
    nb.cells[i].metadata["tags"] = []
    with pytest.raises(ValueError, match="tagged 'parameters'"):
        parameters_cell_index(nb)


def test_every_notebook_has_a_parameters_cell_and_no_stored_outputs():
    import nbformat

    names = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert {"activations", "formats", "sensitivity", "sweeps"} <= set(names)
    for name in ("activations", "formats", "sensitivity", "sweeps"):
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        parameters_cell_index(nb)
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), name


# Shrinks the quick runs further for the notebook tests: half the samples, and only the paired metrics
# (no reference statistics of the real digits to compute in a cold cache)
FEWER = ["eval.num_samples=10", "eval.batch_size=10", "eval.grid_size=10", "eval.metrics=[psnr,fid_to_fp]",
         "calib.num_samples=4", "calib.batch_size=4", "diagnostics.num_samples=4"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One cache for the notebooks that run the pipeline (FP samples computed once)."""
    return tmp_path_factory.mktemp("nb_work")


def test_formats_notebook_runs():
    nb = execute(NOTEBOOKS / "formats.ipynb", {"N": 4096, "POINTS": 10}, timeout=300)
    out = text(nb)
    assert len(images(nb)) == 2  # the grids, the SQNR bars
    assert "fp4_e3m0" in out and "best format per distribution" in out


def test_activations_notebook_runs_small():
    nb = execute(NOTEBOOKS / "activations.ipynb", {"NUM_SAMPLES": 4, "NUM_TIMESTEPS": 2, "MAX_TOKENS": 256,
                                                    "OVERRIDES": ["sampler.num_steps=5"]}, timeout=300)
    out = text(nb)
    assert len(images(nb)) == 4  # channel ranges, std per timestep, per-timestep boxes, rotation
    assert "8 records at t = [800, 0]" in out  # 4 seeds x 2 timesteps
    assert "fc2 inputs: max|x|/std" in out and "after rotation" in out


def test_sensitivity_notebook_runs_a_quick_run(work):
    nb = execute(NOTEBOOKS / "sensitivity.ipynb", {"WORK_DIR": str(work / "sens"), "CACHE_DIR": str(work / "cache"),
                                                    "OVERRIDES": ["bits=w8a8", *FEWER]},
                 timeout=300)
    out = text(nb)
    assert "42 quantized layers" in out and "denoiser (cond)" in out
    assert len(images(nb)) == 4  # per-layer bars, per-timestep lines, the run's two diagnostics plots


def test_sweeps_notebook_runs_a_small_grid(work):
    nb = execute(NOTEBOOKS / "sweeps.ipynb", {"WORK_DIR": str(work / "sweep"), "CACHE_DIR": str(work / "cache"),
                                              "GRID": {"method": ["rtn"], "bits": ["w8a8", "w6a6"]},
                                              "BASE": ["diagnostics.enabled=false", *FEWER]}, timeout=300)
    out = text(nb)
    assert "2 rows from" in out and "psnr" in out
    assert len(images(nb)) == 1


@pytest.mark.slow
def test_sweeps_notebook_default_grid_and_an_existing_store(work):
    nb = execute(NOTEBOOKS / "sweeps.ipynb", {"WORK_DIR": str(work / "sweep22"), "CACHE_DIR": str(work / "cache")},
                 timeout=600)
    assert "4 rows from" in text(nb) and len(images(nb)) == 1
    again = execute(NOTEBOOKS / "sweeps.ipynb", {"RESULTS": str(work / "sweep22" / "results")}, timeout=300)
    assert "4 rows from" in text(again)


@pytest.mark.slow
def test_activations_notebook_runs_at_its_defaults():
    nb = execute(NOTEBOOKS / "activations.ipynb", timeout=600)
    assert len(images(nb)) == 4 and "320 records" in text(nb)  # 32 seeds x 10 timesteps
