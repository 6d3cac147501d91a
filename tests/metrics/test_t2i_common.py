"""Input checks, preprocessing, CLIP BPE tokenizer and file resolution shared by the T2I scorers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ditq.metrics.t2i_common import (
    CLIP_MEAN,
    CLIP_STD,
    ClipBPETokenizer,
    check_batch_size,
    check_images,
    check_prompts,
    crop_offsets,
    normalize,
    pil_resize_crop,
    read_bpe_merges,
    resolve_file,
    resized_size,
    tensor_resize_longest_pad,
    to_unit_float,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "t2i"
CLIP_TOK = FIXTURES / "clip_tokenizer"


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "images, exc, words",
    [
        (torch.rand(2, 3, 8, 8), TypeError, ["uint8", "values in [0"]),
        (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), ValueError, ["[N, 3, H, W]", "permute"]),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), ValueError, ["unsqueeze"]),
        (torch.zeros(2, 4, 8, 8, dtype=torch.uint8), ValueError, ["[N, 3, H, W]"]),
        (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), ValueError, ["non-empty"]),
        (np.zeros((2, 3, 8, 8), dtype=np.uint8), TypeError, ["torch.Tensor"]),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), TypeError, ["uint8"]),
    ],
)
def test_check_images_rejects(images, exc, words):
    with pytest.raises(exc) as info:
        check_images(images)
    for word in words:
        assert word in str(info.value)


def test_check_prompts_rejects_wrong_type_and_count():
    with pytest.raises(TypeError, match="list of str"):
        check_prompts("a cat", 1)
    with pytest.raises(TypeError, match="prompt 1"):
        check_prompts(["a", 3], 2)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        check_prompts(["a", "b"], 3)
    assert check_prompts(("a", ""), 2) == ["a", ""]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_check_batch_size_rejects(bad):
    with pytest.raises(ValueError, match="batch_size"):
        check_batch_size(bad)


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------
def _random_images(h: int, w: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def test_crop_offset_rules_differ_where_torchvision_rounds_half_to_even():
    # excess 3: torchvision int(round(1.5)) = 2, transformers 3 // 2 = 1
    assert crop_offsets(35, 32, 32, "round") == (2, 0)
    assert crop_offsets(35, 32, 32, "floor") == (1, 0)
    assert crop_offsets(37, 32, 32, "round") == crop_offsets(37, 32, 32, "floor") == (2, 0)
    assert resized_size(300, 227, 224) == (296, 224)
    assert resized_size(227, 300, 224) == (224, 296)
    assert resized_size(480, 640, 224) == (224, 298)
    with pytest.raises(ValueError, match="one of"):
        crop_offsets(35, 32, 32, "ceil")


@pytest.mark.parametrize("h, w", [(35, 32), (45, 37), (37, 45), (64, 64), (20, 50)])
def test_pil_path_matches_transformers_clip_image_processor(h, w):
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as Processor

    images = _random_images(h, w)
    proc = Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = proc(images=[im for im in images], return_tensors="pt")["pixel_values"]
    ours = normalize(to_unit_float(pil_resize_crop(images, 32, 32, "floor")), CLIP_MEAN, CLIP_STD)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_pil_path_crop_rule_changes_pixels_when_offsets_differ():
    images = _random_images(35, 32)
    a = pil_resize_crop(images, 32, 32, "round")
    b = pil_resize_crop(images, 32, 32, "floor")
    assert torch.equal(a, images[:, :, 2:34, :]) and torch.equal(b, images[:, :, 1:33, :])


def test_tensor_path_resizes_longer_side_and_zero_pads_like_open_clip_resize_max_size():
    x = to_unit_float(_random_images(45, 37))
    out = tensor_resize_longest_pad(x, 32)
    # scale 32/45: (45, 37) -> (32, round(26.31) = 26); 6 columns of padding, 3 left and 3 right
    inner = torch.nn.functional.interpolate(x, size=(32, 26), mode="bicubic", align_corners=False, antialias=True)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out[..., :, 3:29], inner)
    assert out[..., :, :3].eq(0).all() and out[..., :, 29:].eq(0).all()
    assert inner.min() < 0 or inner.max() > 1  # bicubic overshoot on noise is kept, as torchvision does for floats
    wide = tensor_resize_longest_pad(to_unit_float(_random_images(20, 50)), 32)  # -> (13, 32): rows 9 top, 10 bottom
    assert wide[..., :9, :].eq(0).all() and wide[..., 22:, :].eq(0).all() and not wide[..., 9, :].eq(0).all()
    same = to_unit_float(_random_images(32, 32))
    assert torch.equal(tensor_resize_longest_pad(same, 32), same)
    narrow = to_unit_float(_random_images(32, 20))  # longer side already 32: no resize, only padding
    assert torch.equal(tensor_resize_longest_pad(narrow, 32)[..., 6:26], narrow)


# ---------------------------------------------------------------------------------------------
# CLIP BPE tokenizer
# ---------------------------------------------------------------------------------------------
PROMPTS = ["The cat sat on the red mat", "a blue dog, sitting!", "photo of 42 cats", ""]


def test_bpe_tokenizer_matches_transformers_clip_tokenizer():
    from transformers import CLIPTokenizer

    ours = ClipBPETokenizer(CLIP_TOK / "merges.txt", context_length=16)
    ref = CLIPTokenizer.from_pretrained(str(CLIP_TOK))
    assert ours.vocab_size == len(json.loads((CLIP_TOK / "vocab.json").read_text())) == 535
    ids = ours(PROMPTS)
    for row, prompt in zip(ids, PROMPTS):
        expected = ref(prompt)["input_ids"]
        assert row[: len(expected)].tolist() == expected
        assert row[len(expected):].eq(0).all()
    ours.check_hub_vocab(CLIP_TOK / "vocab.json")


def test_bpe_tokenizer_open_clip_conventions(tmp_path):
    tok = ClipBPETokenizer(CLIP_TOK / "merges.txt", context_length=8)
    # ftfy + twice html-unescaped, whitespace collapsed, lower-cased
    assert tok.encode("  The\tCAT  &amp;amp; dog ") == tok.encode("the cat & dog")
    assert tok.encode("the") == [tok.encoder["the</w>"]]
    assert tok.encode("<end_of_text>") == [tok.eot_id]
    long = tok(["the cat " * 10])[0]
    assert long[0] == tok.sot_id and long[-1] == tok.eot_id and long.shape == (8,)
    short = tok(["cat"])[0]
    assert short.tolist() == [tok.sot_id, tok.encoder["cat</w>"], tok.eot_id, 0, 0, 0, 0, 0]
    # a gzip file with a header line, as open_clip ships it, gives the same tokenizer
    import gzip

    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz.write_bytes(gzip.compress((CLIP_TOK / "merges.txt").read_bytes()))
    assert torch.equal(ClipBPETokenizer(gz, context_length=8)(PROMPTS), tok(PROMPTS))


def test_bpe_files_are_checked(tmp_path):
    bad = tmp_path / "merges.txt"
    bad.write_text("#version: 0.2\nt h\nthree symbols here\n")
    with pytest.raises(ValueError, match="line 3"):
        read_bpe_merges(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="no merges"):
        read_bpe_merges(empty)
    vocab = json.loads((CLIP_TOK / "vocab.json").read_text())
    vocab["the</w>"] += 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="does not match"):
        ClipBPETokenizer(CLIP_TOK / "merges.txt").check_hub_vocab(tmp_path / "vocab.json")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def test_resolve_file_local_and_errors(tmp_path, monkeypatch):
    shutil.copy(CLIP_TOK / "merges.txt", tmp_path / "merges.txt")
    assert resolve_file(tmp_path, "merges.txt", what="x", setting="tokenizer") == (tmp_path / "merges.txt").resolve()
    assert resolve_file(tmp_path / "merges.txt", "merges.txt", what="x", setting="tokenizer") == (tmp_path / "merges.txt").resolve()
    with pytest.raises(FileNotFoundError) as info:
        resolve_file(tmp_path, "vocab.txt", what="Thing", setting="tokenizer", hub_repo="org/repo")
    msg = str(info.value)
    assert "vocab.txt" in msg and "`tokenizer`" in msg and "https://huggingface.co/org/repo" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_file(tmp_path / "nope" / "x.pt", "x.pt", what="Thing", setting="path")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        resolve_file("ditq-test-org/not-a-repo", "weights.pt", what="Thing", setting="path")
    assert "https://huggingface.co/ditq-test-org/not-a-repo/blob/main/weights.pt" in str(info.value)
