"""Text-conditional PixArt DiTs through diffusers' `PixArtTransformer2DModel` and a T5 text encoder.

One adapter serves the embedded text-to-image model (pixel space, 8x8 digits, its own word-level
tokenizer and small T5; `python -m ditq.train.tiny_pixart`) and the published PixArt-alpha
256/512/1024 and PixArt-Sigma checkpoints (latent space, SD / SDXL VAE, T5-XXL): all are
directories in the hub layout of `PixArt-alpha/PixArt-XL-2-512x512` (transformer/, text_encoder/,
tokenizer/, scheduler/, vae/).

The condition `y` of `denoise` is a prompt index (-1 = the empty prompt, the guidance branch);
the adapter looks the T5 states up in the `TextBank` the run filled (`set_text_bank`), so the text
encoder (9.5 GB for T5-XXL in bf16) is never in memory next to the denoiser. `text_encoder()`
loads it on demand (`T5TextEncoder`: tokenize with padding to `max_tokens`, truncation counted and
warned about, `last_hidden_state` in float32 with the attention mask).

Roles (every Linear/Conv2d gets one; `layers()` raises on any other):
  attn1.to_q/k/v -> qkv, attn1.to_out.0 -> proj, attn2.{to_q,to_k,to_v,to_out.0} -> cross_attn,
  ff.net.0.proj -> fc1, ff.net.2 -> fc2, adaln_single.linear -> adaln, adaln_single.emb.* (timestep
  and size embedders) and pos_embed.proj -> embed, caption_projection.* -> caption, proj_out -> final.
Block-wise calibration: "pre" = patch embedding, adaLN-single and caption projection (all run before
the first block); the conditioning-only layers are adaln_single's linears (functions of t and the
fixed image size) and the caption projection (a function of y: its inputs are the prompt's token
rows, the real tokens only, since padded positions are masked out of the cross-attention).
"""
from __future__ import annotations

import gc
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ditq.conditioning.encoder import TextEncoder, TextEncoderMismatchError, warn_truncated
from ditq.quant.modules import full_precision
from ditq.models.base import (LayerInfo, MissingCheckpointError, ModelAdapter, assign_roles,
                              is_layer, read_scheduler_config)
from ditq.models.dit import (
    DTYPES,
    SD_VAE_ARCH,
    file_fingerprint,
    quiet_diffusers,
    check_finite_weights,
    resolve_model_dir,
)

_ROLE_PATTERNS = [
    (re.compile(r"^transformer_blocks\.(\d+)\.attn1\.to_[qkv]$"), "qkv"),
    (re.compile(r"^transformer_blocks\.(\d+)\.attn1\.to_out\.0$"), "proj"),
    (re.compile(r"^transformer_blocks\.(\d+)\.attn2\.(to_[qkv]|to_out\.0)$"), "cross_attn"),
    (re.compile(r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj$"), "fc1"),
    (re.compile(r"^transformer_blocks\.(\d+)\.ff\.net\.2$"), "fc2"),
    (re.compile(r"^adaln_single\.linear$"), "adaln"),
    (re.compile(r"^adaln_single\.emb\..+$"), "embed"),
    (re.compile(r"^pos_embed\.proj$"), "embed"),
    (re.compile(r"^caption_projection\..+$"), "caption"),
    (re.compile(r"^proj_out$"), "final"),
]
_PRE_PREFIXES = ("pos_embed.", "adaln_single.", "caption_projection.")
_T_ONLY, _Y_ONLY = "adaln_single.", "caption_projection."

# PixArt's training schedule (used when weights=random and no scheduler config exists).
PIXART_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
TEXT_KEYS = ("max_tokens", "dtype", "batch_size", "arch", "tokenizer")  # model.text (see ModelConfig)
RANDOM_TOKENIZERS = ("bytes", "digit_words")


def _dir_files(root: Path, sub: str, suffixes=(".safetensors", ".bin", ".json", ".model", ".txt")) -> dict:
    d = root / sub
    files = sorted(d.glob("*")) if d.is_dir() else []
    return {f"{sub}/{p.name}": file_fingerprint(p) for p in files if p.is_file() and p.suffix in suffixes}


def _text_hint(cfg, root: Path | None) -> str:
    where = cfg.path or (str(root) if root else "<a local directory>")
    if cfg.hub_id:
        return (f"download the whole pipeline on a machine with network access, e.g. `huggingface-cli download "
                f"{cfg.hub_id} --local-dir {where}`, copy it here and set model.path={where}")
    return (cfg.obtain_hint or "point model.path at a directory in PixArt's hub layout "
            "(transformer/, text_encoder/, tokenizer/, scheduler/)")


def preprocess(prompt: str) -> str:
    """diffusers' PixArt text preprocessing without `clean_caption` (which needs bs4 and ftfy): lower
    case, outer whitespace stripped. T5's tokenizer is case-sensitive, so this matters."""
    return prompt.lower().strip()


@contextmanager
def _quiet_transformers():
    """transformers' loading progress bars and notices are noise here; errors still raise."""
    from transformers.utils import logging as tlog

    level, bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()


def build_byte_tokenizer(max_tokens: int):
    """A generic byte-level tokenizer with T5's special tokens (pad 0, eos 1, unk 2; byte b -> 3 + rank):
    every prompt encodes, nothing is unknown. Used for weights=random (no tokenizer file exists)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_tokens)


class T5TextEncoder(TextEncoder):
    """PixArt's text encoder: a transformers `T5EncoderModel` and its tokenizer (see module doc)."""

    name = "t5"

    def __init__(self, model, tokenizer, max_tokens: int, fingerprint: dict, device, what: str,
                 batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        self.hidden_size = int(model.config.d_model)
        self._fingerprint = fingerprint
        self.device = torch.device(device)
        self.what = what
        self.batch_size = max(1, int(batch_size))

    def fingerprint(self) -> dict:
        return dict(self._fingerprint)

    def count_truncated(self, prompts: list[str]) -> int:
        """Prompts whose token count (special tokens included) exceeds `max_tokens`."""
        ids = self.tokenizer([preprocess(p) for p in prompts], add_special_tokens=True, truncation=False,
                             verbose=False)["input_ids"]
        return sum(len(i) > self.max_tokens for i in ids)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.model is None:
            raise RuntimeError(f"{self.what}: the text encoder was released; call adapter.text_encoder() again")
        prompts = [preprocess(p) for p in prompts]
        if not prompts:
            return {"embeds": torch.zeros(0, self.max_tokens, self.hidden_size), "mask": torch.zeros(0, self.max_tokens,
                                                                                                 dtype=torch.long)}
        warn_truncated(self.what, self.count_truncated(prompts), len(prompts), self.max_tokens)
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"].long()
        out = []
        for b in range(0, len(prompts), self.batch_size):
            h = self.model(input_ids=ids[b : b + self.batch_size].to(self.device),
                           attention_mask=mask[b : b + self.batch_size].to(self.device)).last_hidden_state
            out.append(h.float().cpu())
        return {"embeds": torch.cat(out), "mask": mask}

    def release(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class PixArtAdapter(ModelAdapter):
    conditioning = "text"

    def __init__(self, cfg, device: str = "cpu", dtype: str = "float32"):
        from diffusers import PixArtTransformer2DModel

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.text_cfg = dict(cfg.text or {})
        unknown = sorted(set(self.text_cfg) - set(TEXT_KEYS))
        if unknown:
            raise ValueError(f"model.text.{unknown[0]} is not a PixArt text-encoder setting; choose from: "
                             f"{', '.join(TEXT_KEYS)}")
        self.root = resolve_model_dir(cfg)
        if self.root is not None:
            self._check_files()  # mismatched parts fail here, before gigabytes of weights load
        if self.root is None:
            torch.manual_seed(0)
            with quiet_diffusers():
                self.transformer = PixArtTransformer2DModel(**dict(cfg.arch))
        else:
            try:
                with quiet_diffusers():
                    self.transformer = PixArtTransformer2DModel.from_pretrained(
                        self.root, subfolder="transformer", torch_dtype=self.dtype)
            except (OSError, ValueError, RuntimeError) as err:
                raise MissingCheckpointError(
                    f"cannot load the PixArt transformer from {self.root / 'transformer'}: {err}. The directory "
                    "must hold diffusers' config.json and diffusion_pytorch_model.safetensors (as "
                    f"`huggingface-cli download {cfg.hub_id or 'PixArt-alpha/PixArt-XL-2-512x512'}` writes them)."
                ) from None
        with quiet_diffusers():
            self.transformer.to(self.device, self.dtype).eval().requires_grad_(False)
        if self.root is not None:
            check_finite_weights(self.transformer, "transformer", cfg, self.root / "transformer", self.dtype)
        tc = self.transformer.config
        if tc.caption_channels is None:
            raise TextEncoderMismatchError(
                f"model '{cfg.name}': the PixArt transformer has no caption projection (caption_channels is null), "
                "so it cannot take text; use a text-conditional PixArt checkpoint")
        self.caption_channels = int(tc.caption_channels)
        self.cfg_channels = cfg.cfg_channels
        self.vae = self._load_vae() if cfg.vae else None
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.latent_shape = (tc.in_channels, tc.sample_size, tc.sample_size)
        if tc.sample_size * self.vae_factor != cfg.resolution:
            raise ValueError(
                f"model '{cfg.name}': the transformer's sample_size={tc.sample_size} gives "
                f"{tc.sample_size * self.vae_factor}px images{' through the VAE' if self.vae is not None else ''}, "
                f"but model.resolution={cfg.resolution}; set model.resolution={tc.sample_size * self.vae_factor}")
        self.bank = None

    # -- loading ---------------------------------------------------------------------------------
    def _check_files(self) -> None:
        """The parts of a hub-layout directory fit together (read from their config.json files only):
        the text encoder's width is the transformer's caption width, the VAE's scaling factor is
        model.vae_scale, and the transformer's sample size through the VAE is model.resolution."""
        def conf(sub):
            path = self.root / sub / "config.json"
            return json.loads(path.read_text()) if path.is_file() else None

        cfg, tc = self.cfg, conf("transformer") or {}
        cap = tc.get("caption_channels")
        te = conf("text_encoder")
        if te is not None and cap is not None and te.get("d_model") not in (None, cap):
            self.caption_channels = cap
            raise self._mismatch(int(te["d_model"]), f"{self.root / 'text_encoder' / 'config.json'}")
        vae = conf(cfg.vae) if cfg.vae and (self.root / cfg.vae).is_dir() else None
        if vae is not None:
            scale = vae.get("scaling_factor")
            if scale is not None and abs(float(scale) - float(cfg.vae_scale)) > 1e-9:
                raise ValueError(
                    f"model '{cfg.name}': model.vae_scale={cfg.vae_scale} but the VAE at {self.root / cfg.vae} was "
                    f"trained with scaling_factor={scale} (SD VAE: 0.18215, SDXL VAE: 0.13025); set "
                    f"model.vae_scale={scale}")
        factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1) if vae is not None else (8 if cfg.vae else 1)
        side = tc.get("sample_size")
        if isinstance(side, int) and side * factor != cfg.resolution:
            raise ValueError(
                f"model '{cfg.name}': {self.root / 'transformer'} has sample_size={side}, i.e. {side * factor}px "
                f"images{' through the VAE' if cfg.vae else ''}, but model.resolution={cfg.resolution}; set "
                f"model.resolution={side * factor} or point model.path at the {cfg.resolution}px checkpoint")

    def _load_vae(self):
        from diffusers import AutoencoderKL

        cfg = self.cfg
        if self.root is None:  # random weights: the SD VAE architecture, randomly initialised
            torch.manual_seed(0)
            with quiet_diffusers():
                vae = AutoencoderKL(**SD_VAE_ARCH, scaling_factor=cfg.vae_scale)
                return vae.to(self.device, self.dtype).eval().requires_grad_(False)
        if (self.root / cfg.vae / "config.json").is_file():
            src, kw = self.root, {"subfolder": cfg.vae}
        elif (Path(cfg.vae) / "config.json").is_file():
            src, kw = Path(cfg.vae), {}
        else:
            raise MissingCheckpointError(
                f"VAE {cfg.vae!r} for model '{cfg.name}' not found: neither {self.root / cfg.vae} nor a directory "
                f"{cfg.vae!r} holds its config.json: {_text_hint(cfg, self.root)}, or set model.vae=<a VAE directory>.")
        with quiet_diffusers():
            vae = AutoencoderKL.from_pretrained(src, torch_dtype=self.dtype, **kw)
            vae = vae.to(self.device, self.dtype).eval().requires_grad_(False)
        check_finite_weights(vae, "VAE", cfg, Path(src) / kw.get("subfolder", ""), self.dtype)
        scale = vae.config.get("scaling_factor")  # a VAE from another directory (subfolders: _check_files)
        if scale is not None and abs(float(scale) - float(cfg.vae_scale)) > 1e-9:
            where = Path(src) / kw.get("subfolder", "")
            raise ValueError(
                f"model '{cfg.name}': model.vae_scale={cfg.vae_scale} but the VAE at {where} was trained with "
                f"scaling_factor={scale} (SD VAE: 0.18215, SDXL VAE: 0.13025); set model.vae_scale={scale}")
        return vae

    @property
    def max_tokens(self) -> int:
        """Tokens per prompt: model.text.max_tokens, else the tokenizer's model_max_length."""
        n = self.text_cfg.get("max_tokens")
        if n is not None:
            return int(n)
        if self.root is not None:
            conf = self.root / "tokenizer" / "tokenizer_config.json"
            if conf.is_file():
                m = json.loads(conf.read_text()).get("model_max_length")
                if isinstance(m, int) and 0 < m < 100_000:
                    return m
        raise ValueError(
            f"model '{self.cfg.name}': no token limit: set model.text.max_tokens (PixArt-alpha: 120, PixArt-Sigma: "
            "300), the tokenizer config gives none")

    def text_encoder_fingerprint(self) -> dict:
        """The text encoder's identity without loading it (whole-file sha256 of text_encoder/ and tokenizer/)."""
        fp = {"encoder": "t5", "max_tokens": self.max_tokens, "preprocess": "lower+strip",
              "dtype": str(self._text_dtype()).replace("torch.", "")}
        if self.root is None:
            fp["random_arch"] = dict(self.text_cfg.get("arch") or {})
            fp["seed"] = 0
            fp["tokenizer"] = f"{self._random_tokenizer_kind()} (built by ditq for weights=random; no tokenizer file)"
        else:
            fp["files"] = {**_dir_files(self.root, "text_encoder"), **_dir_files(self.root, "tokenizer")}
        return fp

    def _text_dtype(self) -> torch.dtype:
        name = self.text_cfg.get("dtype")
        return DTYPES[name] if name else self.dtype

    def _random_tokenizer_kind(self) -> str:
        kind = self.text_cfg.get("tokenizer") or "bytes"
        if kind not in RANDOM_TOKENIZERS:
            raise ValueError(f"model.text.tokenizer={kind!r}; choose one of: {', '.join(RANDOM_TOKENIZERS)}")
        return kind

    def _mismatch(self, width: int, what: str) -> TextEncoderMismatchError:
        return TextEncoderMismatchError(
            f"model '{self.cfg.name}': the text encoder ({what}) outputs {width}-wide states, but the transformer's "
            f"caption projection takes caption_channels={self.caption_channels}. The two come from different "
            f"models: point model.path at a pipeline whose text_encoder/ matches its transformer/ (PixArt-alpha and "
            f"PixArt-Sigma: T5-XXL, 4096)" + ("" if self.root is not None else
                                              f", or set model.text.arch.d_model={self.caption_channels}"))

    def text_encoder(self) -> T5TextEncoder:
        """Load the T5 encoder and tokenizer (random weights: build them); the caller releases it."""
        from transformers import T5Config, T5EncoderModel

        cfg, dtype = self.cfg, self._text_dtype()
        what = f"model '{cfg.name}' text encoder"
        if self.root is None:
            arch = dict(self.text_cfg.get("arch") or {})
            if not arch:
                raise ValueError(f"model '{cfg.name}': model.weights=random needs model.text.arch (T5 config "
                                 f"kwargs, e.g. d_model: {self.caption_channels}, num_layers: 1)")
            kind = self._random_tokenizer_kind()
            if kind == "bytes":
                tokenizer = build_byte_tokenizer(self.max_tokens)
            else:
                from ditq.train.tiny_pixart import build_tokenizer

                tokenizer = build_tokenizer()
            if int(arch.get("d_model", 512)) != self.caption_channels:
                raise self._mismatch(int(arch.get("d_model", 512)), "model.text.arch")
            torch.manual_seed(0)
            model = T5EncoderModel(T5Config(**{"vocab_size": len(tokenizer), "pad_token_id": 0, "eos_token_id": 1,
                                               "decoder_start_token_id": 0, "dropout_rate": 0.0, **arch}))
        else:
            te_dir, tok_dir = self.root / "text_encoder", self.root / "tokenizer"
            for d, part in ((te_dir, "text encoder"), (tok_dir, "tokenizer")):
                if not d.is_dir() or not any(d.iterdir()):
                    raise MissingCheckpointError(
                        f"the {part} of model '{cfg.name}' is missing: {d} does not exist or is empty "
                        f"(model.path={cfg.path}). PixArt needs text_encoder/ and tokenizer/ next to transformer/: "
                        f"{_text_hint(cfg, self.root)}.")
            conf = te_dir / "config.json"
            if conf.is_file():  # the width check before loading gigabytes of T5 weights
                width = json.loads(conf.read_text()).get("d_model")
                if width is not None and int(width) != self.caption_channels:
                    raise self._mismatch(int(width), f"{conf}")
            tokenizer = self._load_tokenizer(tok_dir)
            try:
                with _quiet_transformers():
                    model = T5EncoderModel.from_pretrained(te_dir, dtype=dtype)
            except (OSError, ValueError, RuntimeError) as err:
                raise MissingCheckpointError(
                    f"cannot load the T5 text encoder of model '{cfg.name}' from {te_dir}: {err}. "
                    f"{_text_hint(cfg, self.root)}.") from None
        model = model.to(self.device, dtype).eval().requires_grad_(False)
        if self.root is not None:
            check_finite_weights(model, "text encoder", cfg, self.root / "text_encoder", dtype)
        if int(model.config.d_model) != self.caption_channels:
            raise self._mismatch(int(model.config.d_model), "T5 d_model")
        if len(tokenizer) > model.config.vocab_size:
            raise TextEncoderMismatchError(
                f"{what}: the tokenizer has {len(tokenizer)} tokens but the encoder's embedding has only "
                f"{model.config.vocab_size} rows: they come from different models; point model.path at a pipeline "
                "whose tokenizer/ and text_encoder/ belong together")
        return T5TextEncoder(model, tokenizer, self.max_tokens, self.text_encoder_fingerprint(), self.device, what,
                             batch_size=int(self.text_cfg.get("batch_size") or 16))

    def _load_tokenizer(self, tok_dir: Path):
        from transformers import AutoTokenizer

        try:
            with _quiet_transformers():
                return AutoTokenizer.from_pretrained(tok_dir)
        except Exception as err:  # noqa: BLE001 - transformers raises many types here
            spm = (tok_dir / "spiece.model").is_file() and not (tok_dir / "tokenizer.json").is_file()
            fix = (" The tokenizer is a SentencePiece model (spiece.model, no tokenizer.json): transformers needs the "
                   "`sentencepiece` package to read it (pip install sentencepiece), or save a tokenizer.json there."
                   if spm else f" {_text_hint(self.cfg, self.root)}.")
            raise MissingCheckpointError(
                f"cannot load the tokenizer of model '{self.cfg.name}' from {tok_dir}: {type(err).__name__}: {err}."
                + fix) from None

    def set_text_bank(self, bank) -> None:
        width = int(bank.embeds.shape[-1])
        if width != self.caption_channels:
            raise self._mismatch(width, "the text bank's embeddings")
        self.bank = bank

    def _require_bank(self):
        if self.bank is None:
            raise RuntimeError(
                f"model '{self.cfg.name}' is text-conditional and has no text embeddings yet: run "
                "ditq.conditioning.prepare_text(adapter, conditions, indices) first (it encodes the run's prompts "
                "and calls adapter.set_text_bank)")
        return self.bank

    # -- interface -------------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def _timesteps(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        t = t.to(self.device)
        return t.expand(batch) if t.ndim == 0 else t

    def _added_cond(self, batch: int, x_shape) -> dict | None:
        """PixArt-alpha 1024's micro-conditions: image size in pixels [B, 2] and aspect ratio h/w [B, 1]."""
        if not self.transformer.use_additional_conditions:
            return None
        h, w = int(x_shape[-2]) * self.vae_factor, int(x_shape[-1]) * self.vae_factor
        res = torch.tensor([h, w], dtype=self.dtype, device=self.device).repeat(batch, 1)
        ar = torch.tensor([float(h / w)], dtype=self.dtype, device=self.device).repeat(batch, 1)
        return {"resolution": res, "aspect_ratio": ar}

    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        embeds, mask, _ = self._require_bank().lookup(y, self.device, self.dtype)
        b = x.shape[0]
        out = self.transformer(x.to(self.dtype), encoder_hidden_states=embeds, encoder_attention_mask=mask,
                               timestep=self._timesteps(t, b), added_cond_kwargs=self._added_cond(b, x.shape)).sample
        return out[:, : x.shape[1]].to(x.dtype)  # learned-sigma channels are not used

    def layers(self) -> list[LayerInfo]:
        return assign_roles(self.transformer, _ROLE_PATTERNS, "ditq.models.pixart._ROLE_PATTERNS")

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.transformer_blocks)

    def scheduler_config(self) -> dict:
        return read_scheduler_config(self.root, PIXART_SCHEDULE)

    def fingerprint(self) -> dict:
        fp = {"family": "pixart", "name": self.cfg.name, "dtype": str(self.dtype),
              "text": self.text_encoder_fingerprint()}
        if self.root is None:
            fp["random_arch"] = dict(self.cfg.arch)
            fp["seed"] = 0
            if self.cfg.vae:
                fp["random_vae"] = {"arch": "sd", "scale": self.cfg.vae_scale}
            return fp
        files = {}
        for sub in ("transformer", "scheduler", *((self.cfg.vae,) if self.cfg.vae else ())):
            files.update(_dir_files(self.root, sub, (".safetensors", ".bin", ".json")))
        fp["files"] = files
        return fp

    def unique_parameters(self) -> list[nn.Parameter]:
        """PixArt shares one adaLN-single across blocks (no per-block copies): every parameter counts."""
        return list(self.transformer.parameters())

    def layer_tokens(self) -> dict[str, int]:
        """{layer: input rows per sample and denoiser forward} (cost accounting): the caption projection
        and the cross-attention's key/value projections read the max_tokens caption states, adaLN-single's
        linears one vector (the resolution embedder two: height and width), every other layer the patches."""
        _, h, w = self.latent_shape
        p = int(self.transformer.config.patch_size)
        patches = (h // p) * (w // p)
        out = {}
        for info in self.layers():
            n = info.name
            if n.startswith(_Y_ONLY) or re.search(r"\.attn2\.to_[kv]$", n):
                out[n] = self.max_tokens
            elif n.startswith("adaln_single.emb.resolution_embedder."):
                out[n] = 2
            elif n.startswith(_T_ONLY):
                out[n] = 1
            else:
                out[n] = patches
        return out

    # -- block-wise calibration ------------------------------------------------------------------
    def pre_block_layers(self) -> list[str]:
        return [n for n, m in self.transformer.named_modules() if is_layer(m) and n.startswith(_PRE_PREFIXES)]

    def block_tail(self, hidden: torch.Tensor, call) -> torch.Tensor:
        """diffusers' PixArtTransformer2DModel.forward after the blocks (final modulation with the
        embedded timestep, recomputed from call.t; projection; unpatchify), then `denoise`'s channel drop."""
        tr = self.transformer
        b = hidden.shape[0]
        added = self._added_cond(b, call.out_shape) or {"resolution": None, "aspect_ratio": None}
        embedded_timestep = tr.adaln_single.emb(self._timesteps(call.t, b), **added, batch_size=b,
                                                hidden_dtype=hidden.dtype)
        shift, scale = (tr.scale_shift_table[None] + embedded_timestep[:, None].to(tr.scale_shift_table.device)
                        ).chunk(2, dim=1)
        h = tr.norm_out(hidden)
        h = h * (1 + scale.to(h.device)) + shift.to(h.device)
        h = tr.proj_out(h).squeeze(1)
        p, c = tr.config.patch_size, tr.out_channels
        hh, ww = call.out_shape[-2] // p, call.out_shape[-1] // p
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, hh, ww, p, p, c))
        out = h.reshape(-1, c, hh * p, ww * p)
        return out[:, : call.out_shape[1]].to(call.out_dtype)

    def conditioning_layers(self) -> dict[str, object]:
        """adaln_single's linears (inputs: functions of t and the fixed image size) and the caption
        projection (inputs: functions of the prompt), all in the "pre" segment."""
        return {n: "pre" for n, m in self.transformer.named_modules()
                if is_layer(m) and n.startswith((_T_ONLY, _Y_ONLY))}

    @torch.no_grad()
    def conditioning_inputs(self, segment, t: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer: input rows} of the conditioning-only layers for the conditions (t[i], y[i]): one row per
        condition for adaln_single's linears (two per condition for the size embedders, which embed h and w
        apart), the real (unmasked) token rows of prompt y[i] for the caption projection."""
        if segment != "pre":
            raise ValueError(f"PixArt's conditioning-only layers are all in segment 'pre', not {segment!r}")
        tr = self.transformer
        got: dict[str, torch.Tensor] = {}
        hooks, modules = [], []
        for prefix, root in (("adaln_single.", tr.adaln_single), ("caption_projection.", tr.caption_projection)):
            for sub, mod in root.named_modules():
                if is_layer(mod):
                    name = prefix + sub
                    modules.append(mod)
                    hooks.append(mod.register_forward_pre_hook(
                        lambda m, args, name=name: got.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))))
        try:
            with full_precision([m for m in modules if hasattr(m, "quant_enabled")]):  # as the stats pass runs them
                b = len(t)
                tr.adaln_single(self._timesteps(t, b), self._added_cond(b, (1, 1, *self.latent_shape[1:])),
                                batch_size=b, hidden_dtype=self.dtype)
                embeds, mask, _ = self._require_bank().lookup(y, self.device, self.dtype)
                tr.caption_projection(embeds[mask.bool()])
        finally:
            for h in hooks:
                h.remove()
        return got
