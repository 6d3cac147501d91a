"""Prompt datasets of text-to-image runs, and the conditions of a run from its dataset and model.

A prompt dataset is a fixed, ordered prompt pool (`ditq.conditioning.PromptConditions`): seed ->
pool index -> prompt, so FP and quantized runs draw the same prompt for the same seed.
  - `digits_captions`: the captions of the bundled digits (`ditq.data.captions`), labelled with
    the digit each asks for (prompt accuracy); FID against the real digits, as `digits`.
  - `coco_captions`: every caption of a user-supplied MS-COCO captions annotation file
    (captions_train2017.json, captions_val2014.json, ...), in (image id, annotation id) order;
    `coco_calibration_pairs` draws FP4DiT's calibration set (128 captioned images) from it.
  - `hpsv2`: the HPSv2 benchmark prompts (4 styles x 800, user-supplied), styles in order.
  - `prompts`: a user's prompt file (.txt, one prompt per line, or a .json list of strings).
`build_conditions(dataset_cfg, adapter)` pairs a dataset with a loaded model: class labels for
class models on image datasets, the prompt pool for text models on prompt datasets, nothing for
unconditional models; any other pairing is refused with the fix. `load_prompt_pool(dataset_cfg)`
reads (and checks) the prompt files without a model, so a preflight can fail before loading.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from ditq.conditioning import ClassConditions, Conditions, NoConditions, PromptConditions
from ditq.config.checks import DIGITS_REFERENCE_KINDS, HPS_STYLES, IMAGE_DATASET_KINDS, PROMPT_DATASET_KINDS

log = logging.getLogger(__name__)

COCO_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
COCO_IMAGES_URL = "http://images.cocodataset.org/zips/val2017.zip"
FP4DIT_CALIB_IMAGES = 128  # FP4DiT calibrates on 128 captioned COCO images

__all__ = [
    "COCO_ANNOTATIONS_URL", "CalibrationPair", "build_conditions", "coco_calibration_pairs",
    "coco_caption_conditions", "digit_caption_conditions", "hpsv2_conditions", "load_prompt_pool",
    "prompt_file_conditions", "uses_real_digits",
]


def uses_real_digits(kind: str) -> bool:
    """Whether a dataset kind is scored against the bundled real digits (digits, digits_captions)."""
    return kind in DIGITS_REFERENCE_KINDS


# -- the bundled digit captions ----------------------------------------------------------------
def digit_caption_conditions() -> PromptConditions:
    """The embedded text-to-image model's caption pool; `labels(y)` is the digit each caption names."""
    from ditq.data.captions import CAPTION_DIGITS, DIGIT_CAPTIONS

    return PromptConditions("digits_captions", DIGIT_CAPTIONS, labels=CAPTION_DIGITS)


# -- MS-COCO captions --------------------------------------------------------------------------
def _read_coco(annotation_file: str | os.PathLike, key: str = "dataset.prompts") -> dict:
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO captions annotation file {path} not found ({key}). Download {COCO_ANNOTATIONS_URL}, unzip it "
            f"and set {key}=/path/to/annotations/captions_train2017.json (or captions_val2014.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"COCO captions annotation file {path} ({key}) is not valid JSON ({err}); "
                         f"download it again from {COCO_ANNOTATIONS_URL}") from err
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list) or not anns:
        raise ValueError(f"COCO captions annotation file {path} ({key}) holds no annotations (expected "
                         "{'images': [...], 'annotations': [{'image_id', 'id', 'caption'}, ...]}); is it the "
                         "captions file (captions_*.json) and not instances_*.json?")
    return data


def _coco_captions(annotation_file, key: str = "dataset.prompts") -> tuple[list[str], list[int], dict]:
    """(captions, image ids, the parsed file) in (image id, annotation id) order, empty captions dropped."""
    data = _read_coco(annotation_file, key)
    rows = []
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or not isinstance(a.get("image_id"), int):
            raise ValueError(f"COCO captions annotation file {annotation_file} ({key}): annotation #{i} ({a!r:.120}) "
                             "lacks an integer 'image_id' or a string 'caption'")
        ann_id = a.get("id")
        rows.append((a["image_id"], ann_id if isinstance(ann_id, int) else i, a["caption"].strip()))
    rows.sort(key=lambda r: (r[0], r[1]))
    empty = sum(1 for r in rows if not r[2])
    if empty:
        log.warning("COCO captions %s: %d empty captions dropped", annotation_file, empty)
    rows = [r for r in rows if r[2]]
    if not rows:
        raise ValueError(f"COCO captions annotation file {annotation_file} ({key}) holds only empty captions")
    return [r[2] for r in rows], [r[0] for r in rows], data


def coco_caption_conditions(annotation_file: str | os.PathLike) -> PromptConditions:
    """Every caption of a COCO captions annotation file, stripped, in (image id, annotation id) order;
    `image_ids` = the image id of every caption (not `groups`: metrics are not split per image)."""
    captions, image_ids, _ = _coco_captions(annotation_file)
    cond = PromptConditions("coco_captions", captions)
    cond.image_ids = image_ids
    return cond


class CalibrationPair(NamedTuple):
    image: Path  # the COCO image file
    caption: str  # one of its captions (stripped)
    index: int  # the caption's index in `coco_caption_conditions(annotation_file)`'s pool


def coco_calibration_pairs(annotation_file: str | os.PathLike, images_dir: str | os.PathLike,
                           n: int = FP4DIT_CALIB_IMAGES, seed: int = 0) -> list[CalibrationPair]:
    """`n` distinct captioned COCO images drawn by `seed`, one caption each (also drawn by `seed`).

    Image files are named by the annotation file's `images[].file_name` (else `<id:012d>.jpg`, the
    2017 naming) under `images_dir`; every drawn image must exist."""
    captions, image_ids, data = _coco_captions(annotation_file)
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"COCO image directory {images_dir} not found (dataset.images); download and unzip "
                                f"the images of the annotation file (e.g. {COCO_IMAGES_URL}) and set "
                                "dataset.images=/path/to/val2017")
    by_image: dict[int, list[int]] = {}
    for pos, img in enumerate(image_ids):
        by_image.setdefault(img, []).append(pos)
    ids = sorted(by_image)
    if not 1 <= n <= len(ids):
        raise ValueError(f"coco calibration: n={n} captioned images asked, and {annotation_file} has {len(ids)} "
                         f"captioned images; choose 1 <= n <= {len(ids)}")
    names = {im["id"]: im.get("file_name") for im in data.get("images", []) if isinstance(im, dict) and "id" in im}
    rng = np.random.default_rng([int(seed), 0xC0C0])
    chosen = [ids[i] for i in rng.choice(len(ids), size=n, replace=False)]
    pairs = []
    for img in chosen:
        pos = by_image[img][int(rng.integers(len(by_image[img])))]
        pairs.append(CalibrationPair(images_dir / (names.get(img) or f"{img:012d}.jpg"), captions[pos], pos))
    missing = [p.image for p in pairs if not p.image.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {n} drawn COCO calibration images are missing from {images_dir} (dataset.images), "
            f"first: {missing[0]}; set dataset.images to the directory holding the images of {annotation_file}")
    return pairs


# -- HPSv2 benchmark prompts -------------------------------------------------------------------
def hpsv2_conditions(prompt_dir: str | os.PathLike, styles: Sequence[str] = HPS_STYLES,
                     prompts_per_style: int | None = None) -> PromptConditions:
    """The HPSv2 benchmark prompts (`<prompt_dir>/<style>.json`, 800 each), styles concatenated in the
    given order; `groups` = the style of each prompt. Balanced seeds 0..N-1 visit every prompt once."""
    from ditq.metrics.hps import PROMPTS_PER_STYLE, PROMPTS_URL, load_benchmark_prompts

    styles = list(styles)
    unknown = [s for s in styles if s not in HPS_STYLES]
    if not styles or unknown or len(set(styles)) != len(styles):
        raise ValueError(f"dataset.styles={styles} must list distinct HPSv2 styles from {list(HPS_STYLES)}")
    if not Path(prompt_dir).is_dir():
        raise FileNotFoundError(f"HPSv2 benchmark prompt directory {prompt_dir} not found (dataset.prompts); download "
                                f"{', '.join(s + '.json' for s in HPS_STYLES)} from {PROMPTS_URL} into one directory "
                                "and set dataset.prompts=/path/to/that/directory")
    try:
        by_style = load_benchmark_prompts(prompt_dir, styles,
                                          PROMPTS_PER_STYLE if prompts_per_style is None else prompts_per_style)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (dataset.prompts={prompt_dir})") from err
    except ValueError as err:
        raise ValueError(f"{err} (dataset.prompts={prompt_dir})") from err
    pool = [p for s in styles for p in by_style[s]]
    groups = [s for s in styles for _ in by_style[s]]
    return PromptConditions("hpsv2", pool, groups=groups)


# -- a user's prompt file ----------------------------------------------------------------------
def prompt_file_conditions(path: str | os.PathLike, name: str | None = None) -> PromptConditions:
    """Prompts of a .txt file (one per line, blank lines skipped) or a .json list of strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found (dataset.prompts); give a .txt file with one prompt "
                                "per line or a .json list of strings")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({err})") from err
    if suffix == ".json":
        try:
            items = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as err:
            raise ValueError(f"prompt file {path} is not valid JSON ({err}); it must hold a list of strings") from err
        if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
            raise ValueError(f"prompt file {path} must hold a JSON list of strings")
        prompts = [p.strip() for p in items if p.strip()]
    elif suffix in (".txt", ""):
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        raise ValueError(f"prompt file {path}: unknown type {suffix!r}; use a .txt file (one prompt per line) or a "
                         ".json list of strings")
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (dataset.prompts); write one prompt per line")
    return PromptConditions(name or f"prompts:{path.stem}", prompts)


# -- a run's conditions ------------------------------------------------------------------------
def load_prompt_pool(dataset_cfg) -> PromptConditions | None:
    """The prompt pool of a prompt dataset (None for an image dataset); reads and checks its files,
    needs no model: call it before loading one."""
    kind = dataset_cfg.kind
    if kind not in PROMPT_DATASET_KINDS:
        if kind in IMAGE_DATASET_KINDS:
            return None
        raise ValueError(f"dataset.kind={kind!r} is not known; choose one of: "
                         f"{', '.join(IMAGE_DATASET_KINDS + PROMPT_DATASET_KINDS)}")
    if kind == "digits_captions":
        return digit_caption_conditions()
    source = getattr(dataset_cfg, "prompts", None)
    if not source:
        raise ValueError(f"dataset={dataset_cfg.name} (kind {kind}) needs dataset.prompts")
    if kind == "coco_captions":
        return coco_caption_conditions(source)
    if kind == "hpsv2":
        return hpsv2_conditions(source, list(dataset_cfg.styles))
    return prompt_file_conditions(source)


def _model_name(adapter) -> str:
    cfg = getattr(adapter, "cfg", None)
    return str(getattr(cfg, "name", None) or type(adapter).__name__)


def build_conditions(dataset_cfg, adapter, pool: PromptConditions | None = None) -> Conditions:
    """The conditions of a run on `dataset_cfg` with the loaded `adapter` (see the module doc).
    `pool`: the dataset's `load_prompt_pool` when already read (preflight)."""
    kind, name, model = dataset_cfg.kind, dataset_cfg.name, _model_name(adapter)
    conditioning = getattr(adapter, "conditioning", "class")
    if kind not in IMAGE_DATASET_KINDS + PROMPT_DATASET_KINDS:
        raise ValueError(f"dataset.kind={kind!r} is not known; choose one of: "
                         f"{', '.join(IMAGE_DATASET_KINDS + PROMPT_DATASET_KINDS)}")
    text_data = kind in PROMPT_DATASET_KINDS
    if conditioning == "text":
        if not text_data:
            raise ValueError(
                f"dataset={name} (kind {kind}) has class labels and no prompts, and model {model} is text-to-image "
                "(it is conditioned on prompts); use a prompt dataset: dataset=digits_captions (the embedded "
                "text-to-image model), dataset=coco_captions or dataset=hpsv2")
        return pool if pool is not None else load_prompt_pool(dataset_cfg)
    if text_data:
        what = "class-conditional" if conditioning == "class" else "unconditional"
        fix = ("dataset=digits for tiny_dit_digits, dataset=imagenet for dit_xl_*" if conditioning == "class"
               else "an image dataset (dataset.kind one of: " + ", ".join(IMAGE_DATASET_KINDS) + ")")
        raise ValueError(f"dataset={name} (kind {kind}) is a prompt dataset, and model {model} is {what} (it takes "
                         f"no prompts); use {fix}, or a text-to-image model with this dataset")
    if conditioning == "class":
        return ClassConditions(adapter.num_classes, adapter.null_index)
    if conditioning == "none":
        return NoConditions()
    raise ValueError(f"model {model}: adapter.conditioning={conditioning!r} is not one of: class, text, none")
