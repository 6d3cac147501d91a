"""The shipped embedded U-Net (unconditional digits) end to end: it loads in the layout of the real
latent-diffusion U-Nets, its samples are digits of every class, and the pipeline quantizes it with
RTN, GPTQ (the U-Net runner) and AdaRound (block reconstruction through the skip stack)."""
import json

import pytest
import torch

from ditq.paths import ASSETS_DIR
from tests.helpers import run_pipeline

ASSET = ASSETS_DIR / "tiny_unet_digits"
UNET = ["model=tiny_unet_digits", "dataset=digits", "eval=digits_uncond", "sampler=ddim25_uncond",
        "diagnostics.enabled=false"]


def test_shipped_unet_matches_its_training_record():
    from ditq.train.tiny_unet import ARCH

    meta = json.loads((ASSET / "train_meta.json").read_text())
    assert meta["steps"] == 10000 and meta["final_loss_ema"] < 0.08
    config = json.loads((ASSET / "unet" / "config.json").read_text())
    for k, v in ARCH.items():
        assert config[k] == (list(v) if isinstance(v, tuple) else v), k
    assert (ASSET / "scheduler" / "scheduler_config.json").is_file()


def test_shipped_unet_samples_every_digit(compose):
    from ditq.config import validate_config
    from ditq.metrics.digits_net import load_digits_classifier
    from ditq.models import load_adapter
    from ditq.data.digits import from_uint8
    from ditq.pipeline import sample_images
    from ditq.sampling import Sampler

    run = validate_config(compose(UNET))
    adapter = load_adapter(run.model)
    seeds = list(range(200))
    images = sample_images(adapter, Sampler(adapter, run.sampler), seeds, torch.zeros(200, dtype=torch.long),
                           cache=None, spec=None, desc="fp", progress=False)
    with torch.no_grad():
        logits = load_digits_classifier()(from_uint8(images))
    conf, cls = logits.softmax(1).max(1)
    share = torch.bincount(cls, minlength=10).float() / len(cls)
    assert (share > 0.03).all() and share.max() < 0.25  # every digit, none dominating
    assert conf.mean() > 0.8  # recognisable digits


def test_unet_rtn_and_gptq_runs(compose, paths, tmp_path):
    fp = run_pipeline(compose, [*UNET, *paths, "bits=fp"], tmp_path / "fp")
    assert fp["protocol"]["conditions"]["kind"] == "none" and set(fp["metrics"]) >= {"fid", "sfid", "is"}
    rtn4 = run_pipeline(compose, [*UNET, *paths, "bits=w4a8", "method=rtn"], tmp_path / "r4")
    g4 = run_pipeline(compose, [*UNET, *paths, "bits=w4a8", "method=gptq"], tmp_path / "g4")
    per_layer = g4["diagnostics"]["gptq"]["per_layer"]
    assert any(".conv1" in n for n in per_layer) and any(n.startswith("up_blocks.") for n in per_layer)
    assert g4["metrics"]["psnr"] > rtn4["metrics"]["psnr"] > 15


@pytest.mark.slow
def test_unet_adaround_reconstructs_through_the_skip_stack(compose, paths, tmp_path):
    ada = run_pipeline(compose, [*UNET, *paths, "bits=w4a8", "method=adaround_int", "method.steps.1.iters=20"],
                       tmp_path / "ada")
    segs = ada["diagnostics"]["adaround"]["segments"]
    assert {"0", "3", "6"} <= set(segs)  # a down block, the mid block, an up block (skip inputs)


def test_conv_weight_groups_must_hold_whole_input_channels():
    from ditq.methods.plan import LayerPlan, group_problems
    from ditq.quant.spec import QuantizerConfig

    def lp(g):
        return LayerPlan(role="conv", shape=None, weight=QuantizerConfig(format="int4", granularity="per_group", group_size=g))

    shape = (64, 32, 3, 3)  # 32 channels x 9 taps = 288 columns
    assert group_problems("c", lp(72), shape) == []  # 8 whole channels
    (msg,) = group_problems("c", lp(64), shape)
    assert "multiple of 9" in msg and "63 or 72" in msg
    assert group_problems("c", lp(16), (64, 32, 1, 1)) == []  # 1x1 convs: any size, as linears
    assert group_problems("lin", lp(64), (64, 128)) == []
