"""PSNR, SSIM (against scikit-image) and LPIPS (against the lpips package, via a fixture)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d
from skimage.metrics import structural_similarity

from ditq.metrics import MetricInputError, psnr, ssim
from ditq.metrics.lpips_net import LPIPS, load_lpips, random_lpips_state_dict
from ditq.metrics.paired import lpips_distance, ssim_per_image


def test_psnr_hand_computed():
    a = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    b = a.clone()
    b[0] += 10  # MSE over both images: (100 + 0) / 2 = 50
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 50), rel=1e-12)
    assert psnr(a, a) == math.inf


def test_ssim_matches_scikit_image(make_images):
    a = make_images(3, size=40, seed=1)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(2)) * 20
    b = (a.float() + noise).clamp(0, 255).to(torch.uint8)
    ours = ssim_per_image(a, b)
    for i in range(3):
        ref = structural_similarity(a[i].numpy(), b[i].numpy(), data_range=255, channel_axis=0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-10)
    assert ssim(a, b) == pytest.approx(float(ours.mean()))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def reference_ssim_small(x: np.ndarray, y: np.ndarray, win: int, sigma: float = 1.5) -> float:
    """SSIM with a truncated Gaussian window of `win` taps, valid region, numpy/scipy only."""
    t = np.arange(win) - (win - 1) / 2
    g = np.exp(-t**2 / (2 * sigma**2))
    g /= g.sum()
    pad = (win - 1) // 2

    def filt(img):
        out = correlate1d(correlate1d(img, g, axis=0, mode="constant"), g, axis=1, mode="constant")
        return out[pad:img.shape[0] - pad, pad:img.shape[1] - pad]

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def test_ssim_on_digit_sized_images_uses_a_7_tap_window(digits):
    images, _ = digits
    a, b = images[:5], images[5:10]
    ours = ssim_per_image(a, b)
    for i in range(5):
        assert float(ours[i]) == pytest.approx(reference_ssim_small(a[i, 0].numpy(), b[i, 0].numpy(), 7), abs=1e-12)


def test_paired_shapes_must_agree():
    a = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(MetricInputError, match="same shape"):
        psnr(a, a[:1])
    with pytest.raises(MetricInputError, match="uint8"):
        ssim(a.float(), a.float())


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory, oracle_meta):
    """Each backbone's random state dict saved as the lpips module saves it (heads listed twice)."""
    root = tmp_path_factory.mktemp("lpips")
    paths = {}
    for net in ("alex", "vgg"):
        state = random_lpips_state_dict(net, oracle_meta["seed"])
        aliased = {**state, **{f"lins.{k[3]}.{k.split('.', 1)[1]}": v for k, v in state.items() if k.startswith("lin")}}
        assert sorted(aliased) == oracle_meta["lpips"][net]["keys"]
        paths[net] = root / f"lpips_{net}.pth"
        torch.save(aliased, paths[net])
    return paths


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_the_lpips_package(net, lpips_files, lpips_fixture):
    model = load_lpips(lpips_files[net])
    assert model.net_name == net
    a = torch.from_numpy(lpips_fixture["pairs_a"])
    b = torch.from_numpy(lpips_fixture["pairs_b"])
    with torch.no_grad():
        d = model(a.float() / 127.5 - 1, b.float() / 127.5 - 1)
    np.testing.assert_allclose(d.numpy(), lpips_fixture[f"lpips_{net}"], rtol=1e-5, atol=1e-7)
    expected_mean = float(lpips_fixture[f"lpips_{net}"].mean())
    assert lpips_distance(model, a, b, batch_size=3) == pytest.approx(expected_mean, rel=1e-5)
    assert lpips_distance(model, a, a) == pytest.approx(0.0, abs=1e-7)


def test_lpips_bad_weights_and_sizes(tmp_path, lpips_files):
    heads_only = {k: v for k, v in random_lpips_state_dict("alex").items() if k.startswith("lin")}
    torch.save(heads_only, tmp_path / "alex_heads.pth")
    with pytest.raises(MetricInputError, match="only the linear heads"):
        load_lpips(tmp_path / "alex_heads.pth")
    broken = random_lpips_state_dict("alex")
    broken["lin2.model.1.weight"] = torch.zeros(1, 7, 1, 1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(MetricInputError, match="lin2.model.1.weight"):
        load_lpips(tmp_path / "broken.pth")
    model = load_lpips(lpips_files["alex"])
    tiny = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(MetricInputError, match="at least 32x32"):
        lpips_distance(model, tiny, tiny)
    assert isinstance(LPIPS("vgg").net.slice5, torch.nn.Sequential)
