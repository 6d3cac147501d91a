"""ADM .npz round trips and the errors for missing or malformed files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ditq.metrics import Gaussian, MetricInputError, Reference, read_adm_npz, write_adm_npz, write_adm_reference


def test_sample_batch_round_trip_is_nhwc(tmp_path, make_images):
    images = make_images(5, size=16, seed=3)
    labels = torch.tensor([3, 1, 4, 1, 5])
    path = write_adm_npz(tmp_path / "samples", images, labels)
    assert path.name == "samples.npz"
    with np.load(path) as raw:  # what the TF evaluator reads
        assert sorted(raw.files) == ["arr_0", "arr_1"]
        assert raw["arr_0"].shape == (5, 16, 16, 3) and raw["arr_0"].dtype == np.uint8
        assert raw["arr_0"][2, 7, 9, 1] == images[2, 1, 7, 9]
        assert raw["arr_1"].tolist() == [3, 1, 4, 1, 5]
    back = read_adm_npz(path)
    assert torch.equal(back.images, images) and torch.equal(back.labels, labels)
    assert back.pool is None and back.spatial is None and len(back.sha256) == 64


def test_reference_batch_round_trip(tmp_path, make_images):
    rng = np.random.default_rng(0)
    pool = Gaussian(rng.standard_normal(6), np.eye(6) * 2.0)
    spatial = Gaussian(rng.standard_normal(4), np.eye(4))
    images = make_images(4, size=8, seed=1)
    path = write_adm_reference(tmp_path / "ref.npz", images, pool, spatial)
    with np.load(path) as raw:
        assert sorted(raw.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    ref = Reference.from_adm_npz(path)
    assert ref.source == "adm_npz" and ref.spec["kind"] == "adm_npz" and ref.spec["num_images"] == 4
    np.testing.assert_array_equal(ref.pool.mu, pool.mu)
    np.testing.assert_array_equal(ref.spatial.sigma, spatial.sigma)
    assert torch.equal(ref.images, images)
    stats_only = write_adm_reference(tmp_path / "stats_only.npz", None, pool)
    assert Reference.from_adm_npz(stats_only).images is None


def test_grey_samples_are_written_as_rgb(tmp_path, digits):
    images = digits[0][:3]
    back = read_adm_npz(write_adm_npz(tmp_path / "grey.npz", images))
    assert back.images.shape == (3, 3, 8, 8)
    assert torch.equal(back.images[:, 2], images[:, 0])


def _savez(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize("arrays, message", [
    ({"arr_1": np.zeros(3)}, "neither images"),
    ({"mu": np.zeros(4)}, "has mu but not sigma"),
    ({"mu": np.zeros(4), "sigma": np.eye(3)}, r"expected \(D,\) and \(D, D\)"),
    ({"mu": np.array([0.0, np.nan]), "sigma": np.eye(2)}, "NaN"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "must be uint8"),
    ({"arr_0": np.zeros((2, 3, 8, 8), np.uint8)}, "N x H x W x 3"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8), "arr_1": np.zeros(5, np.int64)}, "one integer label per image"),
    ({"arr_0": np.array([None, 1], dtype=object)}, "cannot be read"),
])
def test_malformed_files_are_clear_errors(tmp_path, arrays, message):
    path = _savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(MetricInputError, match=message):
        Reference.from_adm_npz(path)


def test_missing_and_non_npz_files(tmp_path):
    with pytest.raises(MetricInputError, match="not found"):
        Reference.from_adm_npz(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(MetricInputError, match="not an .npz"):
        Reference.from_adm_npz(tmp_path / "text.npz")
    one = _savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(MetricInputError, match="at least 2"):
        Reference.from_adm_npz(one)


def test_writer_refuses_bad_images(tmp_path):
    with pytest.raises(MetricInputError, match="uint8"):
        write_adm_npz(tmp_path / "x.npz", torch.zeros(2, 3, 8, 8))
    with pytest.raises(MetricInputError, match="one per image"):
        write_adm_npz(tmp_path / "x.npz", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3))
    assert not (tmp_path / "x.npz").exists()
