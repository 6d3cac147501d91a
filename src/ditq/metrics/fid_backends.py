"""FID backends: which features, which statistics and which distance make "the" FID.

  ditq          features of the evaluator's feature net (the ADM-compatible Inception port, or
                the digits net); streaming float64 mean/covariance (`FeatureStats`); Frechet
                distance with `frechet_method` ("sqrtm", ADM's algorithm, by default). With an
                ADM reference batch its precomputed `mu`/`sigma` are used, as the ADM evaluator does.
  clean-fid     features of `CleanFidSpace` (clean-fid's resizer + TorchScript Inception);
                float64 mean and unbiased covariance, as clean-fid's `np.mean`/`np.cov`; the
                TTUR/ADM `sqrtm` Frechet distance that clean-fid's `frechet_distance` also uses
                (`cleanfid.fid` itself imports torchvision, so it is not called). Reference
                statistics always come from reference images.
  torchmetrics  features of `TorchmetricsSpace`; accumulation and distance by torchmetrics'
                own `FrechetInceptionDistance` (float64 sums, eigvals-based trace), fed the
                features through a pass-through module; float64 end to end. Reference
                statistics always come from reference images.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ditq.metrics.errors import MetricInputError
from ditq.metrics.features import CleanFidSpace, FeatureSpace, TorchmetricsSpace
from ditq.metrics.frechet import frechet_distance_from_features, frechet_distance_to_features
from ditq.metrics.stats import FeatureStats, Gaussian

FID_BACKENDS = ("ditq", "clean-fid", "torchmetrics")


def frechet_between(reference: torch.Tensor | Gaussian, samples: torch.Tensor, method: str, eps: float) -> float:
    """Frechet distance between reference (features or precomputed Gaussian) and sample features.
    method "eigh" with fewer samples than dimensions takes the exact low-rank routes."""
    dim = samples.shape[1]
    if method == "eigh" and samples.shape[0] < dim:
        if isinstance(reference, Gaussian):
            return frechet_distance_to_features(reference.mu, reference.sigma, samples.numpy())
        if reference.shape[0] + samples.shape[0] <= dim:
            return frechet_distance_from_features(reference.numpy(), samples.numpy())
    ref = reference if isinstance(reference, Gaussian) else FeatureStats.of(reference).gaussian()
    return ref.frechet_distance(FeatureStats.of(samples).gaussian(), method=method, eps=eps)


class FidBackend:
    name = "ditq"
    uses_file_stats = True  # can use an ADM reference batch's precomputed mu/sigma

    def __init__(self, space: FeatureSpace, method: str = "sqrtm", eps: float = 1e-6):
        self.space = space
        self.method = method
        self.eps = eps

    def distance(self, reference: torch.Tensor | Gaussian, samples: torch.Tensor) -> float:
        return frechet_between(reference, samples, self.method, self.eps)

    def settings(self) -> dict:
        return {"fid_backend": self.name, "fid_statistics": "float64 streaming mean/cov (ddof=1)",
                "frechet_method": self.method, "frechet_eps": self.eps}


class CleanFidBackend(FidBackend):
    name = "clean-fid"
    uses_file_stats = False

    def __init__(self, space: CleanFidSpace):
        super().__init__(space, method="sqrtm", eps=1e-6)

    def settings(self) -> dict:
        return {"fid_backend": self.name, "fid_statistics": "float64 mean/cov (ddof=1), as clean-fid",
                "frechet_method": "sqrtm (clean-fid/TTUR algorithm)", "frechet_eps": self.eps,
                "clean_fid_mode": self.space.mode}


class _PassThrough(nn.Module):
    """Hands precomputed features to torchmetrics' FID as if it were its feature extractor."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TorchmetricsBackend(FidBackend):
    name = "torchmetrics"
    uses_file_stats = False

    def __init__(self, space: TorchmetricsSpace, batch_size: int = 1000):
        super().__init__(space)
        self.batch_size = batch_size

    def distance(self, reference, samples: torch.Tensor) -> float:
        if isinstance(reference, Gaussian):
            raise MetricInputError("the torchmetrics FID backend computes reference statistics from images, "
                                   "not from precomputed mu/sigma")
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except Exception as err:  # noqa: BLE001 - a broken torch-fidelity install raises on import
            raise MetricInputError(
                f"fid_backend='torchmetrics' cannot import torchmetrics' FID ({type(err).__name__}: {err}). "
                "If torch-fidelity is installed without torchvision, uninstall it: "
                "pip uninstall torch-fidelity") from err
        if reference.shape[1] != samples.shape[1]:
            raise MetricInputError(f"feature dimensions differ: {reference.shape[1]} vs {samples.shape[1]}")
        fid = FrechetInceptionDistance(feature=_PassThrough(samples.shape[1]), reset_real_features=False,
                                       normalize=False)
        for feats, real in ((reference, True), (samples, False)):
            for start in range(0, feats.shape[0], self.batch_size):
                fid.update(feats[start:start + self.batch_size].to(torch.float64), real=real)
        return float(fid.compute())

    def settings(self) -> dict:
        import torchmetrics

        return {"fid_backend": self.name, "torchmetrics_version": torchmetrics.__version__,
                "fid_statistics": "torchmetrics FrechetInceptionDistance (float64 sums)",
                "frechet_method": "torchmetrics eigvals", "torchmetrics_antialias": self.space.antialias}


def build_fid_backend(name: str, primary: FeatureSpace, options: dict, device: str = "cpu") -> FidBackend:
    if name == "ditq":
        return FidBackend(primary, method=options["frechet_method"], eps=options["frechet_eps"])
    if primary.name != "inception":
        raise MetricInputError(f"fid_backend={name!r} works with feature_net='inception' only, not {primary.name!r}")
    if name == "clean-fid":
        return CleanFidBackend(CleanFidSpace(options.get("clean_fid_inception_path"),
                                             mode=options["clean_fid_mode"], device=device))
    if name == "torchmetrics":
        return TorchmetricsBackend(TorchmetricsSpace(options.get("inception_path"),
                                                     antialias=bool(options["torchmetrics_antialias"]), device=device))
    raise MetricInputError(f"unknown fid_backend {name!r}; choose one of {FID_BACKENDS}")
