"""MSFP's tables as experiment files (experiments/msfp: the real U-Nets under Q-Diffusion's protocol;
experiments/msfp_digits: the embedded U-Net and DiT): every sweep job composes and validates, every row
file is in the sweeps, INT rows use INT bits and FP rows FP bits, the ablation rows differ from msfp in
exactly the part they name, and no paper number is filled in."""
from __future__ import annotations

from pathlib import Path

import pytest

from ditq.config.schema import is_full_precision
from tests.test_experiments_qdit import composer, job_runs, label_of, sweep_combinations  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
REAL = ["msfp/table_cifar10", "msfp/table_lsun_bedroom", "msfp/table_lsun_church", "msfp/table_celebahq"]
DIGITS = ["msfp_digits/table_unet", "msfp_digits/table_dit"]
FP_METHODS = {"fp_signed_search", "msfp_ptq", "msfp_lora1", "msfp_nodfa", "msfp"}


@pytest.mark.parametrize("exp", REAL + DIGITS)
def test_every_sweep_job_composes_validates_and_has_its_own_row(composer, exp):
    assert len(sweep_combinations(composer, exp)) == 15
    runs = job_runs(composer, exp)
    labels = [label_of(r) for r in runs if not is_full_precision(r)]
    assert len(set(labels)) == len(labels), f"{exp}: two quantized jobs share a row label"
    for r in runs:
        if is_full_precision(r):
            continue
        fp_bits = r.bits.weight.startswith("fp")
        assert fp_bits == (r.method.name in FP_METHODS), f"{exp}: {r.method.name} with {r.bits.name}"
    assert len({tuple(r.method.layers) for r in runs}) == 1  # every row quantizes the same layers
    assert all(not dict(r.table.paper) for r in runs)  # MSFP's numbers are not available: none invented


@pytest.mark.parametrize("folder", ["msfp", "msfp_digits"])
def test_every_row_file_is_swept(composer, folder):
    files = {p.stem for p in (ROOT / "experiments" / folder / "rows").glob("*.yaml")}
    table = "table_cifar10" if folder == "msfp" else "table_unet"
    key = f"experiment/{folder}/rows@_global_="
    swept = {o[len(key):] for c in sweep_combinations(composer, f"{folder}/{table}") for o in c if o.startswith(key)}
    assert swept == files


def test_real_tables_follow_the_published_protocols(composer):
    expect = {"msfp/table_cifar10": ("ddpm_cifar10_32", 100, 0.0), "msfp/table_lsun_bedroom": ("ldm_lsun_bedroom_256", 200, 1.0),
              "msfp/table_lsun_church": ("ldm_lsun_church_256", 400, 0.0), "msfp/table_celebahq": ("ldm_celebahq_256", 200, 0.0)}
    for exp, (model, steps, eta) in expect.items():
        for r in job_runs(composer, exp):
            assert (r.model.name, r.sampler.num_steps, r.sampler.eta, r.sampler.cfg_scale) == (model, steps, eta, 1.0)
            assert r.eval.num_samples == 50000 and r.calib.timesteps == "all"


def test_ablation_rows_change_one_part_each(composer):
    runs = {r.method.name: r for r in job_runs(composer, "msfp_digits/table_unet") if r.bits.name == "w4a4_fp4"}
    steps = {n: {s["name"]: dict(s) for s in r.method.steps} for n, r in runs.items()}
    full = steps["msfp"]
    assert list(full) == ["mixup_sign", "rtn", "talora"]
    assert list(steps["msfp_ptq"]) == ["mixup_sign", "rtn"] and steps["msfp_ptq"]["mixup_sign"] == full["mixup_sign"]
    assert steps["fp_signed_search"]["mixup_sign"]["allow_unsigned"] is False
    assert full["mixup_sign"]["allow_unsigned"] is True

    def differs(a, b):
        return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}

    assert differs(steps["msfp_lora1"]["talora"], full["talora"]) == {"branches"}
    assert differs(steps["msfp_nodfa"]["talora"], full["talora"]) == {"dfa"}
    assert full["talora"]["branches"] > 1 and full["talora"]["dfa"] is True
