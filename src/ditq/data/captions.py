"""Captions of the bundled digits: the prompt pool of the embedded text-to-image model.

Every caption names one digit, as a word or a numeral, in one of a fixed list of templates
("a handwritten seven", "the digit 7", ...). The pool is the product digits x templates in a
fixed order, so a caption's index in `DIGIT_CAPTIONS` identifies it everywhere (prompt indices
are what calibration records and conditions store) and `CAPTION_DIGITS[i]` is the digit that
caption asks for (prompt accuracy reads it).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from ditq.data.digits import NUM_CLASSES

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the digit as a word, {n}: as a numeral. Training uses every template; all are in the pool.
TEMPLATES = (
    "a handwritten {w}",
    "the digit {n}",
    "the digit {w}",
    "a {w} written by hand",
    "the number {w}",
    "a drawing of the number {n}",
    "a scanned digit {w}",
    "{w}",
    "{n}",
    "a small grey picture of a {w}",
)


def caption(digit: int, template: int) -> str:
    return TEMPLATES[template].format(w=DIGIT_WORDS[digit], n=str(digit))


# index = digit * len(TEMPLATES) + template
DIGIT_CAPTIONS: tuple[str, ...] = tuple(caption(d, k) for d in range(NUM_CLASSES) for k in range(len(TEMPLATES)))
CAPTION_DIGITS: tuple[int, ...] = tuple(d for d in range(NUM_CLASSES) for _ in TEMPLATES)


def caption_index(digit: int, template: int) -> int:
    return digit * len(TEMPLATES) + template


def random_caption_indices(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random caption index per digit (training)."""
    return np.asarray(digits) * len(TEMPLATES) + rng.integers(0, len(TEMPLATES), size=len(digits))


def pool_digest(prompts) -> str:
    """A short content digest of a prompt list (cache keys, specs)."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()[:16]
