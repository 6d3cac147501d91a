"""FP4DiT's tables as experiment files (experiments/fp4dit: PixArt-alpha 512 / 1024, PixArt-Sigma,
Hunyuan-DiT on COCO captions and the HPSv2 benchmark; experiments/fp4dit_digits: the embedded
text-to-image and class DiTs). Rows are picked by the sweep key `experiment/fp4dit/methods@_global_`
(a method per row file, so a row can carry its own steps) or `experiment/fp4dit_digits/rows@_global_`
(a method file and a bits preset per row): every sweep job composes and validates, no paper number is
filled (none are available), the embedded rows differ from their method configs only in the stated
budget, every embedded row file is swept, and Hunyuan-DiT carries no block-wise (AdaRound) row."""
from __future__ import annotations

from collections import Counter

import pytest
from omegaconf import OmegaConf

from ditq.config.schema import is_full_precision
from ditq.paths import config_dir
from tests.test_experiments_qdit import PAPER_TABLES, composer, job_runs, label_of, sweep_combinations  # noqa: F401

EXP_DIR = config_dir() / "experiment"
MODELS = ["pixart_alpha_512", "pixart_alpha_1024", "pixart_sigma", "hunyuan"]
REAL = [f"fp4dit/table_{m}" for m in MODELS] + [f"fp4dit/table_{m}_hpsv2" for m in MODELS]
DIGITS = ["fp4dit_digits/table_t2i", "fp4dit_digits/ablation_t2i", "fp4dit_digits/table_class_dit"]
BITS = {"fp", "w4a8", "w4a6", "w4a8_fp4dit", "w4a6_fp4dit"}
HPS_STYLE_COLUMNS = ["hpsv2/anime", "hpsv2/concept-art", "hpsv2/paintings", "hpsv2/photo"]
MAIN_ROWS = {"rtn_dynamic", "adaround_int", "qdit", "fp4dit"}  # the INT baselines at INT bits, FP4DiT at FP bits
ABLATION_ROWS = {"rtn_dynamic", "adaround_int", "fp4dit_rtn", "fp4dit_plain", "fp4dit", "fp4dit_auto"}


def _steps(run) -> list[dict]:
    return [dict(OmegaConf.to_container(s, resolve=True)) for s in run.method.steps]


def _method_conf(name: str) -> dict:
    from hydra import compose

    return OmegaConf.to_container(compose("config", overrides=[f"method={name}"]).method, resolve=True)


@pytest.mark.parametrize("exp", REAL + DIGITS)
def test_every_sweep_job_composes_validates_and_has_its_own_row(composer, exp):
    path = EXP_DIR / f"{exp}.yaml"
    assert path.read_text().startswith("# @package _global_"), path
    assert composer([f"experiment={exp}"], hydra=True).hydra.mode.name == "MULTIRUN"
    assert len(sweep_combinations(composer, exp)) >= 9
    runs = job_runs(composer, exp)
    assert all(r.experiment == exp for r in runs), f"{exp}: a row file's `experiment` leaked into a job"
    assert {r.bits.name for r in runs} == BITS
    labels = [label_of(r) for r in runs if not is_full_precision(r)]
    assert len(set(labels)) == len(labels), f"{exp}: two quantized jobs share a row label"
    assert list(runs[0].table.rows) == ["method.name", "bits.name"]


@pytest.mark.parametrize("exp", REAL + DIGITS)
def test_no_paper_number_is_filled(composer, exp):
    text = PAPER_TABLES.read_text() if PAPER_TABLES.is_file() else ""
    if text:  # the reference says FP4DiT's tables are not available; if that ever changes, so must this test
        section = text[text.index("## FP4DiT"):]
        assert "not available here" in section.split("\n## ")[0]
    assert all(not r.table.paper for r in job_runs(composer, exp)), f"{exp}: paper cells must stay empty"


@pytest.mark.parametrize("exp", REAL)
def test_real_tables_follow_the_protocol(composer, exp):
    hps = exp.endswith("_hpsv2")
    hunyuan = "hunyuan" in exp
    for run in job_runs(composer, exp):
        assert run.dtype_inference == "float16"
        assert {"clip", "image_reward", "hpsv2"} <= set(run.eval.metrics)
        assert (run.calib.num_samples, run.calib.timesteps, run.calib.include_uncond) == (128, "all", True)
        if hps:  # the benchmark has prompts only: FP trajectories of its prompts (a stated deviation)
            assert (run.dataset.kind, run.calib.source, run.eval.num_samples) == ("hpsv2", "trajectories", 3200)
            assert list(run.table.columns)[:5] == ["hpsv2", *HPS_STYLE_COLUMNS]
        else:
            assert (run.dataset.kind, run.calib.source, run.eval.num_samples) == ("coco_captions", "noised_data", 10000)
            assert run.calib.noise_timesteps == "sampler"  # the paper's reading; raw_0_19 is the public code's
            assert run.dataset.prompts and run.dataset.images
            assert list(run.table.columns)[:3] == ["clip", "image_reward", "hpsv2"]
        if hunyuan:  # HunyuanDiTPipeline's defaults
            assert (run.sampler.kind, run.sampler.num_steps, run.sampler.cfg_scale) == ("ddpm", 50, 5.0)
            assert "caption" not in run.method.layers
        else:
            assert (run.sampler.name, run.sampler.num_steps, run.sampler.cfg_scale) == ("pixart_dpm20", 20, 4.5)


@pytest.mark.parametrize("exp", REAL)
def test_real_rows_are_the_papers_methods(composer, exp):
    runs = job_runs(composer, exp)
    methods = {r.method.name for r in runs}
    sigma = "sigma" in exp
    if "hunyuan" in exp:  # block-wise AdaRound needs a chain of blocks, which Hunyuan-DiT lacks
        assert methods == {"rtn", "fp4dit_rtn"}
        assert not any(s["name"] == "adaround" for r in runs for s in _steps(r))
        return
    fp4 = "fp4dit_sigma" if sigma else "fp4dit"
    assert methods == {"rtn", "adaround_int", f"{fp4}_rtn", fp4}
    for r in runs:
        if r.method.name == fp4:  # the paper's settings, untouched by the row file
            assert _steps(r)[0] | {"name": "adaround"} == _method_conf(fp4)["steps"][0]
            assert r.method.weight.group_size == 128
            fc1 = OmegaConf.to_container(r.method.formats, resolve=True)
            assert ("default" in fc1) == sigma and ((fc1.get("fc1") is not None) != sigma)
        if r.method.name == "adaround_int":
            assert _steps(r)[-1]["iters"] == 20000


@pytest.mark.parametrize("exp", DIGITS)
def test_digits_tables_follow_the_embedded_protocol(composer, exp):
    t2i = exp.endswith("t2i")
    runs = job_runs(composer, exp)
    quantized = [r for r in runs if not is_full_precision(r)]
    if exp == "fp4dit_digits/table_t2i":  # the paper's comparison: each method at W4A8 and W4A6, on its own grid
        assert Counter(r.method.name for r in quantized) == {m: 2 for m in MAIN_ROWS}
        for r in quantized:
            assert r.bits.weight.startswith("fp") == (r.method.name == "fp4dit"), label_of(r)
            assert r.bits.name.split("_")[0] in ("w4a8", "w4a6"), label_of(r)
    else:
        assert {r.method.name for r in quantized} == ABLATION_ROWS
        assert Counter(r.bits.name for r in quantized if r.method.name == "fp4dit") == \
               {"w4a8": 1, "w4a6": 1, "w4a8_fp4dit": 1, "w4a6_fp4dit": 1}  # FP vs INT grid, same method
    for run in runs:
        assert run.model.name == ("tiny_pixart_digits" if t2i else "tiny_dit_digits")
        assert (run.calib.source, run.calib.num_samples, run.calib.timesteps) == ("noised_data", 32, "all")
        assert run.eval.num_samples == 1000
        if t2i:
            assert run.sampler.name == "tiny_t2i"  # the embedded preset, whatever guidance it settles on
            assert f"cfg {run.sampler.cfg_scale}" in run.table.title
            assert list(run.table.columns)[:6] == ["fid_to_fp", "psnr", "cls_acc", "clip", "hpsv2", "fid"]
        else:
            assert (run.sampler.name, run.sampler.cfg_scale) == ("ddim25", 1.0)
            assert "cfg 1.0" in run.table.title
            assert list(run.table.columns)[:4] == ["fid", "fid_to_fp", "psnr", "cls_acc"]
    assert len({tuple(r.method.layers) for r in runs}) == 1  # every row quantizes the same layers


@pytest.mark.parametrize("exp", DIGITS)
def test_digit_rows_differ_from_their_methods_only_in_the_budget(composer, exp):
    """Each method file copies its method's steps; only iters (500) and log_every may differ, the group
    size is 64, and the ablation rows change exactly what they name."""
    runs = {r.method.name: r for r in job_runs(composer, exp) if r.bits.name in ("w4a8_fp4dit", "w4a8")}
    base = {"adaround_int": "adaround_int", "fp4dit_plain": "fp4dit", "qdit": "qdit",
            "fp4dit": "fp4dit", "fp4dit_auto": "fp4dit_auto", "fp4dit_rtn": "fp4dit", "rtn_dynamic": "rtn_dynamic"}
    from ditq.methods.options import AdaRoundOptions

    defaults = {k: v for k, v in vars(AdaRoundOptions()).items()}
    for name, run in runs.items():
        ours, theirs = _steps(run), _method_conf(base[name])["steps"]
        if name == "fp4dit_rtn":
            assert ours == [{"name": "rtn"}]
            continue
        assert [s["name"] for s in ours] == [s["name"] for s in theirs], name
        for a, b in zip(ours, theirs):
            if a["name"] != "adaround":
                assert a == b, name
                continue
            a_full, b_full = {**defaults, **a}, {**defaults, **b}
            assert a_full["iters"] == 500, name
            if name == "fp4dit_plain":
                assert (a_full["scale_aware"], b_full["scale_aware"]) == (False, True)
                b_full["scale_aware"] = False
            drop = ("iters", "log_every")
            assert {k: v for k, v in a_full.items() if k not in drop} == \
                   {k: v for k, v in b_full.items() if k not in drop}, name
        if run.method.weight.get("granularity") == "per_group":
            assert run.method.weight.group_size == 64, name
    assert runs["fp4dit"].method.formats.fc1 is not None and runs["fp4dit"].method.attn.qkv
    if "fp4dit_auto" in runs:
        assert runs["fp4dit_auto"].method.formats.fc1 is None


def test_row_files_compose_on_their_own(composer):
    """The row files sit under experiments/ (tests/test_config.py composes every file there): alone, each
    is a valid run named after itself, and inside a table the table's name wins."""
    rows = sorted(p.relative_to(EXP_DIR).with_suffix("").as_posix()
                  for d in ("fp4dit/methods", "fp4dit_digits/methods", "fp4dit_digits/rows")
                  for p in (EXP_DIR / d).glob("*.yaml"))
    assert len(rows) == 6 + 7 + 16
    from ditq.config import validate_config

    for row in rows:
        run = validate_config(composer([f"experiment={row}"]))
        assert run.experiment == row


def test_every_embedded_row_file_is_swept(composer):
    files = {p.stem for p in (EXP_DIR / "fp4dit_digits" / "rows").glob("*.yaml")}
    key = "experiment/fp4dit_digits/rows@_global_="
    swept = {o[len(key):] for exp in DIGITS for c in sweep_combinations(composer, exp) for o in c if o.startswith(key)}
    assert swept == files
    methods = {p.stem for p in (EXP_DIR / "fp4dit_digits" / "methods").glob("*.yaml")}
    used = {r.method.name for exp in DIGITS for r in job_runs(composer, exp)}
    assert methods <= used, f"method files no table row uses: {methods - used}"
