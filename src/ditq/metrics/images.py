"""Checks and small conversions for the image convention every metric takes.

Images are uint8 torch tensors, NCHW, with C in {1, 3}; values are the full 0..255 range, so
the dtype is the range check (float images in [-1, 1] or [0, 1] are refused, with a hint).
"""
from __future__ import annotations

import hashlib

import torch

from ditq.metrics.errors import MetricInputError


def check_images(images, name: str = "images", *, min_count: int = 1, channels: tuple[int, ...] = (1, 3),
                 size: tuple[int, int] | None = None, min_side: int | None = None) -> torch.Tensor:
    """Validate `images` (uint8 NCHW) and return it; raise MetricInputError naming what is wrong."""
    if not isinstance(images, torch.Tensor):
        raise MetricInputError(f"{name} must be a torch.Tensor (uint8, NCHW), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        hint = ""
        if images.is_floating_point():
            hint = (" Float images are ambiguous ([-1, 1] or [0, 1]); convert them explicitly, e.g. "
                    "ditq.data.digits.to_uint8(x) for [-1, 1].")
        raise MetricInputError(f"{name} must have dtype torch.uint8 (values 0..255), got {images.dtype}.{hint}")
    if images.dim() != 4:
        raise MetricInputError(f"{name} must be 4-d NCHW, got shape {tuple(images.shape)}")
    if images.shape[1] not in channels:
        hint = " (NHWC given? ADM .npz arrays are NHWC: use ditq.metrics.adm.read_adm_npz)" \
            if images.shape[-1] in (1, 3) else ""
        raise MetricInputError(f"{name} must have {' or '.join(map(str, channels))} channels in dim 1, "
                               f"got shape {tuple(images.shape)}{hint}")
    if images.shape[0] < min_count:
        raise MetricInputError(f"{name} holds {images.shape[0]} images; at least {min_count} needed")
    if size is not None and tuple(images.shape[2:]) != tuple(size):
        raise MetricInputError(f"{name} must be {size[0]}x{size[1]} pixels, got {tuple(images.shape[2:])}")
    if min_side is not None and min(images.shape[2:]) < min_side:
        raise MetricInputError(f"{name} must be at least {min_side}x{min_side} pixels, got {tuple(images.shape[2:])}")
    return images


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey (C=1) -> RGB by repeating the channel; RGB passes through."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def tensor_digest(x: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: a content key for cached features."""
    h = hashlib.sha256()
    h.update(f"{x.dtype}|{tuple(x.shape)}|".encode())
    data = x.detach().cpu().contiguous().reshape(-1)
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    step = 1 << 26  # hash in 64 MiB slices: no full copy of a large image tensor
    for start in range(0, data.numel(), step):
        h.update(memoryview(data[start:start + step].numpy()))
    return h.hexdigest()


def file_digest(path) -> str:
    """sha256 of a file's whole content, remembered by path, size and times (ditq.utils.filehash)."""
    from ditq.utils.filehash import file_sha256

    return file_sha256(path)
