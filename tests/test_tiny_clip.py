"""The shipped tiny CLIP (src/ditq/assets/tiny_clip_digits): tokenizers, both scorers, quality on real digits."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditq.data.captions import CAPTION_DIGITS, DIGIT_CAPTIONS
from ditq.data.digits import real_digits_uint8
from ditq.train import tiny_clip as tc

ASSET = tc.DEFAULT_OUT
# measured when the shipped model was trained (train_meta.json): 1.000 through both scorers on the 1797
# digits it was trained on; 0.989 on 360 held-out digits in a run trained on the other 80%
MIN_ZERO_SHOT = 0.97
MIN_MARGIN_CLIP = 50.0  # mean CLIP score, matched minus mismatched captions (measured 81.0 - 8.5 = 72.5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def clip():
    from ditq.metrics.clip_score import ClipScorer

    return ClipScorer(tc.eval_options()["clip_model"])


@pytest.fixture(scope="module")
def hps():
    from ditq.metrics.hps import HPSv2Scorer

    opts = tc.eval_options()
    return HPSv2Scorer(opts["hps_path"], tokenizer=opts["hps_tokenizer"])


@pytest.fixture(scope="module")
def digits():
    images, labels = real_digits_uint8()
    return images.repeat(1, 3, 1, 1), labels


# --- tokenizer -------------------------------------------------------------------------------
def test_every_caption_word_is_one_token_and_the_shipped_merges_are_current():
    words = tc.caption_words()
    merges = tc.build_merges(words)
    ranks = {m: i for i, m in enumerate(merges)}
    assert all(len(tc.bpe(w, ranks)) == 1 for w in words)
    shipped = (ASSET / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert shipped == [f"{a} {b}" for a, b in merges], "rebuild the asset: the caption pool changed"


def test_build_merges_refuses_merges_that_split_a_word():
    # "bcxyz" (longer, first) brings the merge (b, c), which wins inside "abcd" and strands it in 3 pieces
    with pytest.raises(RuntimeError, match="abcd"):
        tc.build_merges(["abcd", "bcxyz"])


def test_both_tokenizers_give_identical_ids_for_every_caption():
    from transformers import CLIPTokenizer

    from ditq.metrics.hps import load_bpe_tokenizer

    hub = CLIPTokenizer.from_pretrained(str(ASSET))
    bpe = load_bpe_tokenizer(ASSET / tc.HPS_SUBDIR, tc.CONTEXT)
    assert bpe.vocab_size == len(hub) == tc.arch(len(hub))["text_cfg"]["vocab_size"]
    bpe.check_hub_vocab(ASSET / "vocab.json")
    ids, mask = tc.caption_ids(tc.build_merges(tc.caption_words()))
    for row, caption in enumerate(DIGIT_CAPTIONS):
        a = hub(caption)["input_ids"]
        b = bpe([caption])[0]
        n = len(a)
        assert a == b[:n].tolist() == ids[row, :n].tolist(), caption
        assert int(mask[row].sum()) == n and (b[n:] == 0).all()
        assert a[0] == hub.bos_token_id and a[-1] == hub.eos_token_id == len(hub) - 1  # pooled at the largest id


# --- the two layouts hold one network ----------------------------------------------------------
def test_open_clip_conversion_round_trips():
    from ditq.metrics.hps import open_clip_shapes, open_clip_to_transformers

    torch.manual_seed(0)
    model = tc.build_model(600)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    oc = tc.transformers_to_open_clip(model.state_dict())
    expected = open_clip_shapes(tc.arch(600))
    assert {k: tuple(v.shape) for k, v in oc.items()} == expected
    back = open_clip_to_transformers(oc)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_shipped_model_loads_through_both_scorers_with_the_same_weights(clip, hps):
    a = {k: v for k, v in clip.model.state_dict().items() if not k.endswith("position_ids")}
    b = {k: v for k, v in hps.model.state_dict().items() if not k.endswith("position_ids")}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert clip.max_length == hps.tokenizer.context_length == tc.CONTEXT  # both take the context from the config
    assert hps.arch == tc.arch(len(clip.tokenizer))
    assert hps.settings()["arch_file"].endswith(tc.HPS_ARCH_FILE)
    assert "not HPSv2's weights" in hps.settings()["definition"]


def test_scorers_agree_up_to_their_resize(clip, hps, digits):
    images, labels = digits
    sel = torch.arange(0, len(images), 9)
    prompts = [DIGIT_CAPTIONS[i % len(DIGIT_CAPTIONS)] for i in range(len(sel))]
    _, t_clip = clip.embed(images[:1], prompts)
    _, t_hps = hps.embed(images[:1], prompts)
    torch.testing.assert_close(t_clip, t_hps, atol=1e-5, rtol=1e-5)  # same ids, same text tower
    s_clip = clip.similarity(images[sel], prompts) / 100
    s_hps = hps.score(images[sel], prompts)
    # the only difference: PIL bicubic on uint8 (CLIP score) vs torch bicubic on floats (HPSv2)
    assert float((s_clip - s_hps).abs().mean()) < 0.05
    assert float(np.corrcoef(s_clip.numpy(), s_hps.numpy())[0, 1]) > 0.98


# --- quality on the real digits ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip", "hps"])
def test_zero_shot_accuracy_on_real_digits(name, clip, hps, digits):
    scorer = {"clip": clip, "hps": hps}[name]
    images, labels = digits
    img, _ = scorer.embed(images, [""] * len(images))
    _, txt = scorer.embed(images[:1], list(DIGIT_CAPTIONS))
    assert tc.zero_shot(img, txt, labels) >= MIN_ZERO_SHOT


def test_matched_captions_score_higher_than_mismatched(clip, hps, digits):
    images, labels = digits
    matched, mismatched = tc.matched_pairs(labels, seed=1)
    assert all(CAPTION_DIGITS[DIGIT_CAPTIONS.index(c)] == int(d) for c, d in zip(matched, labels))
    assert all(CAPTION_DIGITS[DIGIT_CAPTIONS.index(c)] != int(d) for c, d in zip(mismatched, labels))
    good, bad = clip.score(images, matched, 256), clip.score(images, mismatched, 256)
    assert float(good.mean() - bad.mean()) > MIN_MARGIN_CLIP
    assert float((good > bad).double().mean()) > 0.9
    good, bad = hps.score(images, matched, 256), hps.score(images, mismatched, 256)
    assert float(good.mean() - bad.mean()) > MIN_MARGIN_CLIP / 100


def test_train_meta_records_the_run():
    meta = json.loads((ASSET / "train_meta.json").read_text())
    assert meta["held_out_images"] == 0 and meta["train_images"] == 1797
    assert meta["eval_on_real_digits"]["clip_zero_shot_accuracy"] >= MIN_ZERO_SHOT
    assert meta["arch"] == tc.arch(meta["arch"]["text_cfg"]["vocab_size"])


def test_eval_options_build_both_scorers_through_the_pipeline_path():
    from ditq.metrics.options import resolve_options
    from ditq.metrics.t2i import build_scorer

    opts = resolve_options(tc.eval_options())
    assert type(build_scorer("clip", opts)).__name__ == "ClipScorer"
    assert build_scorer("hpsv2", opts).arch["vision_cfg"]["width"] == 64


# --- hps.py: the architecture file next to a checkpoint ----------------------------------------
def test_bad_open_clip_config_next_to_the_checkpoint_is_named(tmp_path):
    from ditq.metrics.hps import HPSv2Scorer

    d = tmp_path / "hps"
    shutil.copytree(ASSET / tc.HPS_SUBDIR, d)
    (d / tc.HPS_ARCH_FILE).write_text(json.dumps({"model_cfg": {"vision_cfg": {"timm_model_name": "x"}}}))
    with pytest.raises(ValueError, match="open_clip_config.json.*timm_model_name"):
        HPSv2Scorer(str(d / tc.HPS_CHECKPOINT), tokenizer=str(d))
    (d / tc.HPS_ARCH_FILE).write_text(json.dumps({"embed_dim": 32}))
    with pytest.raises(ValueError, match="model_cfg"):
        HPSv2Scorer(str(d / tc.HPS_CHECKPOINT), tokenizer=str(d))
    (d / tc.HPS_ARCH_FILE).unlink()  # without it: ViT-H-14, which the checkpoint does not match
    with pytest.raises(ValueError, match="model expects 49408"):
        HPSv2Scorer(str(d / tc.HPS_CHECKPOINT), tokenizer=str(d))


# --- training pieces ---------------------------------------------------------------------------
def test_shift_moves_pixels_and_fills_background():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    y = tc.shift(x.repeat(2, 1, 1, 1), torch.tensor([1, 0]), torch.tensor([0, -1]))
    assert torch.equal(y[0, 0, 1:], x[0, 0, :3]) and (y[0, 0, 0] == -1).all()
    assert torch.equal(y[1, 0, :, :3], x[0, 0, :, 1:]) and (y[1, 0, :, 3] == -1).all()


def test_multi_positive_loss_is_clip_loss_with_distinct_digits_and_ignores_same_digit_negatives():
    torch.manual_seed(0)
    img, txt, scale = torch.randn(10, 8), torch.randn(10, 8), torch.tensor(2.0)
    digits = torch.arange(10)
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    clip_loss = (F.cross_entropy(logits, digits) + F.cross_entropy(logits.t(), digits)) / 2
    torch.testing.assert_close(tc.multi_positive_clip_loss(img, txt, scale, digits, digits), clip_loss)
    # two images of one digit with two captions of it: swapping the captions changes nothing
    d = torch.tensor([3, 3, 5])
    a = tc.multi_positive_clip_loss(img[:3], txt[:3], scale, d, d)
    b = tc.multi_positive_clip_loss(img[:3], txt[[1, 0, 2]], scale, d, d)
    torch.testing.assert_close(a, b)


def test_pixels_match_what_the_scorers_feed(clip, hps, digits):
    images, _ = digits
    torch.testing.assert_close(tc.clip_pixels(images[:8]), clip._pixels(images[:8]))
    from ditq.metrics.t2i_common import normalize, tensor_resize_longest_pad, to_unit_float

    torch.testing.assert_close(tc.hps_pixels(images[:8]),
                               normalize(tensor_resize_longest_pad(to_unit_float(images[:8]), 32)))


def test_save_keeps_the_previous_model_when_writing_or_checking_fails(tmp_path):
    merges = tc.build_merges(tc.caption_words())
    model = tc.build_model(len(tc.vocab_tokens(merges)))
    out = tmp_path / "tiny"
    tc.save(model, merges, out, {"steps": 1})
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def failing_check(d):
        raise RuntimeError("check failed")

    with pytest.raises(RuntimeError, match="check failed"):
        tc.save(model, merges, out, {"steps": 2}, evaluate_fn=failing_check)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    meta = tc.save(model, merges, out, {"steps": 3}, evaluate_fn=lambda d: {"ok": str(d).endswith(".tmp")})
    assert meta["eval_on_real_digits"] == {"ok": True}
    assert json.loads((out / "train_meta.json").read_text())["steps"] == 3
    assert not out.with_name("tiny.tmp").exists() and not out.with_name("tiny.old").exists()
