"""Paired metrics between quantized and full-precision samples of the same seeds.

  psnr   10 log10(255^2 / MSE), the MSE taken over all pixels of all pairs (torchmetrics'
         default reduction; a per-image mean would be infinite as soon as one pair is identical,
         which uint8 outputs of a mildly quantized model often are). inf when all pairs agree.
  ssim   Wang et al. 2004: Gaussian window 11 (sigma 1.5, truncated at 3.5 sigma), K1=0.01,
         K2=0.03, L=255, population (co)variances, computed per channel over the valid region
         (no padding), averaged over pixels, channels, then images. Equals scikit-image's
         `structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
         data_range=255)`. Images smaller than the window use the largest odd window that fits
         (7 for 8x8 digits), same sigma; the window used is recorded.
  lpips  mean LPIPS distance over pairs, inputs mapped to [-1, 1] (see `lpips_net`).
All in float64 except LPIPS (float32 network).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ditq.metrics.errors import MetricInputError
from ditq.metrics.images import check_images, to_rgb

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def check_pairs(images: torch.Tensor, reference: torch.Tensor) -> None:
    check_images(images, "images")
    check_images(reference, "fp_images")
    if images.shape != reference.shape:
        raise MetricInputError(f"paired metrics need images and fp_images of the same shape (same seeds), "
                               f"got {tuple(images.shape)} and {tuple(reference.shape)}")


def psnr(images: torch.Tensor, reference: torch.Tensor, batch_size: int = 256) -> float:
    check_pairs(images, reference)
    sq, count = 0.0, 0
    for s in range(0, images.shape[0], batch_size):
        d = images[s:s + batch_size].to(torch.float64) - reference[s:s + batch_size].to(torch.float64)
        sq += float((d * d).sum())
        count += d.numel()
    mse = sq / count
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ssim_window(height: int, width: int, window: int = SSIM_WINDOW) -> int:
    w = min(window, height, width)
    return w if w % 2 == 1 else w - 1


def _gaussian_taps(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _filter(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    k = taps.numel()
    x = F.conv2d(x, taps.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, taps.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim_per_image(images: torch.Tensor, reference: torch.Tensor, window: int = SSIM_WINDOW,
                   sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """SSIM of each pair, float64 [N]."""
    check_pairs(images, reference)
    win = ssim_window(images.shape[2], images.shape[3], window)
    if win < 3:
        raise MetricInputError(f"SSIM needs images of at least 3x3 pixels, got {tuple(images.shape[2:])}")
    taps = _gaussian_taps(win, sigma)
    x = images.to(torch.float64)
    y = reference.to(torch.float64)
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    mx, my = _filter(x, taps), _filter(y, taps)
    vx = _filter(x * x, taps) - mx * mx
    vy = _filter(y * y, taps) - my * my
    cxy = _filter(x * y, taps) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def ssim(images: torch.Tensor, reference: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
         batch_size: int = 256) -> float:
    parts = [ssim_per_image(images[s:s + batch_size], reference[s:s + batch_size], window, sigma)
             for s in range(0, images.shape[0], batch_size)]
    return float(torch.cat(parts).mean())


def lpips_distance(net, images: torch.Tensor, reference: torch.Tensor, batch_size: int = 64,
                   device: str = "cpu") -> float:
    """Mean LPIPS over pairs; `net` from `lpips_net.load_lpips`."""
    check_pairs(images, reference)
    if min(images.shape[2:]) < net.min_side():
        raise MetricInputError(f"LPIPS ({net.net_name}) needs images of at least {net.min_side()}x{net.min_side()} "
                               f"pixels, got {tuple(images.shape[2:])}")
    total = 0.0
    with torch.inference_mode():
        for s in range(0, images.shape[0], batch_size):
            a = to_rgb(images[s:s + batch_size]).to(device, torch.float32) / 127.5 - 1
            b = to_rgb(reference[s:s + batch_size]).to(device, torch.float32) / 127.5 - 1
            total += float(net(a, b).double().sum())
    return total / images.shape[0]
