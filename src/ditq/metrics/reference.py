"""What a run is scored against: real images (with a name for caching), or an ADM reference batch."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditq.metrics.adm import read_adm_npz
from ditq.metrics.errors import MetricInputError
from ditq.metrics.images import check_images, tensor_digest
from ditq.metrics.stats import Gaussian


@dataclass
class Reference:
    spec: dict  # identity for cache keys: what the user named plus a content digest
    images: torch.Tensor | None = None  # uint8 NCHW
    labels: torch.Tensor | None = None
    pool: Gaussian | None = None  # precomputed Inception pool_3 statistics (ADM mu, sigma)
    spatial: Gaussian | None = None  # precomputed spatial statistics (ADM mu_s, sigma_s)
    source: str = "images"
    path: Path | None = field(default=None, repr=False)

    @classmethod
    def from_images(cls, images: torch.Tensor, spec: dict, labels: torch.Tensor | None = None) -> Reference:
        """Real images (uint8 NCHW). `spec` names them (dataset, split, count, ...) in cache keys;
        a digest of the pixels is added, so changed images never hit a stale cache entry."""
        check_images(images, "reference images", min_count=2)
        if not isinstance(spec, dict) or not spec:
            raise MetricInputError("Reference.from_images needs a non-empty spec dict naming the images "
                                   "(e.g. {'dataset': 'digits', 'split': 'all', 'count': 1797})")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (images.shape[0],):
                raise MetricInputError(f"reference labels must be one per image: {tuple(labels.shape)} "
                                       f"for {images.shape[0]} images")
        full = {"kind": "images", **spec, "num_images": int(images.shape[0]),
                "image_shape": list(images.shape[1:]), "sha256": tensor_digest(images)}
        return cls(full, images, labels)

    @classmethod
    def from_adm_npz(cls, path: str | os.PathLike) -> Reference:
        """An ADM reference batch (`VIRTUAL_imagenet256_labeled.npz` and the like); validated here."""
        batch = read_adm_npz(path)
        if batch.images is not None and batch.images.shape[0] < 2:
            raise MetricInputError(f"ADM reference {path} holds {batch.images.shape[0]} image(s); at least 2 needed")
        spec = {"kind": "adm_npz", "name": Path(path).name, "sha256": batch.sha256,
                "num_images": None if batch.images is None else int(batch.images.shape[0])}
        return cls(spec, batch.images, batch.labels, batch.pool, batch.spatial, "adm_npz", Path(path))

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])
