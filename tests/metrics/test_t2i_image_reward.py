"""ImageReward end to end on a tiny random checkpoint in the published layout (offline).

The reference below is written from upstream's code (BLIP's timm-style ViT, BLIP's med.py BERT with
cross-attention, ImageReward's MLP) directly on the published state-dict keys, independently of
transformers, so that the key mapping and the module semantics are checked together.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ditq.metrics.image_reward import REWARD_MEAN, REWARD_STD, ImageRewardScorer, published_key

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "t2i"
VOCAB = FIXTURES / "bert_tokenizer" / "vocab.txt"
MED = json.loads((FIXTURES / "imagereward" / "med_config.json").read_text())
VISION = {"image_size": 32, "patch_size": 8, "width": 48, "layers": 2, "heads": 4}
PROMPTS = ["a cat on the mat", "the red dog sleeping on a blue sofa", "painting", "photo of a green cat!",
           "a dog, a cat, a mat, a sofa, " * 6, "[ENC] sleep [DEC]"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def published_state(seed: int = 0, vision: dict = VISION, med: dict = MED) -> dict[str, torch.Tensor]:
    """A random ImageReward.pt state dict with upstream's key names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    w, p, depth = vision["width"], vision["patch_size"], vision["layers"]
    tokens = (vision["image_size"] // p) ** 2 + 1
    h, inter, vocab, npos = med["hidden_size"], med["intermediate_size"], med["vocab_size"], med["max_position_embeddings"]
    sd = {"blip.visual_encoder.cls_token": rnd(1, 1, w), "blip.visual_encoder.pos_embed": rnd(1, tokens, w),
          "blip.visual_encoder.patch_embed.proj.weight": rnd(w, 3, p, p), "blip.visual_encoder.patch_embed.proj.bias": rnd(w),
          "blip.visual_encoder.norm.weight": 1 + rnd(w), "blip.visual_encoder.norm.bias": rnd(w)}
    for i in range(depth):
        b = f"blip.visual_encoder.blocks.{i}"
        sd.update({f"{b}.norm1.weight": 1 + rnd(w), f"{b}.norm1.bias": rnd(w), f"{b}.norm2.weight": 1 + rnd(w),
                   f"{b}.norm2.bias": rnd(w), f"{b}.attn.qkv.weight": rnd(3 * w, w, std=0.2),
                   f"{b}.attn.qkv.bias": rnd(3 * w), f"{b}.attn.proj.weight": rnd(w, w, std=0.2),
                   f"{b}.attn.proj.bias": rnd(w), f"{b}.mlp.fc1.weight": rnd(4 * w, w, std=0.2),
                   f"{b}.mlp.fc1.bias": rnd(4 * w), f"{b}.mlp.fc2.weight": rnd(w, 4 * w, std=0.1), f"{b}.mlp.fc2.bias": rnd(w)})
    t = "blip.text_encoder"
    sd.update({f"{t}.embeddings.word_embeddings.weight": rnd(vocab, h, std=1.0),
               f"{t}.embeddings.position_embeddings.weight": rnd(npos, h, std=0.5),
               f"{t}.embeddings.LayerNorm.weight": 1 + rnd(h), f"{t}.embeddings.LayerNorm.bias": rnd(h),
               f"{t}.embeddings.position_ids": torch.arange(npos).unsqueeze(0)})  # a buffer upstream saves
    for i in range(med["num_hidden_layers"]):
        b = f"{t}.encoder.layer.{i}"
        for att, kv_in in (("attention", h), ("crossattention", w)):
            sd.update({f"{b}.{att}.self.query.weight": rnd(h, h, std=0.3), f"{b}.{att}.self.query.bias": rnd(h),
                       f"{b}.{att}.self.key.weight": rnd(h, kv_in, std=0.3), f"{b}.{att}.self.key.bias": rnd(h),
                       f"{b}.{att}.self.value.weight": rnd(h, kv_in, std=0.3), f"{b}.{att}.self.value.bias": rnd(h),
                       f"{b}.{att}.output.dense.weight": rnd(h, h, std=0.2), f"{b}.{att}.output.dense.bias": rnd(h),
                       f"{b}.{att}.output.LayerNorm.weight": 1 + rnd(h), f"{b}.{att}.output.LayerNorm.bias": rnd(h)})
        sd.update({f"{b}.intermediate.dense.weight": rnd(inter, h, std=0.2), f"{b}.intermediate.dense.bias": rnd(inter),
                   f"{b}.output.dense.weight": rnd(h, inter, std=0.2), f"{b}.output.dense.bias": rnd(h),
                   f"{b}.output.LayerNorm.weight": 1 + rnd(h), f"{b}.output.LayerNorm.bias": rnd(h)})
    sd.update({"blip.vision_proj.weight": rnd(256, w), "blip.vision_proj.bias": rnd(256),
               "blip.text_proj.weight": rnd(256, h), "blip.text_proj.bias": rnd(256)})
    dims = [h, 1024, 128, 64, 16, 1]
    for idx, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
        sd[f"mlp.layers.{idx}.weight"] = rnd(fan_out, fan_in, std=1 / math.sqrt(fan_in))
        sd[f"mlp.layers.{idx}.bias"] = rnd(fan_out, std=0.1)
    return sd


def reference_rewards(sd, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Upstream's forward (BLIP ViT, med.py BERT in multimodal mode, MLP, normalisation)."""
    w, heads_v = VISION["width"], VISION["heads"]
    v = "blip.visual_encoder"
    x = F.conv2d(pixels, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=VISION["patch_size"])
    x = torch.cat([sd[f"{v}.cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + sd[f"{v}.pos_embed"][:, : x.shape[1]]
    for i in range(VISION["layers"]):
        b = f"{v}.blocks.{i}"
        y = F.layer_norm(x, (w,), sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"], eps=1e-6)
        B, N, C = y.shape
        qkv = F.linear(y, sd[f"{b}.attn.qkv.weight"], sd[f"{b}.attn.qkv.bias"]).reshape(B, N, 3, heads_v, C // heads_v)
        q, k, vv = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (C // heads_v) ** -0.5).softmax(-1)
        x = x + F.linear((att @ vv).transpose(1, 2).reshape(B, N, C), sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"])
        y = F.layer_norm(x, (w,), sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"])),
                     sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"])
        x = x + y
    image = F.layer_norm(x, (w,), sd[f"{v}.norm.weight"], sd[f"{v}.norm.bias"], eps=1e-6)

    t, h, heads = "blip.text_encoder", MED["hidden_size"], MED["num_attention_heads"]
    eps = MED["layer_norm_eps"]

    def ln(z, name):
        return F.layer_norm(z, (h,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=eps)

    def attention(prefix, hidden, context, additive_mask):
        def split(z):
            return z.view(z.shape[0], z.shape[1], heads, h // heads).permute(0, 2, 1, 3)

        q = split(F.linear(hidden, sd[f"{prefix}.self.query.weight"], sd[f"{prefix}.self.query.bias"]))
        k = split(F.linear(context, sd[f"{prefix}.self.key.weight"], sd[f"{prefix}.self.key.bias"]))
        vv = split(F.linear(context, sd[f"{prefix}.self.value.weight"], sd[f"{prefix}.self.value.bias"]))
        scores = q @ k.transpose(-1, -2) / math.sqrt(h // heads)
        if additive_mask is not None:
            scores = scores + additive_mask
        ctx = (scores.softmax(-1) @ vv).permute(0, 2, 1, 3).reshape(hidden.shape)
        return ln(F.linear(ctx, sd[f"{prefix}.output.dense.weight"], sd[f"{prefix}.output.dense.bias"]) + hidden,
                  f"{prefix}.output.LayerNorm")

    positions = torch.arange(ids.shape[1])
    s = sd[f"{t}.embeddings.word_embeddings.weight"][ids] + sd[f"{t}.embeddings.position_embeddings.weight"][positions]
    s = ln(s, f"{t}.embeddings.LayerNorm")
    self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}.encoder.layer.{i}"
        s = attention(f"{b}.attention", s, s, self_mask)
        s = attention(f"{b}.crossattention", s, image, None)  # image attention mask is all ones
        ff = F.linear(F.gelu(F.linear(s, sd[f"{b}.intermediate.dense.weight"], sd[f"{b}.intermediate.dense.bias"])),
                      sd[f"{b}.output.dense.weight"], sd[f"{b}.output.dense.bias"])
        s = ln(ff + s, f"{b}.output.LayerNorm")
    r = s[:, 0, :]
    for idx in (0, 2, 4, 6, 7):
        r = F.linear(r, sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"])
    return ((r.squeeze(-1) - REWARD_MEAN) / REWARD_STD).double()


def write_checkpoint(directory: Path, sd: dict, med: dict = MED) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(sd, directory / "ImageReward.pt")
    (directory / "med_config.json").write_text(json.dumps(med))
    return directory


@pytest.fixture(scope="module")
def state():
    return published_state()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, state):
    return write_checkpoint(tmp_path_factory.mktemp("ir") / "ImageReward", state)


@pytest.fixture(scope="module")
def scorer(ckpt_dir):
    return ImageRewardScorer(str(ckpt_dir), tokenizer=str(VOCAB), vision=VISION)


def square_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_image_reward_matches_reference_forward_of_published_checkpoint(scorer, state):
    from ditq.metrics.t2i_common import normalize, to_unit_float

    imgs = square_images(len(PROMPTS))  # already 32 px: preprocessing is only /255 and mean/std here
    ours = scorer.score(imgs, PROMPTS, batch_size=4)
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (len(PROMPTS), 35) and tokens["attention_mask"][0].sum() < 35
    with torch.no_grad():
        ref = reference_rewards(state, normalize(to_unit_float(imgs)), tokens["input_ids"], tokens["attention_mask"])
    assert ours.dtype == torch.float64 and ours.shape == (len(PROMPTS),)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert ours.std() > 0.05  # the check is not between near-constant outputs


def test_image_reward_tokenizer_has_blip_tokens(scorer):
    tok = scorer.tokenizer
    assert len(tok) == MED["vocab_size"] == 35
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [33, 34]
    ids = tok(["[ENC] sleep [DEC]"])["input_ids"][0]
    assert ids[0] == tok.convert_tokens_to_ids("[CLS]") and 33 in ids and 34 in ids


def test_image_reward_non_square_images_and_batching(scorer):
    imgs = torch.randint(0, 256, (4, 3, 45, 37), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    prompts = PROMPTS[:4]
    a = scorer.score(imgs, prompts, batch_size=1)
    b = scorer.score(imgs, prompts, batch_size=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_image_reward_round_trip_of_our_layout(tmp_path, scorer):
    """Our modules -> published keys -> a new scorer: identical scores."""
    sd = {published_key(k): v.clone() for k, v in scorer.model.state_dict().items()}
    other = ImageRewardScorer(str(write_checkpoint(tmp_path / "rt", sd)), tokenizer=str(VOCAB), vision=VISION)
    imgs = square_images(3, seed=5)
    torch.testing.assert_close(other.score(imgs, PROMPTS[:3]), scorer.score(imgs, PROMPTS[:3]), atol=0, rtol=0)


def test_image_reward_settings(scorer, ckpt_dir):
    s = scorer.settings()
    assert s["metric"] == "image_reward" and s["version"] == "v1.0"
    assert s["checkpoint"] == str((ckpt_dir / "ImageReward.pt").resolve())
    assert len(s["checkpoint_sha256"]) == 64 and s["tokenizer"]["max_length"] == 35
    assert s["preprocessing"]["crop_offset"] == "round" and s["vision"]["width"] == 48
    json.dumps(s)


def test_image_reward_bad_inputs(scorer):
    with pytest.raises(TypeError, match="uint8"):
        scorer.score(torch.rand(2, 3, 32, 32) * 255, ["a", "b"])
    with pytest.raises(ValueError, match="1 prompts for 2 images"):
        scorer.score(square_images(2), ["a"])


def test_image_reward_missing_files(tmp_path, state, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        ImageRewardScorer(str(tmp_path), tokenizer=str(VOCAB), vision=VISION)
    assert "ImageReward.pt" in str(info.value) and "huggingface.co/THUDM/ImageReward" in str(info.value)
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(state, bare / "ImageReward.pt")
    with pytest.raises(FileNotFoundError, match="med_config"):
        ImageRewardScorer(str(bare / "ImageReward.pt"), med_config=str(tmp_path / "nowhere.json"),
                          tokenizer=str(VOCAB), vision=VISION)
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        ImageRewardScorer(str(bare / "ImageReward.pt"), med_config=str(FIXTURES / "imagereward" / "med_config.json"),
                          tokenizer=str(tmp_path), vision=VISION)


def _expect_mismatch(tmp_path, sd, match, vision=VISION, med=MED):
    directory = write_checkpoint(tmp_path / "bad", sd, med)
    with pytest.raises(ValueError, match=match):
        ImageRewardScorer(str(directory), tokenizer=str(VOCAB), vision=vision)


def test_image_reward_checkpoint_architecture_mismatches(tmp_path, state):
    missing = {k: v for k, v in state.items() if k != "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"}
    _expect_mismatch(tmp_path, missing, "missing 1 keys")
    extra = dict(state, **{"blip.visual_encoder.blocks.2.norm1.weight": torch.ones(48)})
    _expect_mismatch(tmp_path, extra, "unexpected 1 keys")
    _expect_mismatch(tmp_path, state, "shape mismatches", vision=dict(VISION, width=64))
    _expect_mismatch(tmp_path, state, "vocab_size=40", med=dict(MED, vocab_size=40))
    _expect_mismatch(tmp_path, state, "add_cross_attention", med=dict(MED, add_cross_attention=False))


def test_image_reward_malformed_files(tmp_path, state):
    directory = write_checkpoint(tmp_path / "m", state)
    (directory / "med_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ImageRewardScorer(str(directory), tokenizer=str(VOCAB), vision=VISION)
    shutil.copy(FIXTURES / "imagereward" / "med_config.json", directory / "med_config.json")
    (directory / "ImageReward.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        ImageRewardScorer(str(directory), tokenizer=str(VOCAB), vision=VISION)
    torch.save([1, 2, 3], directory / "ImageReward.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        ImageRewardScorer(str(directory), tokenizer=str(VOCAB), vision=VISION)
    with pytest.raises(ValueError, match="unknown ImageReward vision"):
        ImageRewardScorer(str(write_checkpoint(tmp_path / "ok", state)), tokenizer=str(VOCAB), vision={"depth": 2})
