"""Unconditional models' data: reference batches built from real images, the digits sFID space,
and the config checks that pair an unconditional model with its dataset and metrics."""
import pickle

import numpy as np
import pytest
import torch

from ditq.config.schema import ConfigError
from ditq.data.reference_npz import build, main, write_npz


def _cifar_release(root, n_per_batch=3):
    root.mkdir()
    rng = np.random.default_rng(0)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        batches.append(data)
        with open(root / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": data, b"labels": [0] * n_per_batch}, fh)
    return batches


def test_cifar_release_to_nhwc_in_order(tmp_path):
    batches = _cifar_release(tmp_path / "cifar-10-batches-py")
    images = build(tmp_path / "cifar-10-batches-py", 32)
    assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8
    first = batches[0][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(images[0], first)
    assert np.array_equal(images[3], batches[1][0].reshape(3, 32, 32).transpose(1, 2, 0))
    with pytest.raises(ValueError, match="32x32"):
        build(tmp_path / "cifar-10-batches-py", 64)


def test_incomplete_cifar_release_names_the_missing_files(tmp_path):
    _cifar_release(tmp_path / "c")
    (tmp_path / "c" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        build(tmp_path / "c", 32)


def test_folder_centre_crop_resize_and_atomic_npz(tmp_path):
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 255  # the centre square is white, the sides black
    Image.fromarray(wide).save(src / "b.png")
    Image.fromarray(np.full((16, 16, 3), 7, dtype=np.uint8)).save(src / "a.png")
    out = tmp_path / "ref.npz"
    main(["--source", str(src), "--resolution", "8", "--out", str(out)])
    arr = np.load(out)["arr_0"]
    assert arr.shape == (2, 8, 8, 3)
    assert (arr[0] == 7).all()  # sorted names: a.png first
    assert arr[1].min() > 240  # the crop kept the white centre only
    from ditq.metrics.reference import Reference

    assert Reference.from_adm_npz(out).num_images == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        build(tmp_path / "empty", 8)


def test_write_npz_leaves_no_partial_file(tmp_path, monkeypatch):
    import ditq.utils.atomic as atomic

    target = tmp_path / "ref.npz"
    write_npz(target, np.zeros((2, 4, 4, 3), dtype=np.uint8))
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        write_npz(target, np.ones((3, 4, 4, 3), dtype=np.uint8))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]


def test_digits_space_has_spatial_features_for_sfid():
    from ditq.data.digits import real_digits_uint8
    from ditq.metrics.features import DigitsSpace

    images, _ = real_digits_uint8()
    out = DigitsSpace().load().extract(images[:10], outputs=("pool", "spatial", "logits"))
    assert out["pool"].shape == (10, 64) and out["spatial"].shape == (10, 7 * 64) and out["logits"].shape == (10, 10)
    again = DigitsSpace().load().extract(images[:10], outputs=("pool",))
    assert torch.equal(again["pool"], out["pool"])  # the FID space is unchanged by the extra output


def test_sfid_and_is_on_the_digits_space(tmp_path):
    from ditq.data.digits import real_digits_uint8
    from ditq.metrics import Evaluator

    images, _ = real_digits_uint8()
    from ditq.pipeline import build_reference
    from omegaconf import OmegaConf

    ref = build_reference(OmegaConf.create({"kind": "digits", "reference": None}))
    ev = Evaluator(["fid", "sfid", "is"], feature_net="digits")
    real = ev.evaluate(images[:600], reference=ref)
    noise = ev.evaluate(torch.randint(0, 256, (600, 1, 8, 8), dtype=torch.uint8), reference=ref)
    assert real["sfid"] < noise["sfid"] and real["fid"] < noise["fid"]
    assert real["is"] > noise["is"]


@pytest.mark.parametrize("overrides,match", [
    (["eval=digits"], "cls_acc"),
    (["dataset=digits_captions", "eval=digits_t2i"], "prompt dataset"),
    (["sampler.cfg_scale=1.5"], "guidance|cfg"),
])
def test_unconditional_model_refuses_labels_prompts_and_guidance(compose, overrides, match):
    from ditq.config import validate_config

    base = ["model=tiny_unet_digits", "eval=digits_uncond", "sampler=ddim25_uncond"]
    validate_config(compose(base))
    with pytest.raises(ConfigError, match=match):
        validate_config(compose(base + overrides))
