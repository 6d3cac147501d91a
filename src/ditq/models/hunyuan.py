"""Hunyuan-DiT (Tencent) through diffusers' `HunyuanDiT2DModel`, with its two text encoders.

The published checkpoints (`Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers`, `.../HunyuanDiT-Diffusers`)
are directories in diffusers' pipeline layout:
  transformer/     HunyuanDiT2DModel (hidden 1408, 40 blocks, 16 heads x 88, learned sigma)
  text_encoder/    transformers BertModel: the bilingual CLIP text tower, 1024 wide, 77 tokens
  tokenizer/       its BERT tokenizer (vocab.txt)
  text_encoder_2/  transformers T5EncoderModel: the multilingual T5 (mT5), 2048 wide, 256 tokens
  tokenizer_2/     its sentencepiece tokenizer (spiece.model: needs the `sentencepiece` package)
  vae/             the SDXL VAE (scaling factor 0.13025)
  scheduler/       DDPM, scaled-linear betas, v-prediction

What `denoise` feeds the transformer is what diffusers' `HunyuanDiTPipeline` feeds it: both
encoders' states and masks (from the run's `TextBank`), the timestep in the model dtype,
`image_meta_size` (original size (1024, 1024), target size = the image size, crop (0, 0)), style 0,
and the 2-D rotary embedding of the latent grid (`get_2d_rotary_pos_embed` over the pipeline's crop
region of a 512-px base grid). The output is the model's prediction in the schedule's
parameterisation (`scheduler_config()["prediction_type"]`: v for Hunyuan-DiT), learned-sigma
channels dropped.

Hunyuan-DiT is not a chain of blocks: block k of the second half also reads block (N-1-k)'s output
(long skip connections), so `ditq.calibration.blocks.BlockRunner` cannot run it and `blocks()`
refuses block-wise calibration (GPTQ) with `BlockwiseUnsupportedError`; layer-wise methods (rtn)
calibrate through `denoise` and work. (smoothquant / repq fold into DiT's adaLN-Zero blocks and
refuse these blocks with their own errors.)

`model.weights=random` builds the transformer from `model.arch` (a reduced depth is fine), two
one-layer random encoders of the widths the transformer reads (BertModel, T5EncoderModel) and
character-level tokenizers built in code; the fingerprints say so.
"""
from __future__ import annotations

import importlib.util
import json
import re
import string

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditq.conditioning.encoder import TextEncoder, TextEncoderMismatchError, warn_truncated
from ditq.models.base import (LayerInfo, MissingCheckpointError, ModelAdapter, assign_roles,
                              read_scheduler_config)
from ditq.models.dit import (
    DTYPES,
    DiTAdapter,
    file_fingerprint,
    quiet_diffusers,
    check_finite_weights,
    resolve_model_dir,
)

# diffusers module paths -> roles. Every Linear/Conv2d of the model must match one.
#   skip_linear (blocks of the second half): reads LayerNorm([hidden, skip]) (2D wide) and writes
#   the block's residual stream (D wide): a projection into the stream, role "proj" (quantized
#   with the attention output projections; rotate's head_rotation, which folds into `to_out.0` of an
#   attention, refuses it with a FoldError, so set head_rotation: false for this model).
#   The text pooler (q/k/v/c_proj) and the T5 projection (text_embedder) read text-encoder states
#   only: role "caption"; timestep / size+style (extra_embedder) embedders and the patch embedding:
#   "embed"; the final adaLN linear and output projection: "final".
_ROLE_PATTERNS = [
    (re.compile(r"^blocks\.(\d+)\.attn1\.to_[qkv]$"), "qkv"),
    (re.compile(r"^blocks\.(\d+)\.attn1\.to_out\.0$"), "proj"),
    (re.compile(r"^blocks\.(\d+)\.attn2\.(to_[qkv]|to_out\.0)$"), "cross_attn"),
    (re.compile(r"^blocks\.(\d+)\.ff\.net\.0\.proj$"), "fc1"),
    (re.compile(r"^blocks\.(\d+)\.ff\.net\.2$"), "fc2"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.linear$"), "adaln"),
    (re.compile(r"^blocks\.(\d+)\.skip_linear$"), "proj"),
    (re.compile(r"^text_embedder\.linear_[12]$"), "caption"),
    (re.compile(r"^time_extra_emb\.pooler\.[qkvc]_proj$"), "caption"),
    (re.compile(r"^time_extra_emb\.(timestep_embedder|extra_embedder)\.linear_[12]$"), "embed"),
    (re.compile(r"^pos_embed\.proj$"), "embed"),
    (re.compile(r"^norm_out\.linear$"), "final"),
    (re.compile(r"^proj_out$"), "final"),
]

# Layers outside the blocks that read one vector per sample (see conditioning_layers).
_ONE_ROW = re.compile(r"^(time_extra_emb\.(timestep_embedder|extra_embedder)\.linear_[12]|"
                      r"time_extra_emb\.pooler\.[qc]_proj|norm_out\.linear)$")

# Hunyuan-DiT's training schedule (scheduler/scheduler_config.json of the Diffusers releases);
# used when weights=random.
HUNYUAN_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.03, beta_schedule="scaled_linear",
                        prediction_type="v_prediction", steps_offset=1, clip_sample=False)

ORIGINAL_SIZE = (1024, 1024)  # HunyuanDiTPipeline's default `original_size`
TEXT_DIRS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
# model.text: tokens per encoder (must equal the transformer's text_len / text_len_t5), encoder dtype
# (default: the model's), prompts per encoder batch, and for weights=random `arch` =
# {clip: BertConfig kwargs, t5: T5Config kwargs} of the one-layer random encoders
TEXT_KEYS = ("max_tokens", "max_tokens_t5", "dtype", "batch_size", "arch")


class BlockwiseUnsupportedError(TypeError):
    """The model is not a chain of blocks: block-wise calibration cannot run it."""


LONG_SKIP_MESSAGE = (
    "Hunyuan-DiT's long skip connections need a runner of its own (block k of the second half also reads the "
    "output of block N-1-k), so block-wise calibration (gptq, BlockRunner capture/replay) cannot run it; "
    "use a layer-wise method (e.g. rtn, which calibrates through the whole denoiser's forward)"
)


# ----------------------------------------------------------------------------- tokenizers (random)
def build_char_tokenizer(style: str, max_tokens: int):
    """A character-level tokenizer (every printable ASCII character one token, others <unk>) in the
    layout of BERT ("bert": [CLS] text [SEP], pad 0) or T5 ("t5": text </s>, pad 0): the tokenizers
    of `weights=random` (no download); any prompt tokenizes, longer prompts get more tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    if style == "bert":
        special = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
        template = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    elif style == "t5":
        special = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        template = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        names = dict(pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    else:
        raise ValueError(f"tokenizer style {style!r}; choose bert or t5")
    vocab = {**special, **{c: len(special) + i for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")])
    tok.post_processor = template
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_tokens, **names)


def _plain(value) -> dict:
    """A config mapping (DictConfig or dict or None) as a plain dict."""
    if value is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else dict(value)


def _heads(width: int) -> int:
    return next((h for h in (16, 8, 4, 2) if width % h == 0 and width // h >= 8), 1)


def build_random_text_encoders(width: int, width_t5: int, max_tokens: int, max_tokens_t5: int,
                               overrides: dict | None = None):
    """(tokenizer, BertModel, tokenizer_2, T5EncoderModel), one layer each, random (seed 0), of
    the widths the transformer reads. `overrides`: {"clip": {BertConfig kwargs}, "t5": {T5Config kwargs}}."""
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    overrides = dict(overrides or {})
    tok, tok2 = build_char_tokenizer("bert", max_tokens), build_char_tokenizer("t5", max_tokens_t5)
    h1, h2 = _heads(width), _heads(width_t5)
    clip_kw = dict(vocab_size=len(tok), hidden_size=width, num_hidden_layers=1, num_attention_heads=h1,
                   intermediate_size=4 * width, max_position_embeddings=max(512, max_tokens), pad_token_id=0,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    clip_kw.update(overrides.get("clip") or {})
    t5_kw = dict(vocab_size=len(tok2), d_model=width_t5, d_kv=width_t5 // h2, d_ff=2 * width_t5, num_layers=1,
                 num_heads=h2, dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0)
    t5_kw.update(overrides.get("t5") or {})
    torch.manual_seed(0)
    bert = BertModel(BertConfig(**clip_kw), add_pooling_layer=False)
    t5 = T5EncoderModel(T5Config(**t5_kw))
    return tok, bert, tok2, t5


# ----------------------------------------------------------------------------- the text encoder
class HunyuanTextEncoder(TextEncoder):
    """Both of Hunyuan-DiT's encoders: `encode` -> {"embeds": CLIP (BERT) states [N, 77, 1024],
    "mask", "embeds_t5": mT5 states [N, 256, 2048], "mask_t5"} (float32 / long, CPU), tokenized as
    HunyuanDiTPipeline does (padding to the maximum length, truncation)."""

    name = "clip+mt5"

    def __init__(self, tokenizer, encoder, tokenizer_2, encoder_2, max_tokens: int, max_tokens_t5: int,
                 fingerprint: dict, device, batch_size: int = 16):
        self.tokenizer, self.encoder = tokenizer, encoder
        self.tokenizer_2, self.encoder_2 = tokenizer_2, encoder_2
        self.max_tokens, self.max_tokens_t5 = int(max_tokens), int(max_tokens_t5)
        self.hidden_size = int(encoder.config.hidden_size)
        self.hidden_size_t5 = int(encoder_2.config.d_model)
        self._fingerprint = fingerprint
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    def fingerprint(self) -> dict:
        return dict(self._fingerprint)

    def _count_truncated(self, tokenizer, prompts: list[str], limit: int) -> int:
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        return sum(n > limit for n in lengths)

    @torch.no_grad()
    def _run(self, tokenizer, encoder, prompts: list[str], limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, masks = [], []
        for b in range(0, len(prompts), self.batch_size):
            enc = tokenizer(prompts[b : b + self.batch_size], padding="max_length", max_length=limit, truncation=True,
                            return_attention_mask=True, return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            out = encoder(ids, attention_mask=mask)[0]
            embeds.append(out.float().cpu())
            masks.append(mask.long().cpu())
        return torch.cat(embeds), torch.cat(masks)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.encoder is None:
            raise RuntimeError("HunyuanTextEncoder.encode after release(): call adapter.text_encoder() again")
        prompts = list(prompts)
        warn_truncated("Hunyuan-DiT CLIP text encoder (text_encoder)",
                       self._count_truncated(self.tokenizer, prompts, self.max_tokens), len(prompts), self.max_tokens)
        warn_truncated("Hunyuan-DiT mT5 text encoder (text_encoder_2)",
                       self._count_truncated(self.tokenizer_2, prompts, self.max_tokens_t5), len(prompts),
                       self.max_tokens_t5)
        embeds, mask = self._run(self.tokenizer, self.encoder, prompts, self.max_tokens)
        embeds_t5, mask_t5 = self._run(self.tokenizer_2, self.encoder_2, prompts, self.max_tokens_t5)
        return {"embeds": embeds, "mask": mask, "embeds_t5": embeds_t5, "mask_t5": mask_t5}

    def release(self) -> None:
        self.encoder = self.encoder_2 = None


# ----------------------------------------------------------------------------- the adapter
class HunyuanDiTAdapter(ModelAdapter):
    conditioning = "text"

    def __init__(self, cfg, device: str = "cpu", dtype: str = "float32"):
        from diffusers import HunyuanDiT2DModel

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.text_cfg = _plain(getattr(cfg, "text", None))  # max_tokens, max_tokens_t5, dtype, batch_size, arch
        self._check_text_cfg()
        self.root = resolve_model_dir(cfg)
        if self.root is not None:
            self._check_text_dirs()  # before loading anything: a missing encoder fails the run now
        declared = self._declared_transformer_config()
        self._check_text_lengths(declared)  # every text check before the transformer is built or loaded
        self._check_widths(*self._declared_widths(), tc=declared)
        if self.root is None:
            torch.manual_seed(0)
            self.transformer = HunyuanDiT2DModel(**dict(cfg.arch))
        else:
            try:
                with quiet_diffusers():
                    self.transformer = HunyuanDiT2DModel.from_pretrained(self.root, subfolder="transformer",
                                                                         torch_dtype=self.dtype)
            except (OSError, ValueError, RuntimeError) as err:
                raise MissingCheckpointError(
                    f"cannot load the Hunyuan-DiT transformer from {self.root / 'transformer'}: {err}. "
                    "The directory must hold diffusers' config.json and diffusion_pytorch_model.safetensors "
                    f"(as `huggingface-cli download {cfg.hub_id or 'Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers'}` "
                    "writes them)."
                ) from None
        with quiet_diffusers():
            self.transformer.to(self.device, self.dtype).eval().requires_grad_(False)
        if self.root is not None:
            check_finite_weights(self.transformer, "transformer", cfg, self.root / "transformer", self.dtype)
        _use_module_pooler(self.transformer.time_extra_emb.pooler)
        tc = self.transformer.config
        self.cfg_channels = cfg.cfg_channels
        self.latent_shape = (tc.in_channels, tc.sample_size, tc.sample_size)
        self.vae = DiTAdapter._load_vae(self, cfg) if cfg.vae else None  # same VAE loading (SD/SDXL layout)
        if self.vae is not None:
            self._check_vae_scale()
        self.bank = None
        self._rope: dict = {}

    # -- loading checks ----------------------------------------------------------------------------
    def _check_text_cfg(self) -> None:
        t = self.text_cfg
        unknown = sorted(set(t) - set(TEXT_KEYS))
        if unknown:
            raise ValueError(f"model.text.{unknown[0]} is not a Hunyuan-DiT text setting; valid keys: "
                             f"{', '.join(TEXT_KEYS)}")
        if t.get("dtype") and str(t["dtype"]) not in DTYPES:
            raise ValueError(f"model.text.dtype={t['dtype']!r}; choose one of: {', '.join(DTYPES)} (null: the model's)")
        bad = sorted(set(t.get("arch") or {}) - {"clip", "t5"})
        if bad:
            raise ValueError(f"model.text.arch.{bad[0]}: the random encoders are `clip` (BertConfig kwargs) and `t5` "
                             "(T5Config kwargs)")

    def _check_text_dirs(self) -> None:
        missing = [d for d in TEXT_DIRS if not (self.root / d).is_dir() or not any((self.root / d).iterdir())]
        if missing:
            cfg = self.cfg
            hub = cfg.hub_id or "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers"
            raise MissingCheckpointError(
                f"model '{cfg.name}': {self.root} lacks the text encoder folder(s) "
                f"{', '.join(d + '/' for d in missing)} "
                "(Hunyuan-DiT needs both encoders: text_encoder/ + tokenizer/ (bilingual CLIP) and text_encoder_2/ + "
                f"tokenizer_2/ (mT5)). Download the whole pipeline on a machine with network access, e.g. "
                f"`huggingface-cli download {hub} --local-dir {cfg.path or '<dir>'}`, and copy it here, or set "
                f"model.path=/path/to/{hub.split('/')[-1]}."
            )
        tok2 = self.root / "tokenizer_2"
        if not (tok2 / "tokenizer.json").is_file() and importlib.util.find_spec("sentencepiece") is None:
            raise MissingCheckpointError(
                f"model '{self.cfg.name}': {tok2} holds a sentencepiece model (spiece.model) and no tokenizer.json, "
                "and the `sentencepiece` package is not installed; install it (`pip install sentencepiece`) or add a "
                "tokenizer.json converted on another machine (AutoTokenizer.from_pretrained(...).save_pretrained(...))"
            )

    def _declared_transformer_config(self):
        """The transformer's config (config.json, or model.arch over diffusers' defaults) without building it."""
        import inspect
        from types import SimpleNamespace

        from diffusers import HunyuanDiT2DModel

        conf = {k: p.default for k, p in inspect.signature(HunyuanDiT2DModel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
        if self.root is None:
            conf.update(_plain(self.cfg.arch))
        else:
            path = self.root / "transformer" / "config.json"
            try:
                conf.update(json.loads(path.read_text()))
            except (OSError, ValueError) as err:
                raise MissingCheckpointError(f"model '{self.cfg.name}': cannot read {path} ({err}); download the "
                                             f"pipeline again or point model.path at an intact copy") from None
        return SimpleNamespace(**conf)

    def _check_text_lengths(self, tc) -> None:
        for key, want in (("max_tokens", tc.text_len), ("max_tokens_t5", tc.text_len_t5)):
            got = self.text_cfg.get(key)
            if got is not None and int(got) != int(want):
                raise TextEncoderMismatchError(
                    f"model.text.{key}={got} but the Hunyuan-DiT transformer of model '{self.cfg.name}' takes exactly "
                    f"{want} tokens from that encoder (transformer config text_len={tc.text_len}, text_len_t5="
                    f"{tc.text_len_t5}: its padding embedding and pooler are sized to them); set model.text.{key}="
                    f"{want} or remove it"
                )

    def _check_vae_scale(self) -> None:
        found = getattr(self.vae.config, "scaling_factor", None)
        if self.root is not None and found is not None and abs(float(found) - float(self.cfg.vae_scale)) > 1e-6:
            raise ValueError(f"model.vae_scale={self.cfg.vae_scale} but the VAE of model '{self.cfg.name}' says "
                             f"scaling_factor={found} (Hunyuan-DiT's SDXL VAE: 0.13025); set model.vae_scale={found}")

    # -- text ------------------------------------------------------------------------------------
    def _text_dtype(self) -> torch.dtype:
        return DTYPES[str(self.text_cfg["dtype"])] if self.text_cfg.get("dtype") else self.dtype

    def text_encoder_fingerprint(self) -> dict:
        """The identity `text_encoder().fingerprint()` gives, without loading the encoders (the hook of
        ditq.conditioning.text.prepare_text): whole-file hashes of the four text folders, or the
        random encoders' recipe."""
        tc = self.transformer.config
        fp = {"family": "hunyuan", "encoder": "clip+mt5"}
        if self.root is None:
            width, width_t5 = self._declared_widths()
            fp.update({"weights": "random", "seed": 0, "widths": [width, width_t5],
                       "tokenizers": "built-in character-level (ditq.models.hunyuan.build_char_tokenizer)",
                       "arch": _plain(self.text_cfg.get("arch"))})
        else:
            fp["files"] = self._text_files()
        fp.update({"max_tokens": [int(tc.text_len), int(tc.text_len_t5)], "dtype": str(self._text_dtype())})
        return fp

    def text_encoder(self) -> HunyuanTextEncoder:
        """Both encoders and tokenizers, loaded (random: built) now; the caller releases them."""
        tc = self.transformer.config
        if self.root is None:
            tok, enc, tok2, enc2 = build_random_text_encoders(
                tc.cross_attention_dim, tc.cross_attention_dim_t5, tc.text_len, tc.text_len_t5,
                self.text_cfg.get("arch"))
        else:
            tok, enc, tok2, enc2 = self._load_text_encoders()
        self._check_widths(int(enc.config.hidden_size), int(enc2.config.d_model))
        text_dtype = self._text_dtype()
        enc = enc.to(self.device, text_dtype).eval().requires_grad_(False)
        enc2 = enc2.to(self.device, text_dtype).eval().requires_grad_(False)
        return HunyuanTextEncoder(tok, enc, tok2, enc2, tc.text_len, tc.text_len_t5, self.text_encoder_fingerprint(),
                                  self.device, batch_size=int(self.text_cfg.get("batch_size", 16)))

    def _load_text_encoders(self):
        from transformers import AutoTokenizer, BertModel, T5EncoderModel

        self._check_text_dirs()
        parts = []
        for sub, cls in (("tokenizer", AutoTokenizer), ("text_encoder", BertModel), ("tokenizer_2", AutoTokenizer),
                         ("text_encoder_2", T5EncoderModel)):
            try:
                parts.append(cls.from_pretrained(self.root / sub))
            except (OSError, ValueError, RuntimeError, ImportError) as err:
                raise MissingCheckpointError(
                    f"cannot load Hunyuan-DiT's {sub} from {self.root / sub}: {type(err).__name__}: {err}. Download "
                    f"the pipeline again (`huggingface-cli download {self.cfg.hub_id} --local-dir "
                    f"{self.cfg.path or '<dir>'}`) or point model.path at an intact copy."
                ) from None
        for sub, module in (("text_encoder", parts[1]), ("text_encoder_2", parts[3])):
            check_finite_weights(module, sub, self.cfg, self.root / sub, torch.float32)
        return tuple(parts)

    def _declared_widths(self) -> tuple[int, int]:
        """The encoders' output widths from their configs (random: model.text.arch), without loading weights."""
        tc = self._declared_transformer_config()
        if self.root is None:
            arch = self.text_cfg.get("arch") or {}
            return (int((arch.get("clip") or {}).get("hidden_size", tc.cross_attention_dim)),
                    int((arch.get("t5") or {}).get("d_model", tc.cross_attention_dim_t5)))
        widths = []
        for sub, key in (("text_encoder", "hidden_size"), ("text_encoder_2", "d_model")):
            path = self.root / sub / "config.json"
            try:
                widths.append(int(json.loads(path.read_text())[key]))
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise MissingCheckpointError(
                    f"model '{self.cfg.name}': cannot read {key} from {path} ({type(err).__name__}: {err}); download "
                    f"the pipeline again (`huggingface-cli download {self.cfg.hub_id} --local-dir "
                    f"{self.cfg.path or '<dir>'}`) or point model.path at an intact copy") from None
        return widths[0], widths[1]

    def _check_widths(self, width: int, width_t5: int, tc=None) -> None:
        tc = tc if tc is not None else self.transformer.config
        bad = []
        if width != tc.cross_attention_dim:
            bad.append(f"text_encoder (CLIP) writes {width}-wide states but the transformer's cross-attention reads "
                       f"cross_attention_dim={tc.cross_attention_dim}")
        if width_t5 != tc.cross_attention_dim_t5:
            bad.append(f"text_encoder_2 (mT5) writes {width_t5}-wide states but the transformer's T5 projection "
                       f"reads cross_attention_dim_t5={tc.cross_attention_dim_t5}")
        if bad:
            raise TextEncoderMismatchError(
                f"model '{self.cfg.name}': the text encoders do not fit the transformer: {'; '.join(bad)}. Use the "
                "text_encoder/ and text_encoder_2/ of the same Hunyuan-DiT release as transformer/ (model.path), or, "
                "with model.weights=random, matching model.arch.cross_attention_dim / cross_attention_dim_t5."
            )

    def set_text_bank(self, bank) -> None:
        tc = self.transformer.config
        want = {"embeds": (tc.text_len, tc.cross_attention_dim),
                "embeds_t5": (tc.text_len_t5, tc.cross_attention_dim_t5)}
        missing = [k for k in ("embeds_t5", "mask_t5") if k not in bank.extra]
        if missing:
            raise TextEncoderMismatchError(
                f"the text bank lacks {missing}: it was not made by Hunyuan-DiT's two encoders "
                "(adapter.text_encoder()); "
                "encode the prompts with this model's encoder")
        got = {"embeds": tuple(bank.embeds.shape[1:]), "embeds_t5": tuple(bank.extra["embeds_t5"].shape[1:])}
        bad = [f"{k} is [P, {', '.join(map(str, got[k]))}], the transformer needs [P, {', '.join(map(str, want[k]))}]"
               for k in want if tuple(got[k]) != tuple(want[k])]
        if bad:
            raise TextEncoderMismatchError(f"the text bank does not fit the Hunyuan-DiT transformer: {'; '.join(bad)}; "
                                           "encode the prompts with this model's encoder (adapter.text_encoder())")
        self.bank = bank

    # -- interface -------------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def rotary_embedding(self, height: int, width: int):
        """(cos, sin) of the 2-D RoPE for a latent of height x width, as HunyuanDiTPipeline builds it."""
        key = (height, width)
        if key not in self._rope:
            from diffusers.models.embeddings import get_2d_rotary_pos_embed

            tr = self.transformer
            p = tr.config.patch_size
            grid = (height // p, width // p)
            base_size = 512 // 8 // p  # the pipeline's base grid (512 px through the x8 VAE)
            crops = get_resize_crop_region_for_grid(grid, base_size)
            self._rope[key] = get_2d_rotary_pos_embed(tr.inner_dim // tr.num_heads, crops, grid, device=self.device,
                                                      output_type="pt")
        return self._rope[key]

    def image_meta_size(self, batch: int, height: int, width: int) -> torch.Tensor:
        """[B, 6]: original size, target size (the image size in pixels), crop top-left (0, 0)."""
        factor = 8 if self.vae is not None else 1
        row = list(ORIGINAL_SIZE) + [height * factor, width * factor] + [0, 0]
        return torch.tensor([row], dtype=self.dtype, device=self.device).repeat(batch, 1)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.bank is None:
            raise RuntimeError("HunyuanDiTAdapter.denoise needs the run's text embeddings: encode the prompts with "
                               "adapter.text_encoder() and call adapter.set_text_bank(bank) first")
        b, _, h, w = x.shape
        embeds, mask, extra = self.bank.lookup(y, device=self.device, dtype=self.dtype)
        t = t.to(self.device)
        if t.ndim == 0:
            t = t.expand(b)
        out = self.transformer(
            x.to(self.dtype), t.to(self.dtype),  # the pipeline passes timesteps in the latents' dtype
            encoder_hidden_states=embeds, text_embedding_mask=mask,
            encoder_hidden_states_t5=extra["embeds_t5"], text_embedding_mask_t5=extra["mask_t5"],
            image_meta_size=self.image_meta_size(b, h, w),
            style=torch.zeros(b, dtype=torch.long, device=self.device),
            image_rotary_emb=self.rotary_embedding(h, w),
        ).sample
        return out[:, : x.shape[1]].to(x.dtype)  # learned-sigma channels are not used

    def layers(self) -> list[LayerInfo]:
        return assign_roles(self.transformer, _ROLE_PATTERNS, "ditq.models.hunyuan._ROLE_PATTERNS")

    def blocks(self) -> list[nn.Module]:
        raise BlockwiseUnsupportedError(LONG_SKIP_MESSAGE)

    def conditioning_layers(self) -> dict[str, object]:
        """Layers that see one input vector per sample, a function of (t, prompt) only: every block's
        adaLN shift, the timestep and extra (pooled text, size, style) embedders, the text pooler's
        query and output projections, and the final adaLN linear (cost accounting: 1 token each).
        Block-wise calibration is refused, so no grid inputs (`conditioning_inputs`) are offered."""
        out: dict[str, object] = {}
        for info in self.layers():
            if info.role == "adaln":
                out[info.name] = info.block
            elif _ONE_ROW.match(info.name):
                out[info.name] = "tail" if info.name == "norm_out.linear" else "pre"
        return out

    def scheduler_config(self) -> dict:
        return read_scheduler_config(self.root, HUNYUAN_SCHEDULE)

    def _files(self, subs) -> dict:
        files = {}
        for sub in subs:
            d = self.root / sub
            for p in sorted(d.glob("*")) if d.is_dir() else []:
                if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt", ".model"):
                    files[f"{sub}/{p.name}"] = file_fingerprint(p)
        return files

    def _text_files(self) -> dict:
        return self._files(TEXT_DIRS)

    def fingerprint(self) -> dict:
        fp = {"family": "hunyuan", "name": self.cfg.name, "dtype": str(self.dtype)}
        if self.root is None:
            fp["random_arch"] = _plain(self.cfg.arch)
            fp["text"] = {"weights": "random", "tokenizers": "built-in character-level",
                          "arch": _plain(self.text_cfg.get("arch"))}
            fp["seed"] = 0
            return fp
        subs = ["transformer", "scheduler", *([self.cfg.vae] if self.cfg.vae else []), *TEXT_DIRS]
        fp["files"] = self._files(subs)  # the images depend on the encoders too
        return fp


def get_resize_crop_region_for_grid(src: tuple[int, int], tgt_size: int):
    """diffusers' pipeline_hunyuandit.get_resize_crop_region_for_grid (same arithmetic; importing
    the pipeline module would load transformers' image processors): the grid resized into a
    tgt_size square, centred -> ((top, left), (bottom, right))."""
    th = tw = tgt_size
    h, w = src
    if h / w > 1:
        resize_height, resize_width = th, int(round(th / h * w))
    else:
        resize_width, resize_height = tw, int(round(tw / w * h))
    top, left = int(round((th - resize_height) / 2.0)), int(round((tw - resize_width) / 2.0))
    return (top, left), (top + resize_height, left + resize_width)


# ----------------------------------------------------------------------------- the pooler
def _module_pooler_forward(self, x: torch.Tensor) -> torch.Tensor:
    """diffusers' HunyuanDiTAttentionPool.forward with its projections called as modules.

    The stock forward hands q/k/v/c_proj's *weights* to F.multi_head_attention_forward, so a
    quantized (wrapped) or hooked projection would be bypassed silently. This is the same function
    (one query: the mean token, plus the positional embedding; 8 heads; softmax(q k^T / sqrt(d)) v;
    c_proj), equal to the stock forward to float rounding (tests/test_hunyuan.py)."""
    x = x.permute(1, 0, 2)  # NLC -> LNC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + self.positional_embedding[:, None, :].to(x.dtype)
    length, batch, width = x.shape
    heads = self.num_heads
    q = self.q_proj(x[:1])  # [1, N, C]
    k, v = self.k_proj(x), self.v_proj(x)  # [L+1, N, C]
    split = lambda z: z.reshape(z.shape[0], batch * heads, width // heads).transpose(0, 1)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # [N*h, 1, C/h]
    out = out.transpose(0, 1).reshape(1, batch, width)
    return self.c_proj(out).squeeze(0)


def _use_module_pooler(pooler: nn.Module) -> None:
    import types

    pooler.forward = types.MethodType(_module_pooler_forward, pooler)
