"""CLIP score of image-prompt pairs, torchmetrics' definition, with a configurable CLIP model.

Definition (the formula torchmetrics documents for `CLIPScore`; Hessel et al. 2021 with weight 100):
    score_i = 100 * max(cos(E_img(image_i), E_txt(prompt_i)), 0),   reported value = mean_i score_i.
`ClipScorer.score` returns the per-pair values; average them for the reported number.
torchmetrics' code clamps after averaging instead, max(mean_i 100 cos_i, 0): the two agree
whenever no pair has a negative cosine (usual for real CLIP models); `ClipScorer.similarity`
returns the unclamped 100 cos_i for that variant. The model
id is part of `settings()` and must be recorded with every number: ViT-B/32 and ViT-L/14 give
different scales (torchmetrics defaults to ViT-L/14, the FP4DiT lineage used ViT-B/32).

Model: any transformers `CLIPModel` checkpoint (a Hub id such as `openai/clip-vit-base-patch32`
or `openai/clip-vit-large-patch14`, taken from the local Hub cache or downloaded when online, or
a local directory holding config.json, the weights, the tokenizer files and
preprocessor_config.json). Preprocessing follows the checkpoint's preprocessor_config.json with
transformers' CLIPImageProcessor semantics: PIL bicubic resize of the shorter side, center crop
(offset floored), /255, mean/std. Prompts are tokenized by the checkpoint's CLIPTokenizer and cut
to the model's context (77) keeping the end token, as OpenAI's `clip.tokenize(truncate=True)`
does (torchmetrics instead drops everything after position 77, end token included).
"""
from __future__ import annotations

import logging

import torch

from .t2i_common import (
    normalize,
    pil_resize_crop,
    read_json_file,
    resolve_file,
    score_in_batches,
    to_unit_float,
)

log = logging.getLogger(__name__)

DEFINITION = "CLIP score: per pair 100*max(cos(image_emb, text_emb), 0) (clamp per pair), reported as the mean over pairs"
_BICUBIC = 3  # PIL.Image.BICUBIC, as stored in preprocessor_config.json


def _square(value, what: str) -> int:
    """A size from preprocessor_config.json: int, {"shortest_edge": n} or {"height": n, "width": n}."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise ValueError(f"unsupported {what} in preprocessor_config.json: {value!r} (expected a square size)")


def read_clip_preprocessing(path) -> dict:
    """The image settings of a CLIP checkpoint's preprocessor_config.json."""
    cfg = read_json_file(path, what="CLIP preprocessor config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if not cfg.get("do_resize", True) or not cfg.get("do_center_crop", True) or not cfg.get("do_normalize", True):
        raise ValueError(f"{path}: only resize + center crop + normalize pipelines are supported")
    if cfg.get("resample", _BICUBIC) != _BICUBIC:
        raise ValueError(f"{path}: only bicubic resampling (resample=3) is supported; got {cfg.get('resample')}")
    return {
        "resize_shorter_side": _square(cfg.get("size", 224), "size"),
        "center_crop": _square(cfg.get("crop_size", 224), "crop_size"),
        "crop_offset": "floor",
        "resample": "PIL bicubic",
        "mean": [float(v) for v in cfg["image_mean"]],
        "std": [float(v) for v in cfg["image_std"]],
    }


class ClipScorer:
    """CLIP score (see module docstring) with a transformers CLIP checkpoint."""

    def __init__(self, model: str = "openai/clip-vit-base-patch32", device: str = "cpu", *,
                 dtype: torch.dtype = torch.float32):
        from transformers import CLIPModel, CLIPTokenizer

        self.model_id = str(model)
        self.device = torch.device(device)
        self.dtype = dtype
        self.preprocessing = read_clip_preprocessing(
            resolve_file(model, "preprocessor_config.json", what=f"CLIP model {model}", setting="model",
                         hub_repo="openai/clip-vit-base-patch32")
        )
        try:
            net, info = CLIPModel.from_pretrained(self.model_id, output_loading_info=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(self.model_id)
        except OSError as exc:
            raise FileNotFoundError(
                f"CLIP model {self.model_id!r}: cannot load config, weights or tokenizer files ({exc}). Pass a Hub id "
                "present in the local Hub cache (e.g. openai/clip-vit-base-patch32, openai/clip-vit-large-patch14; "
                "download by hand from https://huggingface.co/openai/clip-vit-base-patch32/tree/main) or a local "
                "directory with config.json, model.safetensors or pytorch_model.bin, vocab.json, merges.txt and "
                "preprocessor_config.json as `model`."
            ) from exc
        except RuntimeError as exc:  # shape mismatch between checkpoint and config
            raise ValueError(f"CLIP model {self.model_id!r}: checkpoint does not match its config: {exc}") from exc
        if info.get("missing_keys") or info.get("mismatched_keys"):
            raise ValueError(
                f"CLIP model {self.model_id!r}: checkpoint does not match the CLIP architecture: "
                f"missing {sorted(info.get('missing_keys', []))[:5]}, mismatched {list(info.get('mismatched_keys', []))[:5]}"
            )
        if info.get("unexpected_keys"):
            log.warning("CLIP model %s: ignoring unexpected checkpoint keys %s", self.model_id,
                        sorted(info["unexpected_keys"])[:5])
        self.model = net.to(self.device, dtype).eval()
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def settings(self) -> dict:
        return {
            "metric": "clip_score",
            "model": self.model_id,
            "definition": DEFINITION,
            "preprocessing": dict(self.preprocessing),
            "tokenizer": {"type": "CLIPTokenizer (checkpoint's)", "max_length": self.max_length,
                          "truncation": "keep end token"},
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        p = self.preprocessing
        crops = pil_resize_crop(images, p["resize_shorter_side"], p["center_crop"], p["crop_offset"])
        return normalize(to_unit_float(crops), p["mean"], p["std"])

    @torch.no_grad()
    def embed(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm image and text embeddings of one batch."""
        pixels = self._pixels(images).to(self.device, self.dtype)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        img = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        txt = self.model.text_projection(
            self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        )
        return img / img.norm(p=2, dim=-1, keepdim=True), txt / txt.norm(p=2, dim=-1, keepdim=True)

    def similarity(self, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
        """uint8 [N,3,H,W] + N prompts -> float64 [N]: 100 * cos per pair, not clamped."""
        def batch(img, txt):
            i, t = self.embed(img, txt)
            return 100 * (i * t).sum(dim=-1)

        return score_in_batches(images, prompts, batch_size, batch)

    def score(self, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
        """uint8 [N,3,H,W] + N prompts -> float64 [N]: 100 * max(cos, 0) per pair."""
        return self.similarity(images, prompts, batch_size).clamp(min=0)
