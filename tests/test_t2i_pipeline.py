"""The text-to-image path end to end on the shipped embedded model (tiny PixArt + digit captions):
conditions by seed, cached text embeddings, calibration and GPTQ on prompt indices, the T2I metrics
in the row, pairing, and the bad inputs that must fail before any work."""
import json

import pytest
import torch

from ditq.config import ConfigError, validate_config
from tests.helpers import run_pipeline

T2I = ["model=tiny_pixart_digits", "dataset=digits_captions", "eval=digits_t2i", "sampler=pixart_dpm20",
       "eval.metrics=[fid,cls_acc,clip,hpsv2,psnr,fid_to_fp]", "diagnostics.enabled=false"]


def test_t2i_rtn_run_scores_prompts_and_reuses_the_text_cache(compose, paths, tmp_path):
    fp = run_pipeline(compose, [*T2I, *paths, "bits=fp"], tmp_path / "fp")
    assert fp["diagnostics"]["text_encoding"]["cached"] is False and fp["diagnostics"]["text_encoding"]["prompts"] == 101
    assert fp["protocol"]["conditions"]["name"] == "digits_captions"
    assert set(fp["metrics"]) >= {"fid", "cls_acc", "clip", "hpsv2"}
    q = run_pipeline(compose, [*T2I, *paths, "bits=w8a8", "method=rtn_dynamic"], tmp_path / "q")
    te = q["diagnostics"]["text_encoding"]
    assert te["cached"] is True and te["encoder_loaded"] is False  # the second run never loads the encoder
    assert q["timings"]["fp_sample_cached"] == q["timings"]["fp_sample_shards"]  # FP images keyed with the prompts
    assert q["metrics"]["psnr"] > 25 and 0 <= q["metrics"]["cls_acc"] <= 1
    prompts = (tmp_path / "q" / "prompts.txt").read_text().splitlines()
    assert prompts[:3] == ["a handwritten zero", "the digit 0", "the digit zero"]  # seed i -> pool[i % 100]
    roles = {r for r in q["diagnostics"]["quantizers"]}
    assert "cross_attn" in roles  # cross-attention is quantized with the blocks


def test_t2i_gptq_runs_on_prompt_indices(compose, paths, tmp_path):
    row = run_pipeline(compose, [*T2I, *paths, "bits=w4a8", "method=gptq", "sampler.cfg_scale=4.5"], tmp_path / "g")
    assert row["metrics"]["psnr"] > 10
    per_layer = row["diagnostics"]["gptq"]["per_layer"]
    assert any(".attn2." in n for n in per_layer) and any(n.startswith("caption") or ".attn1." in n for n in per_layer)


def test_t2i_images_are_paired_by_seed():
    from ditq.conditioning.text import prepare_text
    from ditq.data.prompts import digit_caption_conditions
    from ditq.models import load_adapter
    from ditq.pipeline import sample_images
    from ditq.sampling import Sampler
    from tests.helpers import sampler_cfg

    cfg = validate_config(_compose_model()).model
    adapter = load_adapter(cfg)
    cond = digit_caption_conditions()
    adapter.set_conditions(cond)
    prepare_text(adapter, cond, torch.arange(len(cond)), progress=False)
    sampler = Sampler(adapter, sampler_cfg(kind="dpm_solver", num_steps=4, cfg_scale=4.5, batch_size=4))
    seeds = list(range(8))
    a = sample_images(adapter, sampler, seeds, cond.for_seeds(seeds), cache=None, spec=None, desc="a", progress=False)
    b = sample_images(adapter, sampler, seeds[5:], cond.for_seeds(seeds[5:]), cache=None, spec=None, desc="b",
                      progress=False)
    assert torch.equal(a[5:], b)


def _compose_model():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ditq.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return hydra_compose("config", overrides=T2I)


@pytest.mark.parametrize("overrides, needle", [
    (["model=tiny_pixart_digits", "eval=digits_t2i"], "prompt"),  # class dataset with a text model
    (["dataset=digits_captions", "eval=digits_t2i"], "prompt"),  # prompt dataset with a class model
    (["model=tiny_pixart_digits", "dataset=coco_captions", "eval=t2i"], "dataset.prompts"),
])
def test_mismatched_conditioning_fails_at_config_time(compose, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config(compose(overrides))


def test_missing_prompt_file_fails_before_the_model_loads(compose, paths, tmp_path, monkeypatch):
    import ditq.models

    monkeypatch.setattr(ditq.models, "load_adapter", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        run_pipeline(compose, ["model=tiny_pixart_digits", "dataset=coco_captions", "eval=digits_t2i",
                               "eval.metrics=[clip]", f"dataset.prompts={tmp_path}/captions_val2014.json", *paths],
                     tmp_path / "out")


def test_guidance_without_an_unconditional_branch_is_refused():
    from types import SimpleNamespace

    from ditq.preflight import check_guidance

    adapter = SimpleNamespace(null_index=None, conditioning="none")
    run = SimpleNamespace(sampler=SimpleNamespace(cfg_scale=1.5), model=SimpleNamespace(name="uncond"))
    with pytest.raises(ConfigError, match="sampler.cfg_scale=1.0"):
        check_guidance(adapter, run)
    run.sampler.cfg_scale = 1.0
    check_guidance(adapter, run)
