"""ImageReward v1.0 (Xu et al. 2023) on transformers' BLIP modules, loading the published `ImageReward.pt`.

Upstream (THUDM/ImageReward, package `image-reward` 1.5), what this module reproduces:
  * image: PIL bicubic resize of the shorter side to 224, center crop 224 (torchvision offsets),
    /255, OpenAI CLIP mean/std; BLIP ViT-L/16 (24 blocks, width 1024, 16 heads, LayerNorm eps
    1e-6, exact GELU) -> all tokens after the final norm;
  * prompt: bert-base-uncased WordPiece tokenizer with BLIP's added `[DEC]` (bos) and `[ENC]`
    tokens, padded/truncated to 35 tokens; a BERT encoder (med_config.json) with
    cross-attention to the image tokens in every layer, bidirectional self-attention;
  * reward: the [CLS] state through an MLP of five Linear layers without activations
    (768-1024-128-64-16-1), then (r - 0.16717362830052426) / 1.0333394966054072.

Files (nothing is downloaded by the tests; see docs/t2i_metrics.md):
  * `path`: ImageReward.pt, a directory holding it, or the Hub repo `THUDM/ImageReward`;
  * `med_config`: med_config.json (default: next to the checkpoint, else from `THUDM/ImageReward`);
  * `tokenizer`: bert-base-uncased's vocab.txt, a directory holding it, or a Hub id
    (default `bert-base-uncased`, read from the Hub cache).
Published-checkpoint keys `blip.visual_encoder.*` (timm-style ViT), `blip.text_encoder.*`
(BLIP's med.py BERT) and `mlp.layers.*` are mapped onto `BlipVisionModel`, `BlipTextModel` and
`RewardHead`; `blip.vision_proj`/`blip.text_proj` (unused by the reward) are ignored.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
from torch import nn

from .t2i_common import (
    CLIP_MEAN,
    CLIP_STD,
    check_state_dict,
    load_state_dict_file,
    normalize,
    pil_resize_crop,
    read_json_file,
    resolve_file,
    score_in_batches,
    sha256_file,
    to_unit_float,
)

HUB_REPO = "THUDM/ImageReward"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
PROMPT_TOKENS = 35
# BLIP's create_vit('large', image_size=224): ViT-L/16 as ImageReward v1.0 builds it.
V1_VISION = {"image_size": 224, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 4.0}
# Keys of the published checkpoint that the reward does not use.
IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------
class RewardHead(nn.Module):
    """ImageReward's MLP: Linear layers only (its ReLUs are commented out upstream); the
    Dropout slots are kept so that parameter names match the published `mlp.layers.N`."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def vision_config(spec: dict):
    from transformers import BlipVisionConfig

    unknown = set(spec) - set(V1_VISION)
    if unknown:
        raise ValueError(f"unknown ImageReward vision settings {sorted(unknown)}; allowed: {sorted(V1_VISION)}")
    s = {**V1_VISION, **spec}
    return BlipVisionConfig(
        hidden_size=s["width"], intermediate_size=int(s["width"] * s["mlp_ratio"]), num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], image_size=s["image_size"], patch_size=s["patch_size"],
        hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0,
    )


def text_config(med: dict, encoder_width: int):
    """BlipTextConfig from BLIP's med_config.json (a BertConfig; absent fields take BertConfig's defaults)."""
    from transformers import BlipTextConfig

    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in med]
    if missing:
        raise ValueError(f"med_config.json lacks {missing}")
    if not med.get("add_cross_attention", False):
        raise ValueError("med_config.json must set add_cross_attention: true (ImageReward attends to the image)")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("med_config.json: only absolute position embeddings are supported")
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], intermediate_size=med["intermediate_size"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        max_position_embeddings=med.get("max_position_embeddings", 512), pad_token_id=med.get("pad_token_id", 0),
        encoder_hidden_size=encoder_width, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        is_decoder=True,  # transformers builds the cross-attention layers only for decoders; run with is_decoder=False
    )


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP BERT with cross-attention + reward head; returns the unnormalised reward."""

    def __init__(self, vision_cfg, text_cfg):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.visual = BlipVisionModel(vision_cfg)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.head = RewardHead(text_cfg.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        image_tokens = self.visual(pixel_values=pixel_values).last_hidden_state
        states = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                           is_decoder=False).last_hidden_state
        return self.head(states[:, 0, :].float()).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Published checkpoint layout <-> this module
# ---------------------------------------------------------------------------------------------
_RULES = [  # (our key pattern, published key template)
    (r"visual\.embeddings\.class_embedding", "blip.visual_encoder.cls_token"),
    (r"visual\.embeddings\.position_embedding", "blip.visual_encoder.pos_embed"),
    (r"visual\.embeddings\.patch_embedding\.(weight|bias)", r"blip.visual_encoder.patch_embed.proj.\1"),
    (r"visual\.encoder\.layers\.(\d+)\.layer_norm1\.(\w+)", r"blip.visual_encoder.blocks.\1.norm1.\2"),
    (r"visual\.encoder\.layers\.(\d+)\.layer_norm2\.(\w+)", r"blip.visual_encoder.blocks.\1.norm2.\2"),
    (r"visual\.encoder\.layers\.(\d+)\.self_attn\.qkv\.(\w+)", r"blip.visual_encoder.blocks.\1.attn.qkv.\2"),
    (r"visual\.encoder\.layers\.(\d+)\.self_attn\.projection\.(\w+)", r"blip.visual_encoder.blocks.\1.attn.proj.\2"),
    (r"visual\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(\w+)", r"blip.visual_encoder.blocks.\1.mlp.\2.\3"),
    (r"visual\.post_layernorm\.(\w+)", r"blip.visual_encoder.norm.\1"),
    (r"text\.(.+)", r"blip.text_encoder.\1"),  # BLIP's med.py and transformers' BlipTextModel share names
    (r"head\.layers\.(\d+)\.(\w+)", r"mlp.layers.\1.\2"),
]


def published_key(our_key: str) -> str:
    for pattern, template in _RULES:
        m = re.fullmatch(pattern, our_key)
        if m:
            return m.expand(template)
    raise KeyError(f"no published ImageReward key for {our_key}")


def load_published(model: ImageRewardModel, state: dict[str, torch.Tensor], path) -> None:
    """Check `state` (published layout) against `model` and load it; raise ValueError on mismatch."""
    ours = model.state_dict()
    expected = {published_key(k): tuple(v.shape) for k, v in ours.items()}
    check_state_dict(state, expected, what="ImageReward", path=path, ignorable=IGNORED_PREFIXES)
    model.load_state_dict({k: state[published_key(k)] for k in ours}, strict=True)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def blip_bert_tokenizer(vocab_file: Path):
    """bert-base-uncased WordPiece + BLIP's `[DEC]` bos and `[ENC]` tokens (BLIP's init_tokenizer)."""
    from transformers import BertTokenizer

    params = inspect.signature(BertTokenizer.__init__).parameters
    vocab_arg = "vocab_file" if "vocab_file" in params else "vocab"  # transformers 4.x / 5.x
    tok = BertTokenizer(**{vocab_arg: str(vocab_file)}, do_lower_case=True)
    if tok.convert_tokens_to_ids("[CLS]") == tok.unk_token_id or len(tok) < 5:
        raise ValueError(f"{vocab_file} is not a BERT WordPiece vocab (no [CLS] token)")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------
class ImageRewardScorer:
    """ImageReward v1.0 scores of image-prompt pairs (higher = preferred)."""

    def __init__(self, path: str = HUB_REPO, device: str = "cpu", *, med_config: str | None = None,
                 tokenizer: str = "bert-base-uncased", vision: dict | None = None,
                 dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        ckpt = resolve_file(path, "ImageReward.pt", what="ImageReward checkpoint", setting="path", hub_repo=HUB_REPO)
        if med_config is None:
            beside = ckpt.parent / "med_config.json"
            med_config = str(beside) if beside.is_file() else HUB_REPO
        med_path = resolve_file(med_config, "med_config.json", what="ImageReward med_config", setting="med_config",
                                hub_repo=HUB_REPO)
        vocab = resolve_file(tokenizer, "vocab.txt", what="ImageReward tokenizer (bert-base-uncased vocab)",
                             setting="tokenizer", hub_repo="google-bert/bert-base-uncased")
        med = read_json_file(med_path, what="ImageReward med_config")
        if not isinstance(med, dict):
            raise ValueError(f"{med_path}: expected a JSON object")
        self.vision = {**V1_VISION, **(vision or {})}
        v_cfg = vision_config(vision or {})
        t_cfg = text_config(med, encoder_width=v_cfg.hidden_size)
        self.tokenizer = blip_bert_tokenizer(vocab)
        if len(self.tokenizer) != t_cfg.vocab_size:
            raise ValueError(
                f"tokenizer {vocab} has {len(self.tokenizer)} tokens with [DEC] and [ENC], but {med_path} says "
                f"vocab_size={t_cfg.vocab_size}: use bert-base-uncased's vocab.txt (30522 tokens + 2 = 30524)"
            )
        state = load_state_dict_file(ckpt, what="ImageReward checkpoint")
        model = ImageRewardModel(v_cfg, t_cfg)
        load_published(model, state, ckpt)
        del state
        self.model = model.to(self.device, dtype).eval()
        self.model.head.float()  # upstream runs the MLP on .float() features whatever the backbone dtype
        self.files = {"checkpoint": str(ckpt), "checkpoint_sha256": sha256_file(ckpt), "med_config": str(med_path),
                      "vocab": str(vocab)}

    def settings(self) -> dict:
        size = self.vision["image_size"]
        return {
            "metric": "image_reward",
            "version": "v1.0",
            **self.files,
            "vision": dict(self.vision),
            "definition": "ImageReward v1.0: (MLP(BLIP [CLS] state) - 0.16717362830052426) / 1.0333394966054072",
            "preprocessing": {"resize_shorter_side": size, "center_crop": size, "crop_offset": "round",
                              "resample": "PIL bicubic", "mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
            "tokenizer": {"type": "bert-base-uncased WordPiece + [DEC], [ENC]", "max_length": PROMPT_TOKENS,
                          "padding": "max_length"},
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    @torch.no_grad()
    def raw_reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The MLP output before normalisation, for one batch (float32)."""
        size = self.vision["image_size"]
        pixels = normalize(to_unit_float(pil_resize_crop(images, size, size, "round")))
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                                return_tensors="pt")
        return self.model(pixels.to(self.device, self.dtype), tokens["input_ids"].to(self.device),
                          tokens["attention_mask"].to(self.device))

    def score(self, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
        """uint8 [N,3,H,W] + N prompts -> float64 [N] ImageReward v1.0 rewards."""
        return score_in_batches(images, prompts, batch_size,
                                lambda img, txt: (self.raw_reward(img, txt) - REWARD_MEAN) / REWARD_STD)
