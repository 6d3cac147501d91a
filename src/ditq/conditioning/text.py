"""The text embeddings of a run: encode the prompts it needs once, cache them, free the encoder.

    bank = prepare_text(adapter, conditions, indices, cache=DiskCache(run.paths.cache_dir))

`indices` are the condition indices the run will ask `denoise` for (evaluation, calibration and
diagnostics seeds together: the bank holds exactly these prompts plus the empty prompt -1, the
unconditional branch, always). Their prompts are encoded in batches by the model's
`TextEncoder` and stored in the `DiskCache` (kind `text_embeddings`), keyed by the encoder's
fingerprint and the digest of the exact prompt list, so a second run on the same prompts reads
them back and never loads the encoder (T5-XXL alone is ~9.5 GB in bf16). On a miss the encoder
is loaded (`adapter.text_encoder()`), used, `release()`d and garbage-collected before this
returns, so it never sits in memory next to the denoiser. The bank goes to
`adapter.set_text_bank(bank)` and is returned; `bank.stats` says what happened (cache hit, the
seconds encoding took, whether the encoder was loaded by this call) for the run's log and row.

Adapter hook (optional): `adapter.text_encoder_fingerprint() -> dict | None`, the identity
`TextEncoder.fingerprint()` would give, computed WITHOUT loading the weights (e.g. the whole-file
hashes of text_encoder/ and tokenizer/). Without it (missing, NotImplementedError or None) the
encoder is loaded to read its fingerprint, even on a cache hit, and released again. When the
encoder is loaded anyway, the hook's value must equal the loaded encoder's `fingerprint()`, else
`TextEncoderMismatchError` (a wrong key would serve another encoder's embeddings).
"""
from __future__ import annotations

import gc
import logging
import time
import torch
from tqdm.auto import tqdm

from ditq.conditioning.bank import TextBank
from ditq.conditioning.base import NULL_PROMPT, Conditions
from ditq.conditioning.encoder import TextEncoderMismatchError
from ditq.data.captions import pool_digest
from ditq.utils.cache import DiskCache, canonical_json, content_key

log = logging.getLogger(__name__)

TEXT_VERSION = 1  # bump when the payload layout or the encoding procedure changes
CACHE_KIND = "text_embeddings"


def bank_indices(conditions: Conditions, indices) -> torch.Tensor:
    """The sorted unique prompt indices of `indices`, plus the empty prompt -1; out-of-pool indices refused."""
    idx = torch.as_tensor(indices if isinstance(indices, torch.Tensor) else list(indices), dtype=torch.long).flatten()
    idx = torch.unique(torch.cat([idx.cpu(), torch.tensor([NULL_PROMPT])]))
    size = len(conditions)
    bad = idx[(idx < NULL_PROMPT) | (idx >= size)]
    if len(bad):
        raise ValueError(f"prompt indices {bad[:8].tolist()} are outside the prompt pool of {size} prompts "
                         f"(valid: -1 for the empty prompt, 0..{size - 1})")
    return idx


def _encoder_fingerprint_without_loading(adapter) -> dict | None:
    hook = getattr(adapter, "text_encoder_fingerprint", None)
    if not callable(hook):
        return None
    try:
        return hook()
    except NotImplementedError:
        return None


def _cat_rows(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    """Concatenate batch outputs along rows, zero-padding dim 1 (tokens) to the longest batch."""
    if len({p.shape[1:] for p in parts}) == 1:
        return torch.cat(parts)
    if any(p.dim() < 2 for p in parts) or len({(p.dim(),) + tuple(p.shape[2:]) for p in parts}) != 1:
        raise TextEncoderMismatchError(f"text encoder output {name!r}: batches give incompatible shapes "
                                       f"{sorted({tuple(p.shape[1:]) for p in parts})}")
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, [0, 0] * (p.dim() - 2) + [0, width - p.shape[1]]) for p in parts])


def encode_prompts(encoder, prompts: list[str], batch_size: int = 64, progress: bool = True) -> dict:
    """{"embeds" [N, L, D], "mask" [N, L], "extra": {name: [N, ...]}} of `prompts` (each distinct text encoded once)."""
    unique = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(unique)}
    outs: dict[str, list[torch.Tensor]] = {}
    starts = range(0, len(unique), batch_size)
    for s in tqdm(starts, desc=f"text encoder ({getattr(encoder, 'name', 'text')})", unit="batch",
                  disable=not progress, leave=False):
        batch = unique[s:s + batch_size]
        out = encoder.encode(batch)
        missing = {"embeds", "mask"} - set(out)
        if missing:
            raise TextEncoderMismatchError(
                f"text encoder {type(encoder).__name__}.encode returned no {sorted(missing)}")
        for k, v in out.items():
            v = torch.as_tensor(v).detach().cpu()
            if v.shape[0] != len(batch):
                raise TextEncoderMismatchError(
                    f"text encoder output {k!r} has {v.shape[0]} rows for {len(batch)} prompts")
            outs.setdefault(k, []).append(v)
    cat = {k: _cat_rows(v, k) for k, v in outs.items()}
    embeds, mask = cat.pop("embeds"), cat.pop("mask")
    if embeds.dim() != 3 or tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise TextEncoderMismatchError(f"text encoder gave embeds {tuple(embeds.shape)} and mask {tuple(mask.shape)}; "
                                       "expected [N, L, D] and [N, L]")
    rows = torch.tensor([where[p] for p in prompts], dtype=torch.long)
    return {"embeds": embeds[rows].contiguous(), "mask": mask[rows].contiguous(),
            "extra": {k: v[rows].contiguous() for k, v in cat.items()}}


def prepare_text(adapter, conditions: Conditions, indices, cache: DiskCache | None = None, progress: bool = True,
                 batch_size: int = 64) -> TextBank:
    """The `TextBank` of `indices` (plus -1) for `adapter`, from the cache or encoded now (see the module doc).

    The bank is also handed to `adapter.set_text_bank`; `bank.stats`: {"prompts", "cached", "encode_s" (time
    the encoding took, now or when the cached entry was built), "encoder_loaded", "seconds" (this call), "key"}."""
    if getattr(conditions, "kind", None) != "text":
        raise ValueError(f"prepare_text needs prompt conditions (kind 'text'), got {type(conditions).__name__} "
                         f"(kind {getattr(conditions, 'kind', None)!r}): only text-to-image models take prompts")
    t0 = time.perf_counter()
    idx = bank_indices(conditions, indices)
    prompts = conditions.prompts(idx)
    loaded = {"encoder": None, "count": 0}

    def load():
        if loaded["encoder"] is None:
            loaded["encoder"] = adapter.text_encoder()
            loaded["count"] += 1
        return loaded["encoder"]

    try:
        fp = _encoder_fingerprint_without_loading(adapter)
        if fp is None:
            fp = load().fingerprint()
        spec = {"v": TEXT_VERSION, "encoder": fp, "prompts": pool_digest(prompts), "n": len(prompts)}

        def build():
            enc = load()
            actual = enc.fingerprint()
            if canonical_json(actual) != canonical_json(fp):
                raise TextEncoderMismatchError(
                    f"{type(adapter).__name__}.text_encoder_fingerprint() = {canonical_json(fp)[:200]} differs from "
                    f"the loaded encoder's fingerprint() = {canonical_json(actual)[:200]}; the two must agree (they "
                    "key the text-embedding cache)")
            return encode_prompts(enc, prompts, batch_size=batch_size, progress=progress)

        if cache is not None:
            rec = cache.get_or_create_record(CACHE_KIND, spec, build)
            payload, cached, encode_s = rec.value, rec.cached, rec.build_seconds
        else:
            t1 = time.perf_counter()
            payload, cached = build(), False
            encode_s = time.perf_counter() - t1
    finally:
        if loaded["encoder"] is not None:  # free the weights before the denoiser runs
            loaded["encoder"].release()
            loaded["encoder"] = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if payload["embeds"].shape[0] != len(idx):
        raise ValueError(f"text-embedding entry {content_key(spec)} has {payload['embeds'].shape[0]} rows for "
                         f"{len(idx)} prompts")
    bank = TextBank(idx, payload["embeds"], payload["mask"], dict(payload["extra"]), encoder=fp)
    bank.stats = {"prompts": len(idx), "cached": cached, "encode_s": encode_s, "encoder_loaded": loaded["count"] > 0,
                  "seconds": time.perf_counter() - t0, "key": content_key(spec)}
    log.info("text embeddings of %d prompts: %s (encoding %s s)", len(idx), "cache hit" if cached else "encoded",
             "?" if encode_s is None else f"{encode_s:.2f}")
    adapter.set_text_bank(bank)
    return bank

