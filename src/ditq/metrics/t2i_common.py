"""Shared pieces of the text-to-image scorers (CLIP score, ImageReward, HPSv2).

One job each, no model code:
  * input checks: images must be uint8 [N, 3, H, W], prompts a list of str of the same length;
  * file resolution: a local file / directory, or a Hugging Face Hub repo (cache or download),
    with an error that names the missing file and where to get it;
  * image preprocessing in the two flavours the upstream scorers use:
      - `pil_resize_crop`: PIL bicubic resize of the shorter side + center crop on uint8
        pixels (OpenAI CLIP `preprocess`, ImageReward, transformers' CLIPImageProcessor);
      - `tensor_resize_longest_pad`: torch bicubic (antialiased) resize of the float [0, 1]
        tensor so that the longer side fits, then zero padding to a square (open_clip's
        `ResizeMaxSize`, which HPSv2 selects with `light_augmentation=True`; ToTensor comes
        *before* the resize there);
    then `normalize` with the OpenAI CLIP mean/std;
  * `ClipBPETokenizer`: OpenAI CLIP's byte-level BPE with open_clip's conventions (ftfy +
    double html-unescape, whitespace collapse, lower case, 77-token context, zero padding,
    truncation that keeps the end-of-text token), read from the user's
    `bpe_simple_vocab_16e6.txt.gz` or a Hub `merges.txt`.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# OpenAI CLIP's normalisation constants (also ImageReward's and open_clip's defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Center-crop offset rules: torchvision rounds (half to even), transformers floors. They differ
# when the excess (resized side - crop) is 3 mod 4, e.g. a 300x227 image at 224 px.
CROP_OFFSET_RULES = ("round", "floor")


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def check_images(images) -> torch.Tensor:
    """Return `images` if it is a uint8 tensor [N, 3, H, W] with N >= 1; raise otherwise."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"images must be a torch.Tensor of dtype uint8 and shape [N, 3, H, W]; got {type(images).__name__}"
        )
    if images.dtype != torch.uint8:
        hint = ""
        if images.is_floating_point() and images.numel():
            lo, hi = float(images.min()), float(images.max())
            hint = (
                f" (values in [{lo:.3g}, {hi:.3g}]; convert [0, 1] floats with "
                "(x * 255).round().clamp(0, 255).to(torch.uint8), [-1, 1] floats with "
                "((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))"
            )
        raise TypeError(f"images must have dtype torch.uint8 with values in [0, 255]; got {images.dtype}{hint}")
    if images.ndim != 4 or images.shape[1] != 3:
        hint = ""
        if images.ndim == 4 and images.shape[-1] == 3:
            hint = " (this looks like NHWC: use images.permute(0, 3, 1, 2))"
        elif images.ndim == 3 and images.shape[0] == 3:
            hint = " (a single image: use images.unsqueeze(0))"
        raise ValueError(f"images must have shape [N, 3, H, W]; got {tuple(images.shape)}{hint}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must be non-empty; got shape {tuple(images.shape)}")
    return images


def check_prompts(prompts, n_images: int) -> list[str]:
    """Return `prompts` as a list of str with one prompt per image; raise otherwise."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of str (one per image); got {type(prompts).__name__}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must all be str; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}")
    if len(prompts) != n_images:
        raise ValueError(f"got {len(prompts)} prompts for {n_images} images: one prompt per image is required")
    return list(prompts)


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    return batch_size


def score_in_batches(images, prompts, batch_size: int, score_batch) -> torch.Tensor:
    """Check the inputs, then `score_batch(images[i:j], prompts[i:j]) -> Tensor[j-i]` batch by
    batch; returns float64 [N] on the CPU."""
    images = check_images(images)
    prompts = check_prompts(prompts, images.shape[0])
    batch_size = check_batch_size(batch_size)
    out = [score_batch(images[i:i + batch_size], prompts[i:i + batch_size]).double().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Files: local path or Hugging Face Hub
# ---------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".json", ".txt", ".gz", ".safetensors")


def looks_like_hub_id(source: str) -> bool:
    """`org/name` or a legacy bare `name` (e.g. bert-base-uncased) that is not an existing path."""
    s = str(source)
    return bool(_HUB_ID.fullmatch(s)) and not s.endswith(_FILE_SUFFIXES) and not Path(s).exists()


def resolve_file(source: str | os.PathLike, filename: str, *, what: str, setting: str, hub_repo: str | None = None,
                 hub_filename: str | None = None) -> Path:
    """Find `filename` for `what`.

    `source` is a file (used as is), a directory holding `filename`, or a Hub repo id (the file
    `hub_filename or filename` is taken from the local Hub cache, or downloaded when online).
    Raises FileNotFoundError naming the file, where to download it and which setting to pass.
    """
    source_str = str(source)
    path = Path(source_str).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return candidate.resolve()
        reason = f"directory {path} has no {filename}"
    elif looks_like_hub_id(source_str):
        repo = source_str
        name = hub_filename or filename
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id=repo, filename=name))
        except Exception as exc:  # offline without cache, missing repo/file, no network
            reason = f"{name} of Hub repo {repo!r} is not in the local Hub cache and could not be downloaded ({type(exc).__name__})"
            hub_repo = repo
    else:
        reason = f"{source_str!r} does not exist"
    where = f"https://huggingface.co/{hub_repo}/blob/main/{hub_filename or filename}" if hub_repo else "its publisher"
    raise FileNotFoundError(
        f"{what}: {reason}. Download {hub_filename or filename} by hand from {where} and pass its path "
        f"(or the directory holding it) as `{setting}`."
    )


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path: str | os.PathLike, *, what: str, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """Load a torch checkpoint (tensors only, `weights_only=True`); optionally take `ckpt[nested_key]`."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{what}: cannot read {path} as a torch checkpoint: {exc}") from exc
    if nested_key is not None and isinstance(obj, dict) and nested_key in obj:
        obj = obj[nested_key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{what}: {path} is not a state dict of tensors"
            + (f" (nor a dict holding one under {nested_key!r})" if nested_key else "")
        )
    return obj


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], *, what: str,
                     path, ignorable: Sequence[str] = ()) -> None:
    """Raise ValueError unless `state` has exactly the `expected` keys and shapes.

    Keys starting with any `ignorable` prefix may be present in `state` without being expected.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not any(k.startswith(p) for p in ignorable))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs architecture {tuple(expected[k])}"
        for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:
        def head(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        lines = [f"{what}: checkpoint {path} does not match the architecture."]
        if missing:
            lines.append(f"missing {len(missing)} keys: {head(missing)}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} keys: {head(unexpected)}")
        if mismatched:
            lines.append(f"{len(mismatched)} shape mismatches: {head(mismatched)}")
        raise ValueError("\n  ".join(lines))


def read_json_file(path: str | os.PathLike, *, what: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: {path} is not valid JSON ({exc})") from exc


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------
def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) when the shorter side is resized to `size` (torchvision / transformers rule)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def crop_offsets(height: int, width: int, crop: int, rule: str) -> tuple[int, int]:
    if rule not in CROP_OFFSET_RULES:
        raise ValueError(f"crop offset rule must be one of {CROP_OFFSET_RULES}; got {rule!r}")
    if height < crop or width < crop:
        raise ValueError(f"cannot center-crop {crop} px from a {height}x{width} image")
    if rule == "round":
        return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    return (height - crop) // 2, (width - crop) // 2


def pil_resize_crop(images: torch.Tensor, size: int, crop: int, crop_rule: str) -> torch.Tensor:
    """uint8 [N,3,H,W] -> uint8 [N,3,crop,crop]: PIL bicubic shorter-side resize, center crop.

    The resize is skipped when the image already has the target size (as torchvision does; PIL
    returns an identical copy then anyway).
    """
    from PIL import Image

    out = torch.empty((images.shape[0], 3, crop, crop), dtype=torch.uint8)
    for i, img in enumerate(images):
        h, w = img.shape[1:]
        new_h, new_w = resized_size(h, w, size)
        arr = img.permute(1, 2, 0).contiguous().cpu().numpy()
        if (new_h, new_w) != (h, w):
            arr = np.asarray(Image.fromarray(arr).resize((new_w, new_h), resample=Image.BICUBIC))
        top, left = crop_offsets(new_h, new_w, crop, crop_rule)
        out[i] = torch.from_numpy(np.array(arr[top:top + crop, left:left + crop])).permute(2, 0, 1)
    return out


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1], exactly as torchvision's ToTensor (x / 255 in float32)."""
    return images.to(torch.float32).div(255)


def tensor_resize_longest_pad(images01: torch.Tensor, size: int) -> torch.Tensor:
    """float [N,3,H,W] in [0,1] -> float [N,3,size,size], as open_clip's `ResizeMaxSize` (which HPSv2
    uses): the longer side to `size` (each side round(side * size / longer), Python rounding) by a
    torch bicubic antialiased resize without clamping (torchvision's float-tensor resize), then zero
    padding split as (pad // 2, pad - pad // 2) on (left, right) and (top, bottom).

    Images of different sizes cannot share a batch tensor, so all N have the same H, W here.
    Upstream skips resize *and* padding when the longer side already equals `size` (a non-square
    image then fails in the model); here such an image is padded.
    """
    h, w = images01.shape[-2:]
    scale = size / float(max(h, w))
    x = images01
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False,
                                            antialias=True)
    pad_h, pad_w = size - x.shape[-2], size - x.shape[-1]
    if pad_h or pad_w:
        x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return x


def normalize(x01: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    return (x01 - m) / s


# ---------------------------------------------------------------------------------------------
# OpenAI CLIP byte-level BPE with open_clip's conventions
# ---------------------------------------------------------------------------------------------
CLIP_N_MERGES = 49152 - 256 - 2  # merges OpenAI CLIP uses from its BPE file (48894)
OPEN_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")


@lru_cache()
def byte_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def read_bpe_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Merges from `bpe_simple_vocab_16e6.txt.gz` (gzip) or a Hub `merges.txt` (first line is a header)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")[1:1 + CLIP_N_MERGES]
    merges = []
    for n, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"BPE merges file {path}: line {n} is not a pair of symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ValueError(f"BPE merges file {path} holds no merges")
    return merges


def bpe_merge(parts: list[str], ranks: dict) -> list[str]:
    """OpenAI CLIP's byte-pair merging of one word's symbols: the lowest-ranked adjacent pair first,
    until no pair of `ranks` is left."""
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


class ClipBPETokenizer:
    """OpenAI CLIP's BPE tokenizer as open_clip (and so HPSv2) applies it.

    ids: 256 byte symbols, the same with an end-of-word mark, one per merge, then
    `<start_of_text>`, `<end_of_text>`. `__call__` returns [B, context_length] int64:
    start, tokens, end, zero padding; too long prompts are cut and end with the end token.
    """

    def __init__(self, merges_path: str | os.PathLike, context_length: int = 77):
        import ftfy  # noqa: F401  (imported here so that a missing package fails at construction)
        import regex

        self.merges_path = str(merges_path)
        merges = read_bpe_merges(merges_path)
        symbols = list(byte_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(OPEN_CLIP_SPECIALS)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot_id = self.encoder[OPEN_CLIP_SPECIALS[0]]
        self.eot_id = self.encoder[OPEN_CLIP_SPECIALS[1]]
        self.vocab_size = len(vocab)
        self.context_length = context_length
        specials = "|".join(OPEN_CLIP_SPECIALS)
        self._split = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
        self._ws = regex.compile(r"\s+")
        self._cache: dict[str, list[str]] = {s: [s] for s in OPEN_CLIP_SPECIALS}

    def check_hub_vocab(self, vocab_json: str | os.PathLike) -> None:
        """Check a Hub `vocab.json` (same BPE, `<|startoftext|>` names) against the derived vocab."""
        hub = read_json_file(vocab_json, what="CLIP BPE vocab")
        ours = {t: i for t, i in self.encoder.items() if t not in OPEN_CLIP_SPECIALS}
        if not isinstance(hub, dict) or any(hub.get(t) != i for t, i in ours.items()):
            raise ValueError(f"{vocab_json} does not match the BPE merges in {self.merges_path}")

    def clean(self, text: str) -> str:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return self._ws.sub(" ", text).strip().lower()

    def _bpe(self, word: str) -> list[str]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = bpe_merge(list(word[:-1]) + [word[-1] + "</w>"], self.ranks)
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        to_uni = byte_to_unicode()
        ids: list[int] = []
        for piece in self._split.findall(self.clean(text)):
            word = "".join(to_uni[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(word))
        return ids

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
