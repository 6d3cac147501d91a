"""Build a reference batch (.npz, `arr_0` = uint8 NHWC images, ADM's layout) from real images.

    python -m ditq.data.reference_npz --source <dir> --resolution 32 --out data/cifar10_train_32.npz

The unconditional U-Net datasets (CIFAR-10, LSUN Bedroom / Church, CelebA-HQ) have no published
reference batch in ADM's format; FID, sFID, IS and precision/recall read one made here. `--source` is
either CIFAR-10's python release (`cifar-10-batches-py/` with data_batch_1..5: the 50k training
images, as DDPM's and Q-Diffusion's FID) or a directory of image files (LSUN exported from its LMDB,
CelebA-HQ at 256), read in sorted name order, centre-cropped to a square and resized with bicubic
filtering (ADM's evaluation preprocessing) to `--resolution`. `--max` keeps the first N. The file is
written atomically.
"""
from __future__ import annotations

import argparse
import io
import pickle
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def cifar10_images(root: Path) -> np.ndarray:
    """The 50k CIFAR-10 training images, uint8 NHWC, in the release's order."""
    files = [root / f"data_batch_{i}" for i in range(1, 6)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not CIFAR-10's python release: {', '.join(missing)} missing "
                                "(download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
                                "and extract it)")
    parts = []
    for f in files:
        with open(f, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        parts.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(parts)


def folder_images(root: Path, resolution: int, limit: int | None) -> np.ndarray:
    """Every image file under `root` (sorted), centre-cropped and resized to resolution, uint8 NHWC."""
    from PIL import Image

    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        paths = paths[:limit]
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    out = np.empty((len(paths), resolution, resolution, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
            out[i] = np.asarray(im)
    return out


def build(source: str | Path, resolution: int, limit: int | None = None) -> np.ndarray:
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"--source {root} is not a directory (CIFAR-10's cifar-10-batches-py/ or a folder of images)")
    if (root / "data_batch_1").is_file():
        images = cifar10_images(root)
        if resolution != 32:
            raise ValueError(f"CIFAR-10 images are 32x32; --resolution {resolution} would resample them")
        return images[:limit] if limit else images
    return folder_images(root, resolution, limit)


def write_npz(path: str | Path, images: np.ndarray) -> None:
    from ditq.utils.atomic import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, arr_0=images)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max", type=int, default=None)
    a = p.parse_args(argv)
    images = build(a.source, a.resolution, a.max)
    write_npz(a.out, images)
    print(f"wrote {a.out}: {images.shape[0]} images, {images.shape[1]}x{images.shape[2]}")


if __name__ == "__main__":
    main()
