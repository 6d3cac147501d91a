"""ADM-format `.npz` files: reference batches in, sample batches out.

Layout (guided-diffusion `evaluations/`):
  arr_0   N x H x W x 3 uint8 images (NHWC)            samples, and the reference's 10k images
  arr_1   N int labels (optional; class-conditional samples)
  mu, sigma       pool_3 statistics   (2048, 2048x2048)  reference batches only
  mu_s, sigma_s   spatial statistics  (2023, 2023x2023)  reference batches only
Inside ditq images are uint8 NCHW; the conversion happens here and nowhere else. Files written
here open in the TF evaluator (`python evaluator.py ref.npz samples.npz`).
"""
from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditq.metrics.errors import MetricInputError
from ditq.metrics.images import check_images, file_digest, to_rgb
from ditq.metrics.stats import Gaussian
from ditq.utils.atomic import atomic_write_bytes


@dataclass
class AdmBatch:
    path: Path
    sha256: str
    images: torch.Tensor | None  # uint8 NCHW (a view of the file's NHWC array)
    labels: torch.Tensor | None
    pool: Gaussian | None  # mu, sigma
    spatial: Gaussian | None  # mu_s, sigma_s


def _gaussian(data, mu_key: str, sigma_key: str, path: Path) -> Gaussian | None:
    has_mu, has_sigma = mu_key in data.files, sigma_key in data.files
    if not has_mu and not has_sigma:
        return None
    if has_mu != has_sigma:
        raise MetricInputError(f"ADM reference {path} has {mu_key if has_mu else sigma_key} "
                               f"but not {sigma_key if has_mu else mu_key}")
    mu, sigma = np.asarray(data[mu_key]), np.asarray(data[sigma_key])
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricInputError(f"ADM reference {path}: {mu_key} has shape {mu.shape} and {sigma_key} "
                               f"{sigma.shape}; expected (D,) and (D, D)")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise MetricInputError(f"ADM reference {path}: {mu_key}/{sigma_key} must be floating point")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricInputError(f"ADM reference {path}: {mu_key}/{sigma_key} contain NaN or inf")
    return Gaussian(mu.astype(np.float64), sigma.astype(np.float64), None)


def read_adm_npz(path: str | os.PathLike, load_images: bool = True) -> AdmBatch:
    """Read and validate an ADM `.npz` (reference batch or sample batch)."""
    path = Path(path)
    if not path.is_file():
        raise MetricInputError(f"ADM batch not found: {path}")
    if not zipfile.is_zipfile(path):
        raise MetricInputError(f"{path} is not an .npz file (not a zip archive)")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises several types on a malformed archive
        raise MetricInputError(f"{path} cannot be read as an .npz file: {err}") from err
    with data:
        if "arr_0" not in data.files and "mu" not in data.files:
            raise MetricInputError(f"ADM batch {path} has neither images (arr_0) nor statistics (mu, sigma); "
                                   f"it holds {sorted(data.files)}")
        pool = _gaussian(data, "mu", "sigma", path)
        spatial = _gaussian(data, "mu_s", "sigma_s", path)
        images = labels = None
        if "arr_0" in data.files and load_images:
            try:
                arr = data["arr_0"]
            except ValueError as err:
                raise MetricInputError(f"ADM batch {path}: arr_0 cannot be read: {err}") from err
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
                raise MetricInputError(f"ADM batch {path}: arr_0 must be uint8 N x H x W x 3, "
                                       f"got {arr.dtype} {arr.shape}")
            images = torch.from_numpy(arr).permute(0, 3, 1, 2)
            if "arr_1" in data.files:
                lab = np.asarray(data["arr_1"])
                if lab.shape != (arr.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
                    raise MetricInputError(f"ADM batch {path}: arr_1 must hold one integer label per image, "
                                           f"got {lab.dtype} {lab.shape}")
                labels = torch.from_numpy(lab.astype(np.int64))
    return AdmBatch(path, file_digest(path), images, labels, pool, spatial)


def _atomic_savez(path: Path, arrays: dict) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_adm_npz(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """Write samples (uint8 NCHW) as an ADM sample batch: arr_0 NHWC (+ arr_1 labels).
    Grey images are written as RGB (the TF evaluator reads 3 channels)."""
    check_images(images, "images")
    arrays = {"arr_0": to_rgb(images.detach().cpu()).permute(0, 2, 3, 1).contiguous().numpy()}
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (images.shape[0],):
            raise MetricInputError(f"labels must be one per image: {tuple(labels.shape)} for {images.shape[0]} images")
        arrays["arr_1"] = labels.detach().cpu().to(torch.int64).numpy()
    return _atomic_savez(Path(path), arrays)


def write_adm_reference(path: str | os.PathLike, images: torch.Tensor | None, pool: Gaussian | None,
                        spatial: Gaussian | None = None) -> Path:
    """Write a reference batch: images (arr_0) and/or precomputed statistics (mu, sigma, mu_s, sigma_s)."""
    arrays = {}
    if images is not None:
        check_images(images, "images")
        arrays["arr_0"] = to_rgb(images.detach().cpu()).permute(0, 2, 3, 1).contiguous().numpy()
    for g, mu_key, sigma_key in ((pool, "mu", "sigma"), (spatial, "mu_s", "sigma_s")):
        if g is not None:
            arrays[mu_key], arrays[sigma_key] = np.asarray(g.mu, np.float64), np.asarray(g.sigma, np.float64)
    if not arrays:
        raise MetricInputError("a reference batch needs images or statistics")
    return _atomic_savez(Path(path), arrays)
