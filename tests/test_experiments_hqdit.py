"""HQ-DiT's tables as experiment files (experiments/hqdit: DiT-XL/2 under Q-DiT's protocol;
experiments/hqdit_digits: the embedded model, plus the ablation of its parts): every sweep job
composes and validates, the only paper number is the abstract's, and the ablation methods differ
from hqdit in exactly the part they name."""
from __future__ import annotations

import pytest

from ditq.config.schema import is_full_precision
from tests.test_experiments_qdit import PAPER_TABLES, composer, job_runs, label_of, sweep_combinations  # noqa: F401

REAL = ["hqdit/table_imagenet256", "hqdit/table_imagenet512"]
DIGITS = ["hqdit_digits/table_imagenet256", "hqdit_digits/table_imagenet512", "hqdit_digits/ablation"]


@pytest.mark.parametrize("exp", REAL + DIGITS)
def test_every_sweep_job_composes_validates_and_has_its_own_row(composer, exp):
    assert len(sweep_combinations(composer, exp)) >= 6
    runs = job_runs(composer, exp)
    labels = [label_of(r) for r in runs if not is_full_precision(r)]
    assert len(set(labels)) == len(labels), f"{exp}: two quantized jobs share a row label"
    assert any(r.method.name == "hqdit" for r in runs)


@pytest.mark.parametrize("exp", REAL)
def test_real_tables_use_qdits_protocol(composer, exp):
    for run in job_runs(composer, exp):
        assert run.model.name == ("dit_xl_256" if "256" in exp else "dit_xl_512")
        assert (run.eval.num_samples, run.eval.labels, run.dtype_inference) == (10000, "random", "float16")
        assert run.sampler.num_steps in (50, 100) and run.sampler.cfg_scale == 1.5
        assert (run.calib.num_samples, run.calib.timesteps) == (256, "random_per_sample")
        if not is_full_precision(run):
            assert (run.bits.weight, run.bits.act) in (("int4", "int4"), ("fp4_e2m1", "fp4_e2m1"))


def test_the_only_paper_number_is_the_abstracts(composer):
    text = PAPER_TABLES.read_text() if PAPER_TABLES.is_file() else ""
    if text:
        assert "sFID +0.12 over FP on ImageNet 256" in text
    papers = {exp: dict(job_runs(composer, exp)[0].table.paper) for exp in REAL + DIGITS}
    assert papers["hqdit/table_imagenet256"] == {"100 hqdit w4a4_fp4": {"sfid": "FP+0.12"}}
    assert all(not p for e, p in papers.items() if e != "hqdit/table_imagenet256")
    labels = {label_of(r) for r in job_runs(composer, "hqdit/table_imagenet256")}
    assert "100 hqdit w4a4_fp4" in labels  # the paper cell sits on a row the sweep produces


def test_ablation_methods_change_one_part_each(composer):
    runs = {r.method.name: r for r in job_runs(composer, "hqdit_digits/ablation") if r.bits.name == "w4a4_fp4"}
    steps = {name: {s["name"]: dict(s) for s in r.method.steps} for name, r in runs.items()}
    full = steps["hqdit"]
    assert list(full) == ["rotate", "format_select", "rtn", "gptq"]
    assert list(steps["hqdit_norot"]) == ["format_select", "rtn", "gptq"]
    assert list(steps["hqdit_rtn"]) == ["rotate", "format_select", "rtn"]
    assert steps["hqdit_e2m1"]["format_select"]["formats"] == ["fp4_e2m1"]
    assert list(steps["hqdit_noclip"]["format_select"]["clip_ratios"]) == [1.0]
    layers = {tuple(r.method.layers) for r in runs.values()}
    assert layers == {("qkv", "proj", "cross_attn", "fc1", "fc2")}  # every row quantizes the same layers
    acts = {(r.method.act.granularity, r.method.act.dynamic) for r in runs.values()}
    assert acts == {("per_token", True)}
