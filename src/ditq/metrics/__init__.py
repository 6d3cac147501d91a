"""Image-quality metrics: the ADM suite (FID, sFID, IS, Precision/Recall) on a PyTorch port of the
2015 TF Inception graph, alternative FID backends (clean-fid, torchmetrics), paired metrics
against the FP model (PSNR, SSIM, LPIPS, FID-to-FP), text-to-image scorers, and the `Evaluator`
the run pipeline calls. Definitions and pinned settings: docs/metrics.md.
"""
from ditq.metrics.adm import read_adm_npz, write_adm_npz, write_adm_reference
from ditq.metrics.errors import MetricInputError
from ditq.metrics.evaluator import Evaluator
from ditq.metrics.frechet import frechet_distance
from ditq.metrics.inception_score import inception_score
from ditq.metrics.paired import psnr, ssim
from ditq.metrics.prec_recall import precision_recall
from ditq.metrics.reference import Reference
from ditq.metrics.registry import available_metrics
from ditq.metrics.stats import FeatureStats, Gaussian

__all__ = [
    "Evaluator",
    "FeatureStats",
    "Gaussian",
    "MetricInputError",
    "Reference",
    "available_metrics",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "psnr",
    "read_adm_npz",
    "ssim",
    "write_adm_npz",
    "write_adm_reference",
]
