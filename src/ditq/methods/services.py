"""Pipeline pieces a step may call (`QuantContext.services`): generate images with the model as it
is now, the FP model's images of the same seeds (cached), and score images with the run's feature
space. A search step uses them to measure candidates the way the run measures its final model.

Images depend only on their seeds (`ditq.sampling.seeds`), so a candidate's images and the FP
model's images of the same seeds compare image by image (`fid_to_fp`, `psnr`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf


@dataclass
class RunServices:
    adapter: Any
    run: Any
    qlayers: dict
    cache: Any  # ditq.utils.cache.DiskCache
    model_fp: dict
    device: str
    progress: bool = True
    _evaluators: dict = field(default_factory=dict)
    _reference: Any = None

    # -- sampling
    def sampler(self, cfg_scale: float | None = None, num_steps: int | None = None):
        """The run's sampler, or a copy with another guidance scale / step count. A scale <= 1 means
        no guidance (DiT's scripts: `--cfg-scale 0` samples without guidance)."""
        from ditq.sampling import Sampler

        cfg = copy.deepcopy(self.run.sampler)
        if cfg_scale is not None or num_steps is not None:
            cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            if cfg_scale is not None:
                cfg.cfg_scale = max(float(cfg_scale), 1.0)
            if num_steps is not None:
                cfg.num_steps = int(num_steps)
        return Sampler(self.adapter, cfg, clip_sample=self.run.model.clip_sample)

    def labels(self, seeds: list[int]) -> torch.Tensor:
        """Condition indices of `seeds` (class labels / prompt indices; ditq.conditioning)."""
        return self.adapter.conditions.for_seeds(seeds, self.run.eval.labels)

    def generate(self, seeds: list[int], sampler=None, desc: str = "candidate") -> torch.Tensor:
        """uint8 NCHW images of `seeds` from the model as it is now (quantized layers included); not cached."""
        from ditq.pipeline import sample_images

        sampler = sampler or self.sampler()
        return sample_images(self.adapter, sampler, seeds, self.labels(seeds), cache=None, spec=None,
                             desc=desc, progress=self.progress)

    def fp_images(self, seeds: list[int], sampler=None) -> tuple[torch.Tensor, dict]:
        """(images, spec) of the FP model for `seeds`: sampled with every quantized layer in full
        precision and cached under the same key as the pipeline's FP samples."""
        from ditq.methods.wrap import full_precision
        from ditq.pipeline import fp_samples_spec, sample_images

        sampler = sampler or self.sampler()
        spec = fp_samples_spec(self.run, self.model_fp, sampler.cfg)  # the run's sampler: the pipeline's entries
        with full_precision(self.qlayers):
            images = sample_images(self.adapter, sampler, seeds, self.labels(seeds), cache=self.cache, spec=spec,
                                   desc="FP samples (search seeds)", progress=self.progress)
        return images, spec

    # -- scoring
    def reference(self):
        if self._reference is None:
            from ditq.pipeline import build_reference

            self._reference = build_reference(self.run.dataset)
        return self._reference

    def evaluator(self, metrics: tuple[str, ...]):
        if metrics not in self._evaluators:
            from ditq.metrics import Evaluator

            self._evaluators[metrics] = Evaluator(list(metrics), feature_net=self.run.eval.feature_net,
                                                  cache=self.cache, batch_size=self.run.eval.batch_size,
                                                  device=self.device, options=dict(self.run.eval.options))
        return self._evaluators[metrics]

    def score(self, images: torch.Tensor, seeds: list[int], metrics: tuple[str, ...], fp: tuple | None = None) -> dict:
        """{metric: value} of `images` (of `seeds`); paired metrics need `fp` = fp_images(seeds)."""
        fp_images, fp_spec = fp if fp is not None else (None, None)
        needs_ref = any(m in ("fid", "sfid", "precision", "recall", "is") for m in metrics)
        y = self.labels(seeds)
        conditions = self.adapter.conditions
        return self.evaluator(tuple(metrics)).evaluate(
            images, labels=conditions.labels(y), prompts=conditions.prompts(y),
            reference=self.reference() if needs_ref else None, fp_images=fp_images, fp_spec=fp_spec)
