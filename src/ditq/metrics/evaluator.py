"""The Evaluator the run pipeline calls: requested metrics in, a flat {name: value} dict out.

    ev = Evaluator(["fid", "sfid", "is", "precision", "recall"], feature_net="inception",
                   cache=DiskCache(root), options={"inception_path": ".../pt_inception-...pth"})
    ev.check(reference=ref, has_prompts=False, has_fp_images=False, has_labels=True)  # before sampling
    row = ev.evaluate(images, reference=ref, labels=labels)
    row_settings = ev.settings()

One pass of the feature net over the samples serves every metric that needs it (pool, spatial
and logits come together). Reference features and the FP model's sample features are cached,
keyed by what produced them (the reference's spec and pixel digest, or `fp_spec` and the FP
images' digest; the feature space's settings and weights digest), in `cache` (a `DiskCache`)
and in memory: a second method scored against the same reference computes neither again.
"""
from __future__ import annotations

import logging

import torch

from ditq.metrics.errors import MetricInputError
from ditq.metrics.features import FeatureSpace, build_feature_space
from ditq.metrics.fid_backends import build_fid_backend, frechet_between
from ditq.metrics.images import check_images, tensor_digest, to_rgb
from ditq.metrics.inception import POOL_DIM, SPATIAL_DIM
from ditq.metrics.inception_score import inception_score
from ditq.metrics.options import resolve_options
from ditq.metrics.paired import lpips_distance, psnr, ssim, ssim_window
from ditq.metrics.prec_recall import precision_recall
from ditq.metrics.reference import Reference
from ditq.metrics.registry import METRICS, PAIRED_METRICS, T2I_METRICS, available_metrics, min_samples
from ditq.metrics.t2i import build_scorer, scorer_options
from ditq.utils.cache import content_key

log = logging.getLogger(__name__)

REF_KIND = "metric_reference_features"
FP_KIND = "metric_fp_features"


class Evaluator:
    def __init__(self, metrics: list[str], feature_net: str = "inception", cache=None, batch_size: int = 250,
                 device: str = "cpu", options: dict | None = None):
        if isinstance(metrics, str) or not metrics:
            raise MetricInputError(f"metrics must be a non-empty list of names, got {metrics!r}")
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise MetricInputError(f"unknown metric(s) {unknown}; available: {available_metrics()}")
        if len(set(metrics)) != len(metrics):
            raise MetricInputError(f"metrics listed twice: {metrics}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise MetricInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.metrics = list(metrics)
        self.feature_net = feature_net
        self.cache = cache
        self.batch_size = batch_size
        self.device = device
        self.options = resolve_options(options)
        self.space: FeatureSpace = build_feature_space(feature_net, self.options, device)
        for m in self.metrics:
            nets = METRICS[m].feature_nets
            if nets is not None and feature_net not in nets:
                raise MetricInputError(f"metric {m!r} needs feature_net in {nets}, not {feature_net!r}")
        self.fid = None
        if "fid" in self.metrics or "fid_to_fp" in self.metrics:
            self.fid = build_fid_backend(self.options["fid_backend"], self.space, self.options, device)
        self._lpips = None
        self._ssim_window_used: int | None = None  # smaller than ssim_window for tiny images
        self._scorers: dict = {}
        self._memo: dict[tuple[str, str], dict] = {}
        self.counters = {"images_featurized": 0, "reference_builds": 0, "fp_builds": 0}

    # ------------------------------------------------------------------------------------
    # settings
    # ------------------------------------------------------------------------------------
    def _uses_primary(self) -> bool:
        uses = any(METRICS[m].outputs for m in self.metrics if m not in ("fid", "fid_to_fp"))
        return uses or (self.fid is not None and self.fid.space is self.space)

    def settings(self) -> dict:
        """Every pinned setting, for the result row (weights digests where the files exist)."""
        out: dict = {"metrics": list(self.metrics), "feature_net": self.feature_net, "batch_size": self.batch_size}
        if self._uses_primary():
            out["feature_space"] = {**self.space.settings(), "weights_sha256": _safe_id(self.space)}
        if self.fid is not None:
            out["fid"] = {**self.fid.settings(), "feature_space": self.fid.space.settings(),
                          "weights_sha256": _safe_id(self.fid.space)}
        if "sfid" in self.metrics:
            out["sfid"] = {"layer": "mixed_6/conv (Mixed_6d.branch1x1)", "channels": 7, "flatten": "HWC",
                           "dim": SPATIAL_DIM, "frechet_method": self.options["frechet_method"],
                           "frechet_eps": self.options["frechet_eps"]}
        if "is" in self.metrics:
            out["is"] = {"splits": "consecutive", "split_size": self.options["is_splits_size"],
                         "logits": "pool_3 @ W, no bias" if self.feature_net == "inception" else "digits head"}
        if "precision" in self.metrics or "recall" in self.metrics:
            out["prec_recall"] = {"k": self.options["pr_k"], "distance": "squared euclidean, float32"}
        if "psnr" in self.metrics:
            out["psnr"] = {"data_range": 255, "reduction": "MSE over all pixels of all pairs"}
        if "ssim" in self.metrics:
            out["ssim"] = {"window": self.options["ssim_window"], "window_used": self._ssim_window_used,
                           "sigma": self.options["ssim_sigma"],
                           "k1": 0.01, "k2": 0.03, "data_range": 255, "covariance": "population",
                           "padding": "valid"}
        if "lpips" in self.metrics:
            out["lpips"] = {"version": "0.1", "weights_file": _name(self.options["lpips_path"]),
                            "net": self._lpips.net_name if self._lpips is not None else "from file"}
        for m in T2I_METRICS:
            if m in self.metrics:
                scorer = self._scorers.get(m)
                out[m] = scorer.settings() if scorer is not None else scorer_options(m, self.options)
        return out

    # ------------------------------------------------------------------------------------
    # fail fast
    # ------------------------------------------------------------------------------------
    def min_samples(self) -> dict[str, int]:
        """The fewest samples each requested metric is defined for (with this evaluator's options)."""
        return {m: min_samples(m, self.options["pr_k"]) for m in self.metrics}

    def _count_problems(self, n: int, key: str) -> list[str]:
        short = {m: k for m, k in self.min_samples().items() if n < k}
        if not short:
            return []
        need = max(short.values())
        return [f"{key}={n} is too few: " + ", ".join(f"{m} needs >= {k}" for m, k in short.items())
                + f"; set {key} >= {need}"]

    def check(self, *, reference: Reference | None = None, has_prompts: bool = False, has_fp_images: bool = False,
              has_labels: bool = False, num_samples: int | None = None, samples_key: str = "num_samples") -> None:
        """Raise MetricInputError unless every requested metric has its inputs, weights and reference,
        and (given `num_samples`, named `samples_key` in the message) enough samples."""
        problems = [] if num_samples is None else self._count_problems(num_samples, samples_key)
        wants = {k: [m for m in self.metrics if getattr(METRICS[m], k)]
                 for k in ("needs_reference", "needs_fp", "needs_prompts", "needs_labels")}
        if wants["needs_reference"] and reference is None:
            problems.append(f"{wants['needs_reference']} need a reference (Reference.from_images or from_adm_npz)")
        if wants["needs_fp"] and not has_fp_images:
            problems.append(f"{wants['needs_fp']} need the FP model's images of the same seeds (fp_images)")
        if wants["needs_prompts"] and not has_prompts:
            problems.append(f"{wants['needs_prompts']} need prompts")
        if wants["needs_labels"] and not has_labels:
            problems.append(f"{wants['needs_labels']} need class labels")
        if reference is not None and wants["needs_reference"]:
            if not isinstance(reference, Reference):
                raise MetricInputError(f"reference must be a ditq.metrics.Reference, got {type(reference).__name__}")
            problems += self._reference_problems(reference)
        if problems:
            raise MetricInputError("cannot score: " + "; ".join(problems))
        self._load_networks()

    def _reference_problems(self, ref: Reference) -> list[str]:
        problems = []
        if ref.images is None:
            needs_images = [m for m in ("precision", "recall") if m in self.metrics]
            if "fid" in self.metrics and not self._fid_uses_file_stats(ref):
                needs_images.append("fid")
            if "sfid" in self.metrics and ref.spatial is None:
                needs_images.append("sfid")
            if needs_images:
                problems.append(f"{needs_images} need reference images, and the reference "
                                f"({ref.spec.get('name', ref.source)}) has none")
        else:
            try:
                for space in self._reference_spaces(ref):
                    space.check_images(ref.images, "reference images")
            except MetricInputError as err:
                problems.append(str(err))
        for g, dim, what in ((ref.pool, POOL_DIM, "mu/sigma"), (ref.spatial, SPATIAL_DIM, "mu_s/sigma_s")):
            if g is not None and self.feature_net == "inception" and g.dim != dim:
                problems.append(f"the reference's {what} are {g.dim}-d; the Inception port gives {dim}-d")
        return problems

    def _fid_uses_file_stats(self, ref: Reference) -> bool:
        return (self.fid is not None and self.fid.uses_file_stats and self.feature_net == "inception"
                and ref.pool is not None)

    def _reference_spaces(self, ref: Reference) -> list[FeatureSpace]:
        spaces = []
        if any(m in self.metrics for m in ("precision", "recall")) or \
                ("sfid" in self.metrics and ref.spatial is None):
            spaces.append(self.space)
        if "fid" in self.metrics and not self._fid_uses_file_stats(ref) and self.fid.space not in spaces:
            spaces.append(self.fid.space)
        return spaces

    def _load_networks(self) -> None:
        if self._uses_primary():
            self.space.load()
        if self.fid is not None:
            self.fid.space.load()
        if "lpips" in self.metrics and self._lpips is None:
            from ditq.metrics.lpips_net import load_lpips

            if self.options["lpips_path"] is None:
                raise MetricInputError("lpips needs its weights: options={'lpips_path': <state dict of lpips.LPIPS>} "
                                       "(see docs/metrics.md)")
            self._lpips = load_lpips(self.options["lpips_path"], self.device)
        for m in T2I_METRICS:
            if m in self.metrics and m not in self._scorers:
                self._scorers[m] = build_scorer(m, self.options, self.device)

    # ------------------------------------------------------------------------------------
    # caching
    # ------------------------------------------------------------------------------------
    def _cached(self, kind: str, spec: dict, build) -> dict:
        key = (kind, content_key(spec, length=32))
        if key in self._memo:
            return self._memo[key]
        payload = self.cache.get_or_create(kind, spec, build) if self.cache is not None else build()
        self._memo[key] = payload
        return payload

    def _extract(self, space: FeatureSpace, images: torch.Tensor, outputs: tuple[str, ...]) -> dict:
        feats = space.extract(images, self.batch_size, outputs)
        self.counters["images_featurized"] += int(images.shape[0])
        return feats

    def reference_features(self, ref: Reference, space: FeatureSpace) -> dict:
        """Pool (and spatial, where the space has it) features of the reference images, cached."""
        outputs = tuple(o for o in ("pool", "spatial") if o in space.outputs)
        spec = {"reference": ref.spec, "space": space.cache_id(), "outputs": list(outputs)}

        def build():
            self.counters["reference_builds"] += 1
            return self._extract(space, ref.images, outputs)

        return self._cached(REF_KIND, spec, build)

    def fp_features(self, fp_images: torch.Tensor, fp_spec: dict | None, space: FeatureSpace) -> dict:
        """Pool features of the FP model's images, cached by fp_spec and their pixel digest."""
        spec = {"fp_spec": fp_spec, "images_sha256": tensor_digest(fp_images), "space": space.cache_id(),
                "outputs": ["pool"]}

        def build():
            self.counters["fp_builds"] += 1
            return self._extract(space, fp_images, ("pool",))

        return self._cached(FP_KIND, spec, build)

    # ------------------------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------------------------
    def _validate(self, images, labels, prompts, fp_images) -> None:
        check_images(images, "images")
        n = images.shape[0]
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (n,):
                raise MetricInputError(f"labels must be one per image: got shape {tuple(labels.shape)} for {n} images")
        if prompts is not None:
            if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
                raise MetricInputError("prompts must be a list of strings")
            if len(prompts) != n:
                raise MetricInputError(f"{len(prompts)} prompts for {n} images: counts must match")
        if fp_images is not None:
            check_images(fp_images, "fp_images")
            if fp_images.shape != images.shape:
                raise MetricInputError(f"fp_images {tuple(fp_images.shape)} and images {tuple(images.shape)} differ: "
                                       "paired metrics need the FP model's images of the same seeds")
        if self._uses_primary():
            self.space.check_images(images, "images")
        if self.fid is not None:
            self.fid.space.check_images(images, "images")
        problems = self._count_problems(n, "the number of images")
        if problems:
            raise MetricInputError(problems[0])

    def evaluate(self, images: torch.Tensor, *, labels: torch.Tensor | None = None, prompts: list[str] | None = None,
                 reference: Reference | None = None, fp_images: torch.Tensor | None = None,
                 fp_spec: dict | None = None, groups: list[str] | None = None) -> dict[str, float]:
        """Score `images` (uint8 NCHW). FP-vs-itself paired metrics are skipped when images is fp_images.
        `groups` (one name per image, e.g. the HPSv2 benchmark's style of each prompt): the prompt
        metrics are also reported per group as "<metric>/<group>"."""
        if groups is not None and len(groups) != len(images):
            raise MetricInputError(f"{len(groups)} group names for {len(images)} images: counts must match")
        self._validate(images, labels, prompts, fp_images)
        self.check(reference=reference, has_prompts=prompts is not None, has_fp_images=fp_images is not None,
                   has_labels=labels is not None)
        same_as_fp = fp_images is not None and fp_images is images
        metrics = [m for m in self.metrics if not (same_as_fp and m in PAIRED_METRICS)]
        if len(metrics) < len(self.metrics):
            log.info("images are the FP images: skipping %s", [m for m in self.metrics if m not in metrics])

        outputs = []
        for m in metrics:
            if m in ("fid", "fid_to_fp") and self.fid.space is not self.space:
                continue
            outputs += [o for o in METRICS[m].outputs if o not in outputs]
        feats = self._extract(self.space, images, tuple(outputs)) if outputs else {}
        fid_feats = None
        if any(m in metrics for m in ("fid", "fid_to_fp")):
            fid_feats = feats["pool"] if self.fid.space is self.space else \
                self._extract(self.fid.space, images, ("pool",))["pool"]

        out: dict[str, float] = {}
        pr: tuple[float, float] | None = None
        for m in metrics:
            if m == "fid":
                ref = reference.pool if self._fid_uses_file_stats(reference) else \
                    self.reference_features(reference, self.fid.space)["pool"]
                out[m] = self.fid.distance(ref, fid_feats)
            elif m == "sfid":
                out[m] = self._sfid(reference, feats["spatial"])
            elif m == "is":
                out[m] = inception_score(feats["logits"], self.options["is_splits_size"])
            elif m in ("precision", "recall"):
                if pr is None:
                    ref_pool = self.reference_features(reference, self.space)["pool"]
                    pr = precision_recall(ref_pool, feats["pool"], self.options["pr_k"])
                out[m] = pr[0] if m == "precision" else pr[1]
            elif m == "cls_acc":
                out[m] = float((feats["logits"].argmax(1) == torch.as_tensor(labels).cpu()).double().mean())
            elif m == "fid_to_fp":
                fp = self.fp_features(fp_images, fp_spec, self.fid.space)["pool"]
                out[m] = self.fid.distance(fp, fid_feats)
            elif m == "psnr":
                out[m] = psnr(images, fp_images)
            elif m == "ssim":
                self._ssim_window_used = ssim_window(images.shape[2], images.shape[3], self.options["ssim_window"])
                out[m] = ssim(images, fp_images, self.options["ssim_window"], self.options["ssim_sigma"])
            elif m == "lpips":
                out[m] = lpips_distance(self._lpips, images, fp_images, device=self.device)
            elif m in T2I_METRICS:
                scores = torch.as_tensor(self._scorers[m].score(to_rgb(images), list(prompts),
                                                                batch_size=self.batch_size), dtype=torch.float64)
                out[m] = float(scores.mean())
                for g in dict.fromkeys(groups or ()):  # per group, in order of first appearance
                    out[f"{m}/{g}"] = float(scores[[i for i, name in enumerate(groups) if name == g]].mean())
        return out

    def _sfid(self, reference: Reference, spatial: torch.Tensor) -> float:
        ref = reference.spatial if reference.spatial is not None else \
            self.reference_features(reference, self.space)["spatial"]
        return frechet_between(ref, spatial, self.options["frechet_method"], self.options["frechet_eps"])


def _safe_id(space: FeatureSpace) -> str | None:
    try:
        return space.weights_id()
    except (MetricInputError, OSError):
        return None


def _name(path) -> str | None:
    return None if path is None else str(path).replace("\\", "/").rsplit("/", 1)[-1]

