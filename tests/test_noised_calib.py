"""FP4DiT's calibration data (ditq.calibration.noised, calib.source=noised_data): real captioned images noised
with the training schedule at the sampler's steps or at raw timesteps 0..19, in the trajectory records' layout;
COCO images resized / cropped / VAE-encoded; the embedded text-to-image path end to end."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ditq.config import ConfigError, validate_config
from tests.conftest import SHRINK
from tests.helpers import random_dit, sampler_cfg

T2I = ["model=tiny_pixart_digits", "dataset=digits_captions", "eval=digits_t2i", "sampler=pixart_dpm20"]
# the shipped model is not needed: a random one of the same family, one block
RANDOM_PIXART = ["model.weights=random", "model.arch.num_layers=1"]


def _calib(**kw):
    base = dict(num_samples=4, seed_start=1_000_000, labels="balanced", timesteps="all", num_timesteps=2,
                ndtc_mean=0.4, ndtc_std=0.4, batch_size=8, source="noised_data", noise_timesteps="sampler")
    base.update(kw)
    return OmegaConf.create(base)


def _dataset(kind="digits"):
    return OmegaConf.create({"kind": kind, "prompts": None, "images": None})


def _sampler(adapter, steps=4):
    from ditq.sampling import Sampler

    return Sampler(adapter, sampler_cfg(kind="ddim", num_steps=steps, cfg_scale=1.0))


def test_records_have_the_trajectory_layout_and_are_deterministic():
    from ditq.calibration.noised import collect_noised_inputs

    adapter = random_dit()
    s = _sampler(adapter)
    a = collect_noised_inputs(s, _calib(), _dataset("digits"))
    assert set(a) == {"x", "t", "y", "seed", "step"}
    assert a["x"].shape == (16, 1, 8, 8) and all(a[k].shape == (16,) and a[k].dtype == torch.long
                                                 for k in ("t", "y", "seed", "step"))
    assert a["seed"].tolist() == [s_ for s_ in range(1_000_000, 1_000_004) for _ in range(4)]
    assert a["t"][:4].tolist() == s.timesteps() and a["step"][:4].tolist() == [0, 1, 2, 3]
    b = collect_noised_inputs(s, _calib(), _dataset("digits"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = collect_noised_inputs(s, _calib(seed_start=1_000_100), _dataset("digits"))
    assert not torch.equal(a["x"], c["x"])


def test_noised_x_follows_the_training_schedule_with_the_seeds_noise():
    from ditq.calibration.noised import collect_noised_inputs, digit_images, noise_for, training_alphas_cumprod

    adapter = random_dit()
    rec = collect_noised_inputs(_sampler(adapter), _calib(), _dataset("digits"))
    x0, y = digit_images(4, 1_000_000, "class")
    abar = training_alphas_cumprod(adapter)
    assert len(abar) == 1000 and abar[0] > abar[-1]
    for r in range(len(rec["x"])):
        i, t = r // 4, int(rec["t"][r])
        eps = noise_for(int(rec["seed"][r]), t, x0.shape[1:])
        want = abar[t].sqrt() * x0[i].double() + (1 - abar[t]).sqrt() * eps.double()
        assert torch.allclose(rec["x"][r].double(), want, atol=1e-6)
        assert int(rec["y"][r]) == int(y[i])  # class model on digits: y = the digit
    # the clean images are real digits in [-1, 1], distinct
    assert x0.min() >= -1 and x0.max() <= 1 and len({tuple(v.flatten().tolist()) for v in x0}) == 4


def test_raw_0_19_noises_every_image_at_raw_timesteps_0_to_19():
    from ditq.calibration.noised import collect_noised_inputs

    rec = collect_noised_inputs(_sampler(random_dit()), _calib(num_samples=2, noise_timesteps="raw_0_19"),
                                _dataset("digits"))
    assert rec["t"].tolist() == list(range(19, -1, -1)) * 2 and rec["step"].tolist() == list(range(20)) * 2
    from ditq.calibration.noised import digit_images

    x0, _ = digit_images(2, 1_000_000, "class")
    # nearly clean images (the public code's reading): at t = 0 the record is the image up to ~1% noise
    assert (rec["x"][19] - x0[0]).abs().max() < 0.05
    assert (rec["x"][0] - x0[0]).abs().max() > (rec["x"][19] - x0[0]).abs().max()  # t = 19 is noisier


def test_sampler_mode_follows_calib_timesteps():
    from ditq.calibration.noised import collect_noised_inputs

    s = _sampler(random_dit(), steps=5)
    rec = collect_noised_inputs(s, _calib(num_samples=3, timesteps="uniform", num_timesteps=2), _dataset("digits"))
    ts = s.timesteps()
    assert rec["t"].tolist() == [ts[0], ts[-1]] * 3 and rec["step"].tolist() == [0, 4] * 3


def test_text_models_get_the_captions_prompt_index():
    from ditq.calibration.noised import digit_images
    from ditq.data.captions import CAPTION_DIGITS, DIGIT_CAPTIONS

    _, labels = digit_images(30, 7, "class")
    _, y = digit_images(30, 7, "text")
    assert all(0 <= int(i) < len(DIGIT_CAPTIONS) for i in y)
    assert [CAPTION_DIGITS[int(i)] for i in y] == labels.tolist()  # each caption names its image's digit
    assert len(set(y.tolist())) > 10  # templates vary


def _coco(tmp_path, n=3, size=(20, 12)):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    data = {"images": [], "annotations": []}
    for i in range(n):
        img_id = 100 + i
        Image.new("RGB", size, (40 * i, 255, 0)).save(images / f"{img_id:012d}.jpg")
        data["images"].append({"id": img_id, "file_name": f"{img_id:012d}.jpg"})
        data["annotations"].append({"image_id": img_id, "id": i, "caption": f"picture number {i}"})
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(data))
    return str(ann), str(images)


def test_coco_images_are_resized_cropped_and_indexed_into_the_caption_pool(tmp_path):
    from ditq.calibration.noised import coco_images
    from ditq.data.prompts import coco_caption_conditions

    ann, images = _coco(tmp_path)
    x, idx = coco_images(ann, images, 3, seed=0, resolution=8)
    assert x.shape == (3, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    pool = coco_caption_conditions(ann)
    for k, i in enumerate(idx.tolist()):
        # the caption names the image (red channel 40 * number)
        number = int(pool.pool[i].split()[-1])
        assert abs((x[k, 0].mean().item() + 1) * 127.5 - 40 * number) < 3


def test_coco_calibration_caption_indices_for_the_text_bank(tmp_path):
    from ditq.calibration.noised import calibration_condition_indices, coco_images

    ann, images = _coco(tmp_path)
    run = OmegaConf.create({"calib": {"source": "noised_data", "num_samples": 2, "seed_start": 9},
                            "dataset": {"kind": "coco_captions", "prompts": ann, "images": images}})
    assert calibration_condition_indices(run).tolist() == coco_images(ann, images, 2, 9, 8)[1].tolist()
    run.calib.source = "trajectories"
    assert calibration_condition_indices(run) is None


def test_latent_models_encode_with_the_vae_and_refuse_images_of_another_shape(tmp_path):
    from diffusers import AutoencoderKL

    from ditq.calibration.noised import _encode

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=8,
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",)).eval()
    adapter = SimpleNamespace(vae=vae, cfg=SimpleNamespace(vae_scale=0.5, name="toy"), latent_shape=(4, 8, 8))
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    a = _encode(adapter, img, [5, 6], 2)
    b = _encode(adapter, img[1:], [6], 1)
    assert a.shape == (2, 4, 8, 8) and torch.equal(a[1:], b)  # per image seed, not per batch
    with torch.no_grad():
        mean = vae.encode(img).latent_dist.mean * 0.5
    assert (a - mean).abs().mean() < (mean.abs().mean() + 1)  # a sample around the scaled mean
    pixel = SimpleNamespace(vae=None, cfg=SimpleNamespace(vae_scale=1.0, name="tiny"), latent_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\).*takes \(1, 8, 8\)"):
        _encode(pixel, img, [0, 1], 2)


@pytest.mark.parametrize("overrides, needle", [
    (["calib.source=noised"], "calib.source"),
    (["calib.source=noised_data", "calib.noise_timesteps=raw"], "calib.noise_timesteps"),
])
def test_bad_calibration_sources_fail_at_config_time(compose, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config(compose([*SHRINK, *T2I, *overrides]))


def test_coco_noised_calibration_needs_the_images_directory(compose, tmp_path):
    ann, _ = _coco(tmp_path)
    with pytest.raises(ConfigError, match="dataset.images"):
        validate_config(compose([*SHRINK, "model=tiny_pixart_digits", "dataset=coco_captions", "eval=t2i",
                                 f"dataset.prompts={ann}", "calib.source=noised_data"]))


def test_cache_key_includes_the_source(compose):
    from omegaconf import OmegaConf as OC

    a = validate_config(compose([*SHRINK, *T2I]))
    b = validate_config(compose([*SHRINK, *T2I, "calib.source=noised_data", "calib.noise_timesteps=raw_0_19"]))
    ca, cb = OC.to_container(a.calib, resolve=True), OC.to_container(b.calib, resolve=True)
    assert ca["source"] == "trajectories" and cb["source"] == "noised_data" and cb["noise_timesteps"] == "raw_0_19"
    assert ca != cb  # the pipeline keys the records with the whole calib config


def test_embedded_text_to_image_run_calibrates_on_noised_captioned_digits(compose, paths, tmp_path):
    from ditq.utils.cache import DiskCache  # noqa: F401  (the run writes its records there)
    from tests.helpers import run_pipeline

    row = run_pipeline(compose, [*T2I, *RANDOM_PIXART, *paths, "method=rtn", "bits=w8a8", "calib.source=noised_data",
                                 "calib.timesteps=all", "sampler.num_steps=2", "diagnostics.enabled=false",
                                 "calib.num_samples=4", "eval.num_samples=8", "eval.batch_size=8", "eval.grid_size=0",
                                 "eval.metrics=[fid_to_fp,psnr]"], tmp_path / "run")
    assert row["config"]["calib"]["source"] == "noised_data"
    assert row["metrics"]["psnr"] > 15
    entries = list((tmp_path / "cache").rglob("*calib_inputs*"))
    assert entries, "the noised records are cached under calib_inputs"
