"""Evaluator options: the known keys, their defaults, and validation (unknown keys are errors)."""
from __future__ import annotations

from ditq.metrics.errors import MetricInputError
from ditq.metrics.features import CLEAN_FID_MODES
from ditq.metrics.fid_backends import FID_BACKENDS
from ditq.metrics.frechet import METHODS

DEFAULT_OPTIONS: dict = {
    # FID backend and its pinned settings
    "fid_backend": "ditq",  # "ditq" | "clean-fid" | "torchmetrics"
    "inception_path": None,  # pytorch-fid pt_inception-2015-12-05-6726825d.pth (else $DITQ_INCEPTION_WEIGHTS)
    "clean_fid_inception_path": None,  # clean-fid's TorchScript inception-2015-12-05.pt (file or its folder)
    "clean_fid_mode": "clean",  # "clean" | "legacy_tensorflow"
    "torchmetrics_antialias": False,  # torchmetrics' resize antialias; pinned explicitly (its default changed)
    "frechet_method": "sqrtm",  # "sqrtm" (ADM's algorithm) | "eigh"
    "frechet_eps": 1e-6,  # ADM's regulariser when sqrtm(S1 S2) is not finite
    # other feature networks
    "digits_path": None,  # digits classifier weights (default: the shipped asset)
    # ADM suite
    "is_splits_size": 5000,  # consecutive splits, as ADM
    "pr_k": 3,  # k of the k-NN manifolds
    # paired metrics
    "lpips_path": None,  # state dict of lpips.LPIPS(net=...) (backbone + heads)
    "ssim_window": 11,
    "ssim_sigma": 1.5,
    # text-to-image scorers
    "clip_model": "openai/clip-vit-base-patch32",
    "image_reward_path": None,  # ImageReward.pt, a directory holding it, or a hub id (THUDM/ImageReward)
    "image_reward_med_config": None,  # BLIP's med_config.json (default: next to the checkpoint / hub)
    "image_reward_tokenizer": None,  # bert-base-uncased tokenizer dir or hub id
    "hps_path": None,  # HPS_v2(.1)_compressed.pt, a directory holding it, or a hub id (xswu/HPSv2)
    "hps_tokenizer": None,  # open_clip ViT-H-14 BPE dir or hub id
    "hps_version": "v2.1",  # "v2.0" | "v2.1": not comparable with each other
}

_CHOICES = {
    "fid_backend": FID_BACKENDS,
    "clean_fid_mode": CLEAN_FID_MODES,
    "frechet_method": METHODS,
    "hps_version": ("v2.0", "v2.1"),
}
_POSITIVE_INTS = ("is_splits_size", "pr_k", "ssim_window")
_POSITIVE_FLOATS = ("frechet_eps", "ssim_sigma")


def resolve_options(options: dict | None) -> dict:
    """Defaults overlaid with `options`; raises MetricInputError on unknown keys or bad values."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise MetricInputError(f"unknown evaluator option(s) {unknown}; known: {sorted(DEFAULT_OPTIONS)}")
    out = {**DEFAULT_OPTIONS, **options}
    for key, choices in _CHOICES.items():
        if out[key] not in choices:
            raise MetricInputError(f"option {key}={out[key]!r} is not one of {choices}")
    for key in _POSITIVE_INTS:
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise MetricInputError(f"option {key} must be a positive integer, got {out[key]!r}")
    for key in _POSITIVE_FLOATS:
        if isinstance(out[key], bool) or not isinstance(out[key], (int, float)) or out[key] <= 0:
            raise MetricInputError(f"option {key} must be a positive number, got {out[key]!r}")
    if not isinstance(out["torchmetrics_antialias"], bool):
        raise MetricInputError("option torchmetrics_antialias must be True or False, "
                               f"got {out['torchmetrics_antialias']!r}")
    return out
