"""HPSv2 (Wu et al. 2023), v2.0 and v2.1, on transformers' CLIPModel, plus its benchmark protocol.

Upstream (tgxs002/HPSv2, package `hpsv2` 1.2.0), what this module reproduces:
  * model: open_clip ViT-H-14 (vision 32 x 1280, head width 80, patch 14, 224 px; text 24 x 1024,
    16 heads, context 77; embedding 1024; exact GELU, LayerNorm eps 1e-5, class-token pooling),
    weights from `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` (`{"state_dict": ...}` in
    open_clip's key layout), converted to transformers' CLIPModel layout at load time;
  * image: the transform `hpsv2` builds (`light_augmentation=True` -> open_clip's
    `ResizeMaxSize`): ToTensor first, then a bicubic antialiased resize of the float tensor so
    that the *longer* side is 224, zero padding to 224 x 224 (black bars, not a crop), OpenAI
    CLIP mean/std;
  * prompt: OpenAI CLIP BPE with open_clip's cleaning, context 77, zero padding;
  * score: cosine of the normalised image and text embeddings. `HPSv2Scorer.score` returns it
    as `hpsv2.score` does (about 0.2-0.35); the benchmark protocol reports 100x that, as
    `hpsv2.evaluate` does. v2.0 and v2.1 numbers are not comparable.

Benchmark protocol (`hpsv2_benchmark`): 4 styles (anime, concept-art, paintings, photo) x 800
prompts from the user's prompt files `<prompt_dir>/<style>.json`; per style the mean over
consecutive chunks of 80 of the per-chunk mean (and the std of the chunk means); overall the
mean over all images.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import torch

from .t2i_common import (
    CLIP_MEAN,
    CLIP_STD,
    ClipBPETokenizer,
    check_batch_size,
    check_images,
    check_prompts,
    check_state_dict,
    load_state_dict_file,
    normalize,
    read_json_file,
    resolve_file,
    score_in_batches,
    sha256_file,
    tensor_resize_longest_pad,
    to_unit_float,
)

HUB_REPO = "xswu/HPSv2"
VERSION_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
TOKENIZER_HUB_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
BPE_GZ = "bpe_simple_vocab_16e6.txt.gz"
ARCH_FILE = "open_clip_config.json"  # next to a checkpoint: its architecture, when `arch` is not given
# open_clip's model_configs/ViT-H-14.json (what HPSv2 builds), mlp_ratio made explicit.
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24, "mlp_ratio": 4.0},
}


# ---------------------------------------------------------------------------------------------
# Architecture: open_clip config -> transformers CLIPConfig, open_clip keys -> CLIPModel keys
# ---------------------------------------------------------------------------------------------
def merge_arch(arch: dict | None) -> dict:
    """VIT_H_14 updated by `arch` (open_clip model-config layout); unknown settings are refused."""
    out = {"embed_dim": VIT_H_14["embed_dim"], "vision_cfg": dict(VIT_H_14["vision_cfg"]),
           "text_cfg": dict(VIT_H_14["text_cfg"])}
    for key, value in (arch or {}).items():
        if key == "embed_dim":
            out[key] = int(value)
        elif key in ("vision_cfg", "text_cfg"):
            unknown = set(value) - set(out[key])
            if unknown:
                raise ValueError(f"unsupported open_clip {key} settings {sorted(unknown)}; supported: {sorted(out[key])}")
            out[key].update(value)
        else:
            raise ValueError(f"unsupported open_clip model setting {key!r}; supported: embed_dim, vision_cfg, text_cfg")
    if out["vision_cfg"]["width"] % out["vision_cfg"]["head_width"]:
        raise ValueError("vision width must be a multiple of head_width")
    return out


def clip_config(arch: dict):
    from transformers import CLIPConfig

    v, t = arch["vision_cfg"], arch["text_cfg"]
    return CLIPConfig(
        projection_dim=arch["embed_dim"],
        vision_config=dict(
            hidden_size=v["width"], intermediate_size=int(v["width"] * v["mlp_ratio"]), num_hidden_layers=v["layers"],
            num_attention_heads=v["width"] // v["head_width"], image_size=v["image_size"], patch_size=v["patch_size"],
            hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=arch["embed_dim"],
        ),
        text_config=dict(
            vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=int(t["width"] * t["mlp_ratio"]),
            num_hidden_layers=t["layers"], num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
            hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=arch["embed_dim"],
            # open_clip pools at argmax(ids) = the end token, the largest id; transformers pools at the first eos id.
            pad_token_id=0, bos_token_id=t["vocab_size"] - 2, eos_token_id=t["vocab_size"] - 1,
        ),
    )


def open_clip_shapes(arch: dict) -> dict[str, tuple[int, ...]]:
    """Every key of an open_clip `CLIP` state dict (ViT vision tower, built-in text tower) and its shape."""
    v, t, e = arch["vision_cfg"], arch["text_cfg"], arch["embed_dim"]
    grid = v["image_size"] // v["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "logit_scale": (),
        "positional_embedding": (t["context_length"], t["width"]),
        "text_projection": (t["width"], e),
        "token_embedding.weight": (t["vocab_size"], t["width"]),
        "ln_final.weight": (t["width"],), "ln_final.bias": (t["width"],),
        "visual.class_embedding": (v["width"],),
        "visual.positional_embedding": (grid * grid + 1, v["width"]),
        "visual.proj": (v["width"], e),
        "visual.conv1.weight": (v["width"], 3, v["patch_size"], v["patch_size"]),
        "visual.ln_pre.weight": (v["width"],), "visual.ln_pre.bias": (v["width"],),
        "visual.ln_post.weight": (v["width"],), "visual.ln_post.bias": (v["width"],),
    }
    for prefix, cfg in (("visual.transformer", v), ("transformer", t)):
        w, m = cfg["width"], int(cfg["width"] * cfg["mlp_ratio"])
        for i in range(cfg["layers"]):
            b = f"{prefix}.resblocks.{i}"
            shapes.update({
                f"{b}.ln_1.weight": (w,), f"{b}.ln_1.bias": (w,), f"{b}.ln_2.weight": (w,), f"{b}.ln_2.bias": (w,),
                f"{b}.attn.in_proj_weight": (3 * w, w), f"{b}.attn.in_proj_bias": (3 * w,),
                f"{b}.attn.out_proj.weight": (w, w), f"{b}.attn.out_proj.bias": (w,),
                f"{b}.mlp.c_fc.weight": (m, w), f"{b}.mlp.c_fc.bias": (m,),
                f"{b}.mlp.c_proj.weight": (w, m), f"{b}.mlp.c_proj.bias": (w,),
            })
    return shapes


_DIRECT = {
    "logit_scale": "logit_scale",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = re.compile(r"(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip CLIP state dict to transformers' CLIPModel layout.

    nn.MultiheadAttention's packed `in_proj_weight`/`in_proj_bias` (rows q, k, v) become
    q_proj/k_proj/v_proj; the `x @ proj` projections become Linear weights (transposed).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _DIRECT:
            out[_DIRECT[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        else:
            m = _BLOCK.fullmatch(key)
            if m is None:
                raise KeyError(f"unknown open_clip key {key}")
            tower = "vision_model" if m.group(1) == "visual.transformer" else "text_model"
            base, part = f"{tower}.encoder.layers.{m.group(2)}", m.group(3)
            if part.startswith("attn.in_proj_"):
                kind = part.rsplit("_", 1)[1]  # weight | bias
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}.self_attn.{name}.{kind}"] = chunk.contiguous()
            else:
                module, kind = part.rsplit(".", 1)
                if module not in _BLOCK_PARTS:
                    raise KeyError(f"unknown open_clip key {key}")
                out[f"{base}.{_BLOCK_PARTS[module]}.{kind}"] = value
    return out


def build_hps_model(arch: dict, state: dict[str, torch.Tensor], path) -> torch.nn.Module:
    """transformers CLIPModel for `arch` holding the open_clip weights `state` (checked first)."""
    from transformers import CLIPModel

    check_state_dict(state, open_clip_shapes(arch), what="HPSv2", path=path)
    model = CLIPModel(clip_config(arch))
    result = model.load_state_dict(open_clip_to_transformers(state), strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if leftover or result.unexpected_keys:  # a gap in the key conversion, not a user error
        raise RuntimeError(f"HPSv2 conversion incomplete: missing {leftover[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model


def read_arch_file(path: str | os.PathLike) -> dict:
    """The `model_cfg` of an open_clip hub config (`open_clip_config.json`) next to a checkpoint: how a
    model other than ViT-H-14 (e.g. ditq's embedded tiny CLIP) gives its architecture."""
    cfg = read_json_file(path, what="open_clip model config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise ValueError(f"open_clip model config {path}: expected a JSON object with a 'model_cfg' object")
    try:
        return merge_arch(cfg["model_cfg"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"open_clip model config {path}: {exc} (remove the file to use HPSv2's ViT-H-14)") from exc


def load_bpe_tokenizer(source: str | os.PathLike, context_length: int) -> ClipBPETokenizer:
    """`bpe_simple_vocab_16e6.txt.gz`, a Hub-style `merges.txt` (vocab.json beside it is checked),
    a directory holding either, or a Hub repo id (its merges.txt)."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        candidates = [path / BPE_GZ, path / "merges.txt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"HPSv2 tokenizer: directory {path} has neither {BPE_GZ} nor merges.txt. Get {BPE_GZ} from the "
                f"open_clip_torch wheel (open_clip/{BPE_GZ}) or merges.txt from "
                f"https://huggingface.co/{TOKENIZER_HUB_REPO}/blob/main/merges.txt and pass it as `tokenizer`."
            )
        path = found
    elif not path.is_file():
        path = resolve_file(source, "merges.txt", what="HPSv2 tokenizer (CLIP BPE merges)", setting="tokenizer",
                            hub_repo=TOKENIZER_HUB_REPO)
    path = path.resolve()
    tokenizer = ClipBPETokenizer(path, context_length=context_length)
    if path.name == "merges.txt" and (path.parent / "vocab.json").is_file():
        tokenizer.check_hub_vocab(path.parent / "vocab.json")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------
class HPSv2Scorer:
    """HPSv2 scores (cosine, as `hpsv2.score`) of image-prompt pairs."""

    def __init__(self, path: str = HUB_REPO, version: str = "v2.1", device: str = "cpu", *,
                 tokenizer: str = TOKENIZER_HUB_REPO, arch: dict | None = None, dtype: torch.dtype = torch.float32):
        if version not in VERSION_FILES:
            raise ValueError(f"HPSv2 version must be one of {sorted(VERSION_FILES)}; got {version!r}")
        self.version = version
        self.device = torch.device(device)
        self.dtype = dtype
        ckpt = resolve_file(path, VERSION_FILES[version], what=f"HPSv2 {version} checkpoint", setting="path",
                            hub_repo=HUB_REPO)
        if ckpt.name != VERSION_FILES[version] and ckpt.name in VERSION_FILES.values():
            raise ValueError(f"{ckpt} is the checkpoint of another HPSv2 version than {version}")
        arch_file = ckpt.parent / ARCH_FILE if arch is None and (ckpt.parent / ARCH_FILE).is_file() else None
        self.arch = merge_arch(read_arch_file(arch_file) if arch_file else arch)
        self.tokenizer = load_bpe_tokenizer(tokenizer, self.arch["text_cfg"]["context_length"])
        if self.tokenizer.vocab_size != self.arch["text_cfg"]["vocab_size"]:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} ids but the model expects "
                             f"{self.arch['text_cfg']['vocab_size']}: use OpenAI CLIP's BPE file")
        state = load_state_dict_file(ckpt, what=f"HPSv2 {version} checkpoint", nested_key="state_dict")
        model = build_hps_model(self.arch, state, ckpt)
        del state
        self.model = model.to(self.device, dtype).eval()
        self.files = {"checkpoint": str(ckpt), "checkpoint_sha256": sha256_file(ckpt),
                      "tokenizer": self.tokenizer.merges_path}
        if arch_file:
            self.files["arch_file"] = str(arch_file)

    def settings(self) -> dict:
        size = self.arch["vision_cfg"]["image_size"]
        return {
            "metric": "hpsv2",
            "version": self.version,
            **self.files,
            "arch": self.arch,
            "definition": ("HPSv2: cos(image_emb, text_emb) of the fine-tuned open_clip ViT-H-14 (hpsv2.score); "
                           "benchmark protocol reports 100x") if "arch_file" not in self.files else
                          (f"HPSv2's code path (cos(image_emb, text_emb)) with the open_clip model of "
                           f"{self.files['arch_file']}, not HPSv2's weights: it measures what that model was trained for"),
            "preprocessing": {"resize_longer_side": size, "zero_pad_to": size, "resample":
                              "torch bicubic antialias on [0,1] float (open_clip ResizeMaxSize)",
                              "mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
            "tokenizer": {"type": "OpenAI CLIP BPE, open_clip cleaning", "context_length": self.tokenizer.context_length},
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    @torch.no_grad()
    def embed(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.arch["vision_cfg"]["image_size"]
        pixels = normalize(tensor_resize_longest_pad(to_unit_float(images), size))
        ids = self.tokenizer(prompts).to(self.device)
        img = self.model.visual_projection(self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output)
        txt = self.model.text_projection(self.model.text_model(input_ids=ids).pooler_output)
        return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
        """uint8 [N,3,H,W] + N prompts -> float64 [N] HPSv2 scores (cosine, not x100)."""
        def batch(img, txt):
            i, t = self.embed(img, txt)
            return (i * t).sum(dim=-1)

        return score_in_batches(images, prompts, batch_size, batch)


# ---------------------------------------------------------------------------------------------
# Benchmark protocol
# ---------------------------------------------------------------------------------------------
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
PROMPTS_PER_STYLE = 800
CHUNK = 80
BENCHMARK_SCALE = 100.0
PROMPTS_URL = "https://huggingface.co/datasets/zhwang/HPDv2/tree/main/benchmark"

# images for one style: a uint8 [N,3,H,W] tensor, or produced on demand
Generator = Callable[[list, str, int], torch.Tensor]  # (prompts, style, index of the first prompt) -> uint8 images
ImagesArg = Union[Mapping[str, torch.Tensor], Generator, str, os.PathLike]


def load_benchmark_prompts(prompt_dir: str | os.PathLike, styles: Sequence[str] = HPS_STYLES,
                           prompts_per_style: int = PROMPTS_PER_STYLE) -> dict[str, list[str]]:
    """`<prompt_dir>/<style>.json`, each a JSON list of `prompts_per_style` strings."""
    prompt_dir = Path(prompt_dir)
    out = {}
    for style in styles:
        path = prompt_dir / f"{style}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"HPSv2 benchmark prompts: {path} is missing. Download {', '.join(s + '.json' for s in HPS_STYLES)} "
                f"from {PROMPTS_URL} into one directory and pass it as `prompt_dir`."
            )
        prompts = read_json_file(path, what="HPSv2 benchmark prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"HPSv2 benchmark prompts: {path} must hold a JSON list of strings")
        if len(prompts) != prompts_per_style:
            raise ValueError(f"HPSv2 benchmark prompts: {path} has {len(prompts)} prompts; the protocol "
                             f"uses {prompts_per_style} per style")
        out[style] = prompts
    return out


def protocol_average(scores: Mapping[str, Sequence[float]], chunk: int = CHUNK) -> dict:
    """Upstream's aggregation: per style, mean and std (ddof 0) of consecutive `chunk` means;
    overall, the mean over all images of all styles."""
    styles = {}
    for style, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"scores of style {style!r} must be a non-empty 1-d sequence")
        chunk_means = np.array([values[i:i + chunk].mean() for i in range(0, values.size, chunk)])
        styles[style] = {"mean": float(chunk_means.mean()), "chunk_std": float(chunk_means.std()),
                         "n": int(values.size)}
    everything = np.concatenate([np.asarray(v, dtype=np.float64) for v in scores.values()])
    return {"styles": styles, "overall": float(everything.mean())}


def _image_file(folder: Path, index: int) -> Path:
    for ext in (".jpg", ".png", ".jpeg", ".webp"):
        candidate = folder / f"{index:05d}{ext}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"HPSv2 benchmark: no image {index:05d}.jpg/.png in {folder} (one image per prompt)")


def _read_images(paths: Sequence[Path]) -> list[torch.Tensor]:
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous())
    return out


def _check_inputs(images: ImagesArg, styles: Sequence[str], prompts: Mapping[str, list[str]]) -> None:
    """Everything that can be checked before scoring: tensors and their counts, image files."""
    for style in styles:
        if isinstance(images, Mapping):
            if style not in images:
                raise KeyError(f"HPSv2 benchmark: no images for style {style!r}")
            check_prompts(prompts[style], check_images(images[style]).shape[0])
        elif not callable(images):
            for i in range(len(prompts[style])):
                _image_file(Path(images) / style, i)


def _score_style(scorer: HPSv2Scorer, images: ImagesArg, style: str, prompts: list[str], batch_size: int) -> list[float]:
    if isinstance(images, Mapping):
        return scorer.score(images[style], prompts, batch_size).tolist()
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        if callable(images):
            batches = [images(chunk, style, start)]
        else:
            loaded = _read_images([_image_file(Path(images) / style, start + i) for i in range(len(chunk))])
            same_size = len({tuple(b.shape) for b in loaded}) == 1
            batches = [torch.stack(loaded)] if same_size else [b.unsqueeze(0) for b in loaded]
        offset = 0
        for batch in batches:
            n = check_images(batch).shape[0]
            scores.extend(scorer.score(batch, chunk[offset:offset + n], batch_size).tolist())
            offset += n
        if offset != len(chunk):
            raise ValueError(f"HPSv2 benchmark: {offset} images for {len(chunk)} prompts of style {style!r}")
    return scores


def hpsv2_benchmark(scorer: HPSv2Scorer, images: ImagesArg, prompt_dir: str | os.PathLike, *,
                    styles: Sequence[str] = HPS_STYLES, prompts_per_style: int = PROMPTS_PER_STYLE,
                    chunk: int = CHUNK, batch_size: int = 20) -> dict:
    """The HPSv2 benchmark: per-style and overall averages of 100 x HPSv2 over the prompt files.

    `images` is one of
      * a dict style -> uint8 [prompts_per_style, 3, H, W] tensor, image i for prompt i;
      * a callable `(prompts, style, first_index) -> uint8 [len(prompts), 3, H, W]`, called on
        consecutive slices of `batch_size` prompts (first_index lets a generator seed image i by i);
      * a directory laid out as upstream's: `<dir>/<style>/<index:05d>.jpg` (or .png).
    Every prompt needs its image (upstream skips missing ones and so shifts the chunks; this
    refuses instead). Returns {"styles": {style: {mean, chunk_std, n}}, "overall", "scores",
    "scale", "chunk", "prompt_files", "scorer"}.
    """
    if not isinstance(scorer, HPSv2Scorer):
        raise TypeError("scorer must be an HPSv2Scorer")
    batch_size = check_batch_size(batch_size)
    if prompts_per_style % chunk:
        raise ValueError(f"prompts_per_style ({prompts_per_style}) must be a multiple of chunk ({chunk})")
    if not (isinstance(images, Mapping) or callable(images) or Path(str(images)).is_dir()):
        raise ValueError("images must be a dict style -> tensor, a generator callable or an existing directory")
    prompts = load_benchmark_prompts(prompt_dir, styles, prompts_per_style)
    _check_inputs(images, styles, prompts)
    scores = {style: [BENCHMARK_SCALE * s for s in _score_style(scorer, images, style, prompts[style], batch_size)]
              for style in styles}
    result = protocol_average(scores, chunk)
    result.update({
        "metric": "hpsv2_benchmark",
        "scale": BENCHMARK_SCALE,
        "chunk": chunk,
        "scores": scores,
        "prompt_files": {s: sha256_file(Path(prompt_dir) / f"{s}.json") for s in styles},
        "scorer": scorer.settings(),
    })
    return result
