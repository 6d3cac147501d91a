"""Q-DiT's Tables 1-5 as experiment files (experiments/qdit: DiT-XL/2; experiments/qdit_digits: the
embedded model): every sweep combination composes and validates, the paper's numbers are exactly
those of /work/shared/reference/paper-tables.md (none missing, none invented), each is keyed by a
row label the sweep produces, and the ablation method compositions are what they say."""
from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ditq.config import validate_config
from ditq.config.schema import is_full_precision
from ditq.paths import config_dir
from ditq.tracking.table import row_label

EXP_DIR = config_dir() / "experiment"
TABLES = ["table1_group_size", "table2_imagenet256", "table3_imagenet512", "table4_ablation", "table5_search"]
REAL = [f"qdit/{t}" for t in TABLES]
DIGITS = [f"qdit_digits/{t}" for t in TABLES]
PAPER_TABLES = Path(os.environ.get("DITQ_PAPER_TABLES", "/work/shared/reference/paper-tables.md"))


@pytest.fixture(scope="module")
def composer():
    """compose(overrides, hydra=False) -> the composed config (with Hydra's node when hydra=True),
    inside one Hydra initialisation for the module."""
    from hydra import compose, initialize_config_dir

    import ditq.config  # noqa: F401  (registers resolvers)

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        yield lambda overrides, hydra=False: compose("config", overrides=list(overrides), return_hydra_config=hydra)


_RUNS: dict[str, list] = {}  # experiment -> its jobs' validated configs (composing 169 jobs takes a while)


def sweep_combinations(composer, exp: str) -> list[list[str]]:
    """Every job's overrides of an experiment's sweep (Hydra's basic sweeper: the cartesian product
    of `hydra.sweeper.params`, each value parsed by Hydra's own override grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = composer([f"experiment={exp}"], hydra=True).hydra.sweeper.params or {}
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        (ov,) = parser.parse_overrides([f"{key}={value}"])
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [list(c) for c in itertools.product(*axes)]


def job_runs(composer, exp: str) -> list:
    """The validated run config of every job of the experiment's sweep (composed once per module)."""
    if exp not in _RUNS:
        _RUNS[exp] = [validate_config(composer([f"experiment={exp}", *combo]))
                      for combo in sweep_combinations(composer, exp)]
    return _RUNS[exp]


def label_of(run) -> str:
    row = {"is_fp": is_full_precision(run), "config": OmegaConf.to_container(run, resolve=True)}
    return row_label(row, list(run.table.rows))


# ----------------------------------------------------------------------------- the files
def test_the_ten_experiment_files_exist():
    for exp in REAL + DIGITS:
        path = EXP_DIR / f"{exp}.yaml"
        assert path.is_file(), f"missing experiment file {path}"
        assert path.read_text().startswith("# @package _global_"), path


@pytest.mark.parametrize("exp", REAL + DIGITS)
def test_every_sweep_combination_composes_and_validates(composer, exp):
    combos = sweep_combinations(composer, exp)
    assert len(combos) >= 3, f"{exp}: the sweep has {len(combos)} jobs"
    assert composer([f"experiment={exp}"], hydra=True).hydra.mode.name == "MULTIRUN"
    runs = job_runs(composer, exp)
    assert all(r.experiment == exp for r in runs)
    labels = [label_of(r) for r in runs]
    quantized = [lab for r, lab in zip(runs, labels) if not is_full_precision(r)]
    assert len(set(quantized)) == len(quantized), f"{exp}: two quantized jobs share a row label"


@pytest.mark.parametrize("exp", REAL)
def test_real_tables_follow_the_papers_protocol(composer, exp):
    for run in job_runs(composer, exp):
        assert run.model.name in ("dit_xl_256", "dit_xl_512") and run.dataset.kind == "imagenet"
        assert (run.eval.num_samples, run.eval.labels, run.eval.feature_net) == (10000, "random", "inception")
        assert run.dtype_inference == "float16"
        assert (run.calib.num_samples, run.calib.timesteps, run.calib.labels) == (256, "random_per_sample", "random")
        assert run.sampler.kind == "ddim" and run.sampler.num_steps in (50, 100)
        assert run.search.name == "qdit"
        assert {"fid", "sfid", "is", "precision"} <= set(run.eval.metrics)
        assert list(run.table.columns)[:5] == ["fid", "sfid", "is", "precision", "size_mb"]
        if not is_full_precision(run):
            assert (run.bits.weight, run.bits.act) in (("int8", "int8"), ("int4", "int8"))


def test_table2_covers_the_four_sampler_settings(composer):
    settings = {(r.sampler.num_steps, r.sampler.cfg_scale) for r in job_runs(composer, "qdit/table2_imagenet256")}
    assert settings == {(50, 1.0), (50, 1.5), (100, 1.0), (100, 1.5)}
    settings = {(r.sampler.num_steps, r.sampler.cfg_scale) for r in job_runs(composer, "qdit/table3_imagenet512")}
    assert settings == {(50, 1.0), (50, 1.5)}


@pytest.mark.parametrize("exp", DIGITS)
def test_digits_tables_follow_the_embedded_protocol(composer, exp):
    for run in job_runs(composer, exp):
        assert (run.model.name, run.dataset.kind) == ("tiny_dit_digits", "digits")
        # the embedded search space; Tables 2 and 3 (one search per setting) at a small budget
        quick = exp in ("qdit_digits/table2_imagenet256", "qdit_digits/table3_imagenet512")
        assert run.search.name == ("embedded_quick" if quick else "embedded")
        assert list(run.search.choices) == [8, 16, 32, 64, 128] and run.search.target_group_size == 32
        assert run.eval.num_samples == 1000 and run.sampler.name in ("ddim25", "ddim50")
        assert (run.calib.num_samples, run.calib.timesteps) == (256, "random_per_sample")
        if exp != "qdit_digits/table3_imagenet512":  # Table 3 here is the cfg axis: 1.0 and 1.5
            assert run.sampler.cfg_scale == 1.0
        cols = list(run.table.columns)
        assert cols[:4] == ["fid", "fid_to_fp", "psnr", "cls_acc"], f"{exp}: the paired columns belong next to FID"
        assert not run.table.paper, f"{exp}: no paper numbers on another model"
        if run.method.name in ("qdit", "rtn_group", "rtn_group_dynamic", "gptq_group") and exp != DIGITS[0]:
            assert run.method.weight.group_size == 32


def test_digits_table1_sweeps_the_scaled_group_sizes(composer):
    runs = job_runs(composer, "qdit_digits/table1_group_size")
    assert sorted((r.method.weight.group_size, r.method.act.group_size) for r in runs) == [(16, 16), (24, 24), (32, 32)]
    assert {r.method.name for r in runs} == {"qdit"} and {r.bits.name for r in runs} == {"w4a8"}


# ----------------------------------------------------------------------------- paper numbers
def _md_section(text: str, heading: str) -> list[dict]:
    start = text.index(heading)
    end = text.find("\n### ", start + 1)
    lines = [ln for ln in text[start:end if end > 0 else None].splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


_METHOD = {"PTQ4DM": "ptq4dm", "RepQ-ViT": "repq_vit", "GPTQ": "gptq", "Q-DiT": "qdit_search"}
_BITS = {"8/8": "w8a8", "4/8": "w4a8"}
# Table 4: the paper's chain; "+ dynamic" is Table 5's uniform Q-DiT (6.64), "+ allocation" Table 2's Q-DiT
_TABLE4 = {"FP16": "FP", "RTN": "rtn w4a8", "+ Group size 128": "rtn_group w4a8",
           "+ Dynamic activation quantization": "qdit w4a8", "+ Group size allocation": "qdit_search w4a8"}
_TABLE5 = {"Group size = 128": "qdit w4a8", "Integer Linear Programming": "qdit_ilp w4a8",
           "Hessian-based": "qdit_hessian w4a8", "(evolutionary, = Table 4 last row)": "qdit_search w4a8"}


def _cells(r: dict, size: bool) -> dict:
    out = {"fid": float(r["FID"]), "sfid": float(r["sFID"])}
    if "IS" in r:
        out.update({"is": float(r["IS"]), "precision": float(r["Prec"])})
    if size:
        out["size_mb"] = float(r["size MB"])
    return out


def _setting(s: str) -> str:
    steps = re.fullmatch(r"steps=(\d+)( cfg=1\.5)?", s)
    assert steps, f"unexpected setting {s!r} in paper-tables.md"
    return f"{steps.group(1)} {'1.5' if steps.group(2) else '1.0'}"


def paper_rows() -> dict[str, dict[str, dict]]:
    """experiment -> {row label: {column: value}} from paper-tables.md, with the label ditq gives it."""
    if not PAPER_TABLES.is_file():
        pytest.skip(f"{PAPER_TABLES} is not here (set DITQ_PAPER_TABLES)")
    text = PAPER_TABLES.read_text()
    out: dict[str, dict[str, dict]] = {e: {} for e in REAL}
    for r in _md_section(text, "### 1.3 Table 1"):
        out["qdit/table1_group_size"][f"dit_xl_{r['res']} {r['group']}"] = _cells(r, size=False)
    for exp, heading in (("qdit/table2_imagenet256", "### 1.4 Table 2"), ("qdit/table3_imagenet512", "### 1.5 Table 3")):
        for r in _md_section(text, heading):
            what = "FP" if r["method"] == "FP" else f"{_METHOD[r['method']]} {_BITS[r['W/A']]}"
            out[exp][f"{_setting(r['setting'])} {what}"] = _cells(r, size=True)
    for exp, heading, names in (("qdit/table4_ablation", "### 1.6 Table 4", _TABLE4),
                                ("qdit/table5_search", "### 1.7 Table 5", _TABLE5)):
        for r in _md_section(text, heading):
            out[exp][names[r["method"]]] = _cells(r, size=False)
    return out


def test_paper_tables_parse_into_every_row():
    rows = paper_rows()
    assert [len(rows[e]) for e in REAL] == [4, 36, 18, 5, 4]


@pytest.mark.parametrize("exp", REAL)
def test_paper_block_equals_paper_tables_md(composer, exp):
    """Every row of the table in paper-tables.md is carried, with every value, and nothing else."""
    expected = paper_rows()[exp]
    paper = OmegaConf.to_container(validate_config(composer([f"experiment={exp}"])).table.paper)
    assert set(paper) == set(expected), (f"{exp}: missing {sorted(set(expected) - set(paper))}, "
                                         f"not in paper-tables.md {sorted(set(paper) - set(expected))}")
    for label, cells in expected.items():
        assert {k: float(v) for k, v in paper[label].items()} == cells, f"{exp}: {label}"


@pytest.mark.parametrize("exp", REAL)
def test_every_paper_label_is_a_row_of_the_sweep(composer, exp):
    runs = job_runs(composer, exp)
    labels = {label_of(r) for r in runs}
    paper = set(runs[0].table.paper)
    assert paper <= labels, f"{exp}: paper rows no job produces: {sorted(paper - labels)}"


# ----------------------------------------------------------------------------- compositions
def test_uniform_group_size_is_one_override(composer):
    def sides(*ov):
        m = validate_config(composer(list(ov))).method
        return m.weight.get("group_size"), m.act.get("group_size")

    assert sides("method=qdit") == (128, 128)  # the documented default
    for method in ("qdit", "qdit_adaln", "rtn_group_dynamic", "qdit_search", "rtn_group_dynamic_search"):
        assert sides(f"method={method}", "method.group_size=64") == (64, 64), method
    for method in ("rtn_group", "gptq_group"):  # static activations per channel: no act group
        assert sides(f"method={method}", "method.group_size=64") == (64, None), method


def test_ablation_compositions(composer):
    def method(name):
        return validate_config(composer([f"method={name}", "bits=w4a8"])).method

    def steps(m):
        return [s["name"] for s in m.steps]

    rg, gg, rgd, rgds, qd = (method(n) for n in
                             ("rtn_group", "gptq_group", "rtn_group_dynamic", "rtn_group_dynamic_search", "qdit"))
    for m in (rg, gg):
        assert (m.weight.granularity, m.weight.symmetric, m.weight.range) == ("per_group", False, "minmax")
        assert (m.act.granularity, m.act.dynamic, m.act.symmetric, m.act.range) == ("per_channel", False, False, "minmax")
    assert steps(rg) == ["rtn"] and steps(gg) == ["rtn", "gptq"]
    assert steps(rgd) == ["rtn"] and steps(rgds) == ["group_search", "rtn"] and steps(qd) == ["gptq"]
    for m in (rgd, rgds):  # Q-DiT's quantizers, weights rounded to nearest
        assert (m.weight, m.act, list(m.layers)) == (qd.weight, qd.act, list(qd.layers))
    assert {tuple(m.layers) for m in (rg, gg, rgd, rgds, qd)} == {("qkv", "proj", "cross_attn", "fc1", "fc2", "conv")}


# ----------------------------------------------------------------------------- FP rows of a sweep
def test_fp_row_label_keeps_the_setting():
    keys = ["sampler.num_steps", "sampler.cfg_scale", "method.name", "bits.name"]
    fp = {"is_fp": True, "config": {"sampler": {"num_steps": 100, "cfg_scale": 1.5}, "method": {"name": "qdit"},
                                    "bits": {"name": "fp"}}}
    assert row_label(fp, keys) == "100 1.5 FP"
    assert row_label(fp, ["method.name", "bits.name"]) == "FP"
    assert row_label({**fp, "is_fp": False}, keys) == "100 1.5 qdit fp"


def test_fp_jobs_of_a_method_sweep_are_one_run(composer):
    from ditq.tracking.identity import run_key

    def key(*ov):
        return run_key(validate_config(composer(["experiment=qdit_digits/table4_ablation", *ov])), {"m": 1}, "cpu")

    fp = {key("bits=fp", f"method={m}") for m in ("rtn", "rtn_group", "qdit", "gptq_group")}
    assert len(fp) == 1, "an FP run reads no method settings: its identity must not depend on them"
    assert key("bits=fp", "method=rtn", "sampler.cfg_scale=1.5") not in fp  # the setting still counts
    quant = {key("bits=w4a8", f"method={m}") for m in ("rtn", "rtn_group", "qdit", "gptq_group")}
    assert len(quant) == 4
