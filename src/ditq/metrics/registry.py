"""The metric names an Evaluator accepts, and what each one needs."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    description: str
    needs_reference: bool = False  # real data (Reference)
    needs_fp: bool = False  # the FP model's images of the same seeds
    needs_prompts: bool = False
    needs_labels: bool = False
    outputs: tuple[str, ...] = ()  # outputs of the evaluator's feature net it uses
    feature_nets: tuple[str, ...] | None = None  # None: any
    min_samples: int = 1  # fewest generated samples it is defined for (precision/recall: see min_samples())


METRICS: dict[str, MetricInfo] = {
    "fid": MetricInfo("Frechet distance to the reference, pool features", needs_reference=True, outputs=("pool",),
                      min_samples=2),
    "sfid": MetricInfo("Frechet distance to the reference, spatial features (Inception mixed_6/conv[..., :7]; "
                       "digits: 7 channels of the classifier's second conv)",
                       needs_reference=True, outputs=("spatial",), feature_nets=("inception", "digits"), min_samples=2),
    "is": MetricInfo("Inception Score, consecutive splits", outputs=("logits",)),
    "precision": MetricInfo("fraction of samples inside the reference's k-NN manifold", needs_reference=True,
                            outputs=("pool",)),
    "recall": MetricInfo("fraction of reference points inside the samples' k-NN manifold", needs_reference=True,
                         outputs=("pool",)),
    "psnr": MetricInfo("PSNR against the FP model's images", needs_fp=True),
    "ssim": MetricInfo("SSIM against the FP model's images", needs_fp=True),
    "lpips": MetricInfo("LPIPS against the FP model's images (user-supplied weights)", needs_fp=True),
    "fid_to_fp": MetricInfo("Frechet distance to the FP model's images", needs_fp=True, outputs=("pool",),
                            min_samples=2),
    "cls_acc": MetricInfo("fraction classified as the requested class", needs_labels=True, outputs=("logits",),
                          feature_nets=("digits",)),
    "clip": MetricInfo("CLIP score against the prompts", needs_prompts=True),
    "image_reward": MetricInfo("ImageReward against the prompts", needs_prompts=True),
    "hpsv2": MetricInfo("HPSv2 against the prompts", needs_prompts=True),
}

T2I_METRICS = ("clip", "image_reward", "hpsv2")
PAIRED_METRICS = ("psnr", "ssim", "lpips", "fid_to_fp")


def available_metrics() -> list[str]:
    """Every metric name `Evaluator` accepts."""
    return sorted(METRICS)


def min_samples(metric: str, pr_k: int) -> int:
    """The fewest samples `metric` can be computed from: 2 for the Frechet distances (a covariance),
    more than k for precision/recall (k-NN manifolds of the evaluator option `pr_k`), else 1."""
    if metric in ("precision", "recall"):
        return pr_k + 1
    return METRICS[metric].min_samples
