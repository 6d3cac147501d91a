"""Train the embedded tiny CLIP on scikit-learn's digits with their captions, and ship it twice:
as a transformers CLIP directory (for the CLIP score) and as an open_clip checkpoint (for HPSv2).

    python -m ditq.train.tiny_clip [--steps 1200] [--threads 1] [--out src/ditq/assets/tiny_clip_digits]

What it is. transformers' `CLIPModel` (the real CLIP architecture: ViT image tower with class-token
pooling, causal text transformer pooled at the end token, linear projections, learned logit scale)
at a small size, built from an open_clip model config (`arch()`) with `ditq.metrics.hps.clip_config`,
so that both scorers see the very same network: vision 32 px, patch 4, width 64, 2 layers,
2 heads; text width 64, 2 layers, 2 heads, context 16; embedding 32; exact GELU, LayerNorm eps 1e-5.

Tokenizer. OpenAI CLIP's byte-level BPE format ("</w>" end-of-word suffix) with a merges list built
here: for every word of the caption pool (`ditq.data.captions`), the merges that build it left to
right, longest words first, so that every caption word is one token (checked when built). Numerals
are single characters, i.e. byte tokens. The vocabulary is OpenAI's layout: 256 byte symbols, the
same with "</w>", one token per merge, `<|startoftext|>`, `<|endoftext|>` (the largest id, where
both towers pool). It is written as `vocab.json` + `merges.txt` for transformers' CLIPTokenizer and
as `hps/bpe_simple_vocab_16e6.txt.gz` for `ClipBPETokenizer` (HPSv2's tokenizer); both give the
same ids (tested).

Training. Contrastive, as CLIP: embeddings normalised, logits = exp(logit_scale) * cos, symmetric
cross-entropy over the batch, logit_scale learned (CLIP's init 1/0.07, clamped at 100). A batch of
256 digits holds ~25 images of each digit, so plain InfoNCE would push an image away from the
caption of another image of the same digit; the targets here are instead uniform over every pair
whose digits agree (the multi-positive form of CLIP's loss, as UniCL / SupCon): image i's target
distribution over the batch's captions is uniform over the captions of digit_i, and the same for
captions over images. One random caption per image per step (`random_caption_indices`). Images go
through the scorers' own preprocessing, so the model is trained on what it is scored on: mostly
ClipScorer's (PIL bicubic resize of the uint8 grey image repeated to RGB, then CLIP mean/std), and a
quarter of the time HPSv2Scorer's (torch bicubic resize of the [0, 1] float image, CLIP mean/std).
Augmentation: a random shift of -1, 0 or +1 pixel per axis (background fill) and, for half of the
images, Gaussian noise (std 0.1 in model space [-1, 1]) before quantisation to uint8, so that the
model also reads imperfect samples of a generator.

What the scores mean on the embedded model. `clip_score` with this model is the CLIP score formula
(100 * max(cos, 0)) with a CLIP trained on 1797 digits: it measures how well a generated digit
agrees with its caption, on a scale of its own, not comparable with any published CLIP score.
"hpsv2" with `hps_path` pointing at `hps/tiny_hps.pt` is HPSv2's code path (open_clip checkpoint
conversion, HPSv2's preprocessing and tokenizer, cosine score) running this tiny CLIP's weights:
it measures image-caption agreement, NOT human preference; no human preference data went into it.
Its numbers equal the CLIP-score cosines up to the two scorers' different resizes (PIL bicubic on
uint8 vs torch bicubic on floats), i.e. hpsv2 ~= clip_similarity / 100.

Point the scorers at it with the evaluator options (`eval_options()` returns them):
    clip_model:    <assets>/tiny_clip_digits
    hps_path:      <assets>/tiny_clip_digits/hps/tiny_hps.pt
    hps_tokenizer: <assets>/tiny_clip_digits/hps
(`hps_version` is only a label here; the checkpoint file is named explicitly.) The open_clip model
config `hps/open_clip_config.json` next to the checkpoint gives HPSv2Scorer the small architecture.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ditq.data.captions import CAPTION_DIGITS, DIGIT_CAPTIONS, TEMPLATES, random_caption_indices
from ditq.data.digits import NUM_CLASSES, load_digits_tensors, split_indices, to_uint8
from ditq.paths import ASSETS_DIR

DEFAULT_OUT = ASSETS_DIR / "tiny_clip_digits"
HPS_SUBDIR = "hps"
HPS_CHECKPOINT = "tiny_hps.pt"
HPS_ARCH_FILE = "open_clip_config.json"  # open_clip's hub name: {"model_cfg": ..., "preprocess_cfg": ...}
BPE_GZ = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
CONTEXT = 16
IMAGE_SIZE = 32
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# CLIP's split of a cleaned text into words (open_clip and transformers' CLIPTokenizer use the same).
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def arch(vocab_size: int) -> dict:
    """The open_clip model config (the layout `ditq.metrics.hps.merge_arch` takes)."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4,
                       "mlp_ratio": 4.0},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": vocab_size, "width": 64, "heads": 2, "layers": 2,
                     "mlp_ratio": 4.0},
    }


# ---------------------------------------------------------------------------------------------
# Tokenizer: a CLIP BPE whose merges make every caption word one token
# ---------------------------------------------------------------------------------------------
def caption_words(captions=DIGIT_CAPTIONS) -> list[str]:
    """The distinct words of `captions` as CLIP splits them (lower case), in byte-unicode symbols."""
    import regex

    from ditq.metrics.t2i_common import byte_to_unicode

    split = regex.compile(WORD_PATTERN, regex.IGNORECASE)
    to_uni = byte_to_unicode()
    words = {"".join(to_uni[b] for b in w.encode("utf-8")) for c in captions for w in split.findall(c.lower())}
    return sorted(words)


def _symbols(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + "</w>"]


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """OpenAI CLIP's BPE of one word (lowest-ranked pair first), as both tokenizers apply it."""
    from ditq.metrics.t2i_common import bpe_merge

    return bpe_merge(_symbols(word), ranks)


def build_merges(words) -> list[tuple[str, str]]:
    """For every word (longest first), the merges that build it left to right; each word's first
    merges are shared with earlier words when they coincide. Raises if a word is not one token."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted(words, key=lambda w: (-len(w), w)):
        parts = _symbols(word)
        prefix = parts[0]
        for nxt in parts[1:]:
            pair = (prefix, nxt)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            prefix += nxt
    ranks = {m: i for i, m in enumerate(merges)}
    split = [w for w in words if len(bpe(w, ranks)) != 1]
    if split:
        raise RuntimeError(f"the caption merges leave words in pieces: {split[:5]} (reorder build_merges)")
    return merges


def vocab_tokens(merges) -> list[str]:
    """OpenAI CLIP's vocabulary order: bytes, bytes + "</w>", merges, start, end."""
    from ditq.metrics.t2i_common import byte_to_unicode

    symbols = list(byte_to_unicode().values())
    return symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]


def write_tokenizer(merges, out: Path) -> None:
    """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (transformers' CLIPTokenizer)."""
    vocab = {tok: i for i, tok in enumerate(vocab_tokens(merges))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT, "do_lower_case": True,
         "clean_up_tokenization_spaces": False, **specials}, indent=1))


def write_bpe_gz(merges, path: Path) -> None:
    """OpenAI's `bpe_simple_vocab_16e6.txt.gz` format: a header line, then one merge per line."""
    text = "#version: 0.2 (ditq tiny_clip_digits: caption-word merges)\n" + "".join(f"{a} {b}\n" for a, b in merges)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(text.encode("utf-8"))


def caption_ids(merges) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [P, CONTEXT] and mask of every caption of the pool: start, words, end, end-padding
    (what transformers' CLIPTokenizer gives; the pooled end token is the same)."""
    import regex

    from ditq.metrics.t2i_common import byte_to_unicode

    vocab = {tok: i for i, tok in enumerate(vocab_tokens(merges))}
    ranks = {m: i for i, m in enumerate(merges)}
    split, to_uni = regex.compile(WORD_PATTERN, regex.IGNORECASE), byte_to_unicode()
    ids = torch.full((len(DIGIT_CAPTIONS), CONTEXT), vocab[EOT], dtype=torch.long)
    mask = torch.zeros((len(DIGIT_CAPTIONS), CONTEXT), dtype=torch.long)
    for row, cap in enumerate(DIGIT_CAPTIONS):
        words = ["".join(to_uni[b] for b in w.encode("utf-8")) for w in split.findall(cap.lower())]
        toks = [vocab[SOT]] + [vocab[t] for w in words for t in bpe(w, ranks)] + [vocab[EOT]]
        if len(toks) > CONTEXT:
            raise ValueError(f"caption {cap!r} has {len(toks)} tokens; the context is {CONTEXT}")
        ids[row, :len(toks)] = torch.tensor(toks)
        mask[row, :len(toks)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Model and its open_clip copy
# ---------------------------------------------------------------------------------------------
def build_model(vocab_size: int):
    """transformers CLIPModel from the open_clip config (the same network HPSv2Scorer builds)."""
    from transformers import CLIPModel

    from ditq.metrics.hps import clip_config, merge_arch

    return CLIPModel(clip_config(merge_arch(arch(vocab_size))))


_BLOCK_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def transformers_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `ditq.metrics.hps.open_clip_to_transformers`: q/k/v packed into
    `in_proj_weight`/`in_proj_bias`, projections transposed to open_clip's `x @ proj`."""
    from ditq.metrics.hps import _DIRECT, _TRANSPOSED

    direct = {v: k for k, v in _DIRECT.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in direct:
            out[direct[key]] = value.clone()
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        else:
            tower, rest = key.split(".encoder.layers.", 1)
            index, part = rest.split(".", 1)
            prefix = {"vision_model": "visual.transformer", "text_model": "transformer"}[tower]
            base = f"{prefix}.resblocks.{index}"
            module, kind = part.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                packed.setdefault(f"{base}.attn.in_proj_{kind}", {})[module[-6]] = value
            else:
                out[f"{base}.{_BLOCK_PARTS[module]}.{kind}"] = value.clone()
    for key, qkv in packed.items():
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0).contiguous()
    return out


def write_assets(model, merges, out: Path, meta: dict) -> None:
    """Both layouts into the (new) directory `out`."""
    hps_dir = out / HPS_SUBDIR
    hps_dir.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(merges, out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "do_convert_rgb": True}, indent=1))
    torch.save({"state_dict": transformers_to_open_clip(model.state_dict())}, hps_dir / HPS_CHECKPOINT)
    write_bpe_gz(merges, hps_dir / BPE_GZ)
    (hps_dir / HPS_ARCH_FILE).write_text(json.dumps({"model_cfg": arch(len(vocab_tokens(merges))), "preprocess_cfg": {
        "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}, indent=1))
    (out / "train_meta.json").write_text(json.dumps(meta, indent=1))
    for f in out.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)  # save_pretrained leaves the weights owner-only


def save(model, merges, out: Path, meta: dict, evaluate_fn=None) -> dict:
    """Write, check (evaluate_fn(dir) -> dict, added to train_meta.json) and only then replace `out`:
    a failure leaves the previous model untouched."""
    import shutil

    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write_assets(model, merges, tmp, meta)
    if evaluate_fn is not None:
        meta = {**meta, "eval_on_real_digits": evaluate_fn(tmp)}
        (tmp / "train_meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.replace(old)
    tmp.replace(out)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def eval_options(path: str | Path = DEFAULT_OUT) -> dict:
    """The evaluator options that point `clip` and `hpsv2` at the tiny CLIP in `path`."""
    path = Path(path)
    return {"clip_model": str(path), "hps_path": str(path / HPS_SUBDIR / HPS_CHECKPOINT),
            "hps_tokenizer": str(path / HPS_SUBDIR)}


# ---------------------------------------------------------------------------------------------
# Data: the scorers' preprocessing with augmentation
# ---------------------------------------------------------------------------------------------
def shift(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, fill: float = -1.0) -> torch.Tensor:
    """Shift each [1, H, W] image by (dy, dx) pixels, filling with `fill` (the background)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1), value=fill)
    rows = (torch.arange(h).view(1, h) + 1 - dy.view(n, 1)).view(n, 1, h, 1).expand(n, 1, h, w + 2)
    out = padded.gather(2, rows)
    cols = (torch.arange(w).view(1, w) + 1 - dx.view(n, 1)).view(n, 1, 1, w).expand(n, 1, h, w)
    return out.gather(3, cols)


def clip_pixels(uint8_rgb: torch.Tensor) -> torch.Tensor:
    """ClipScorer's preprocessing of this model (PIL bicubic to 32 px, center crop, CLIP mean/std)."""
    from ditq.metrics.t2i_common import normalize, pil_resize_crop, to_unit_float

    return normalize(to_unit_float(pil_resize_crop(uint8_rgb, IMAGE_SIZE, IMAGE_SIZE, "floor")), CLIP_MEAN, CLIP_STD)


def hps_pixels(uint8_rgb: torch.Tensor) -> torch.Tensor:
    """HPSv2Scorer's preprocessing (torch bicubic of the [0, 1] float image, CLIP mean/std)."""
    from ditq.metrics.t2i_common import normalize, tensor_resize_longest_pad, to_unit_float

    return normalize(tensor_resize_longest_pad(to_unit_float(uint8_rgb), IMAGE_SIZE), CLIP_MEAN, CLIP_STD)


def augmented_pixels(x: torch.Tensor, gen: torch.Generator, noise_std: float = 0.1, p_noise: float = 0.5,
                     p_hps: float = 0.25) -> torch.Tensor:
    """Model-space digits [B,1,8,8] -> normalised pixels [B,3,32,32] (see the module docstring)."""
    b = x.shape[0]
    dy, dx = torch.randint(-1, 2, (b,), generator=gen), torch.randint(-1, 2, (b,), generator=gen)
    x = shift(x, dy, dx)
    noisy = (torch.rand(b, generator=gen) < p_noise).view(b, 1, 1, 1)
    x = torch.where(noisy, x + noise_std * torch.randn(x.shape, generator=gen), x)
    rgb = to_uint8(x).repeat(1, 3, 1, 1)
    use_hps = torch.rand(b, generator=gen) < p_hps
    out = clip_pixels(rgb)
    if use_hps.any():
        out[use_hps] = hps_pixels(rgb[use_hps])
    return out


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                             img_digits: torch.Tensor, txt_digits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with targets uniform over the pairs whose digits agree."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    pos = (img_digits.view(-1, 1) == txt_digits.view(1, -1)).float()
    loss_i = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(pos.t() / pos.t().sum(1, keepdim=True) * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


# ---------------------------------------------------------------------------------------------
# Evaluation through the scorers
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def zero_shot(img_emb: torch.Tensor, txt_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of argmax over digits of the mean similarity to that digit's captions (pool order)."""
    sim = (img_emb @ txt_emb.t()).view(len(img_emb), NUM_CLASSES, len(TEMPLATES)).mean(-1)
    return float((sim.argmax(1) == labels).float().mean())


def matched_pairs(labels: torch.Tensor, seed: int = 0) -> tuple[list[str], list[str]]:
    """One matched and one mismatched (another digit, random) caption per image."""
    rng = np.random.default_rng(seed)
    digits = labels.numpy()
    other = (digits + rng.integers(1, NUM_CLASSES, size=len(digits))) % NUM_CLASSES
    matched = [DIGIT_CAPTIONS[i] for i in random_caption_indices(digits, rng)]
    mismatched = [DIGIT_CAPTIONS[i] for i in random_caption_indices(other, rng)]
    return matched, mismatched


def evaluate(out: Path, held_out: np.ndarray | None = None) -> dict:
    """Zero-shot accuracy and matched / mismatched scores of the saved model, through both scorers
    (on all 1797 real digits; the accuracy also on the `held_out` indices when given)."""
    from ditq.data.digits import real_digits_uint8
    from ditq.metrics.clip_score import ClipScorer
    from ditq.metrics.hps import HPSv2Scorer

    images, labels = real_digits_uint8()
    rgb = images.repeat(1, 3, 1, 1)
    matched, mismatched = matched_pairs(labels)
    opts = eval_options(out)
    clip = ClipScorer(opts["clip_model"])
    hps = HPSv2Scorer(opts["hps_path"], tokenizer=opts["hps_tokenizer"])
    result = {}
    for name, scorer in (("clip", clip), ("hps", hps)):
        img, _ = scorer.embed(rgb, ["x"] * len(rgb))
        _, txt = scorer.embed(rgb[:1], list(DIGIT_CAPTIONS))
        result[f"{name}_zero_shot_accuracy"] = round(zero_shot(img, txt, labels), 4)
        if held_out is not None and len(held_out):
            sel = torch.from_numpy(np.asarray(held_out))
            result[f"{name}_zero_shot_accuracy_held_out"] = round(zero_shot(img[sel], txt, labels[sel]), 4)
    result["clip_score_matched"] = round(float(clip.score(rgb, matched, 256).mean()), 3)
    result["clip_score_mismatched"] = round(float(clip.score(rgb, mismatched, 256).mean()), 3)
    result["hpsv2_matched"] = round(float(hps.score(rgb, matched, 256).mean()), 4)
    result["hpsv2_mismatched"] = round(float(hps.score(rgb, mismatched, 256).mean()), 4)
    return result


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="hold out this fraction of the digits (split_indices, seed 0) to measure generalisation; "
                        "the shipped model uses 0 (all digits)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    words = caption_words()
    merges = build_merges(words)
    ids_all, mask_all = caption_ids(merges)
    cap_digits = torch.tensor(CAPTION_DIGITS)
    images, labels = load_digits_tensors()
    train_idx, test_idx = split_indices(len(images), args.test_fraction, 0)
    train_idx = torch.from_numpy(train_idx)
    model = build_model(len(vocab_tokens(merges))).train()
    print(f"tiny CLIP: {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters, "
          f"{len(merges)} merges for {len(words)} words", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    t0, cpu0, running = time.time(), time.process_time(), None
    for step in range(1, args.steps + 1):
        idx = train_idx[torch.randint(0, len(train_idx), (args.batch_size,), generator=gen)]
        pixels = augmented_pixels(images[idx], gen)
        cap = torch.from_numpy(random_caption_indices(labels[idx].numpy(), rng))
        uniq, inverse = torch.unique(cap, return_inverse=True)  # encode each distinct caption once
        txt = model.text_projection(model.text_model(input_ids=ids_all[uniq], attention_mask=mask_all[uniq]).pooler_output)
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        loss = multi_positive_clip_loss(img, txt[inverse], model.logit_scale, labels[idx], cap_digits[cap])
        lr = args.lr * min(1.0, step / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == args.steps:
            el = time.time() - t0
            print(f"step {step}/{args.steps}  loss {running:.4f}  scale {model.logit_scale.exp().item():.1f}  "
                  f"{el:.0f}s ({el / step:.3f}s/step)", flush=True)
    train_seconds, cpu_seconds = round(time.time() - t0, 1), round(time.process_time() - cpu0, 1)
    out = Path(args.out)
    meta = {"arch": arch(len(vocab_tokens(merges))), "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed, "threads": args.threads,
            "train_images": len(train_idx), "held_out_images": len(test_idx),
            "loss": "multi-positive symmetric InfoNCE (captions of the same digit are positives)",
            "final_loss_ema": round(running, 4), "logit_scale": round(model.logit_scale.exp().item(), 2),
            "train_seconds": train_seconds, "train_cpu_seconds": cpu_seconds, "torch": torch.__version__}
    meta = save(model.eval(), merges, out, meta, evaluate_fn=lambda d: evaluate(d, test_idx))
    print(json.dumps(meta["eval_on_real_digits"], indent=1))
    print(f"saved {out} after {train_seconds:.0f}s of training ({cpu_seconds:.0f} CPU seconds)")


if __name__ == "__main__":
    main()
