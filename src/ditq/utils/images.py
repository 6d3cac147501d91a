"""Image grids."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from ditq.utils.atomic import atomic_write_bytes


def image_grid(images: torch.Tensor, nrow: int | None = None, upscale: int = 1, pad: int = 1) -> np.ndarray:
    """uint8 NCHW -> one HxWxC uint8 array (nearest-neighbour upscaled, 1-pixel padding)."""
    n, c, h, w = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    imgs = images.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    h, w = h * upscale, w * upscale
    grid = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = imgs[i]
    return grid.permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    from PIL import Image

    arr = image_grid(images, nrow=nrow, upscale=upscale)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
