"""HPSv2 end to end on a tiny random open_clip-layout checkpoint, and the benchmark protocol (offline).

The reference model below is an open_clip-style CLIP written with torch.nn modules
(nn.MultiheadAttention with packed in_proj weights, `x @ proj` projections, class-token pooling,
causal text mask, pooling at argmax(ids)), so its state dict has open_clip's key layout and its
forward is independent of transformers.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ditq.metrics.hps import (
    HPS_STYLES,
    HPSv2Scorer,
    hpsv2_benchmark,
    load_benchmark_prompts,
    open_clip_to_transformers,
    protocol_average,
)
from ditq.metrics.t2i_common import ClipBPETokenizer, normalize, to_unit_float

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "t2i"
TOKENIZER = FIXTURES / "clip_tokenizer"
ARCH = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 535, "width": 32, "heads": 4, "layers": 2}}
PROMPTS = ["the cat", "a dog on the mat", "red", "blue photo sitting", "sleeping dogs, on a sofa!", ""]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------
# Reference open_clip-style model
# ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Tower(nn.Module):
    def __init__(self, width, heads, layers):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])


class Visual(nn.Module):
    def __init__(self, v, embed):
        super().__init__()
        w, grid = v["width"], v["image_size"] // v["patch_size"]
        self.conv1 = nn.Conv2d(3, w, v["patch_size"], v["patch_size"], bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, w) * w ** -0.5)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Tower(w, w // v["head_width"], v["layers"])
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.randn(w, embed) * w ** -0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj


class RefOpenClip(nn.Module):
    def __init__(self, arch):
        super().__init__()
        t = arch["text_cfg"]
        self.visual = Visual(arch["vision_cfg"], arch["embed_dim"])
        self.token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        self.positional_embedding = nn.Parameter(torch.randn(t["context_length"], t["width"]) * 0.1)
        self.transformer = Tower(t["width"], t["heads"], t["layers"])
        self.ln_final = nn.LayerNorm(t["width"])
        self.text_projection = nn.Parameter(torch.randn(t["width"], arch["embed_dim"]) * t["width"] ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        ctx = t["context_length"]
        self.register_buffer("attn_mask", torch.full((ctx, ctx), float("-inf")).triu_(1), persistent=False)
        with torch.no_grad():  # spread the LayerNorm parameters so that a swapped key would show
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.add_(torch.randn_like(m.weight) * 0.1)
                    m.bias.add_(torch.randn_like(m.bias) * 0.1)

    def forward(self, pixels, ids):
        img = nn.functional.normalize(self.visual(pixels), dim=-1)
        x = self.token_embedding(ids) + self.positional_embedding
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask)
        x = self.ln_final(x)[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ self.text_projection
        return (img * nn.functional.normalize(x, dim=-1)).sum(-1)


def save_checkpoint(directory: Path, model: nn.Module, name: str = "HPS_v2.1_compressed.pt") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, directory / name)
    return directory / name


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return RefOpenClip(ARCH).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, reference):
    return save_checkpoint(tmp_path_factory.mktemp("hps"), reference)


@pytest.fixture(scope="module")
def scorer(ckpt):
    return HPSv2Scorer(str(ckpt), "v2.1", tokenizer=str(TOKENIZER), arch=ARCH)


def images(n, h=32, w=32, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------
def test_hps_matches_open_clip_style_reference(scorer, reference):
    imgs = images(len(PROMPTS))  # at model size: preprocessing is /255 and mean/std only
    ours = scorer.score(imgs, PROMPTS, batch_size=4)
    ids = ClipBPETokenizer(TOKENIZER / "merges.txt", context_length=16)(PROMPTS)
    with torch.no_grad():
        ref = reference(normalize(to_unit_float(imgs)), ids).double()
    assert ours.dtype == torch.float64 and ours.shape == (len(PROMPTS),)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert ours.std() > 0.01 and (ours.abs() <= 1).all()


def test_hps_conversion_splits_packed_attention_and_transposes_projections(reference):
    sd = reference.state_dict()
    out = open_clip_to_transformers(sd)
    w = ARCH["vision_cfg"]["width"]
    packed = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(out["vision_model.encoder.layers.1.self_attn.k_proj.weight"], packed[w:2 * w])
    assert torch.equal(out["text_projection.weight"], sd["text_projection"].t())
    assert torch.equal(out["vision_model.pre_layrnorm.bias"], sd["visual.ln_pre.bias"])
    with pytest.raises(KeyError, match="unknown open_clip key"):
        open_clip_to_transformers({"visual.attnpool.weight": torch.zeros(1)})


def test_hps_non_square_images_and_batching(scorer):
    imgs = images(4, 45, 37, seed=2)
    torch.testing.assert_close(scorer.score(imgs, PROMPTS[:4], batch_size=1), scorer.score(imgs, PROMPTS[:4]),
                               atol=1e-6, rtol=0)


def test_hps_settings(scorer, ckpt):
    s = scorer.settings()
    assert s["metric"] == "hpsv2" and s["version"] == "v2.1" and s["checkpoint"].endswith(ckpt.name)
    assert s["arch"]["vision_cfg"]["width"] == 32 and s["preprocessing"]["zero_pad_to"] == 32
    json.dumps(s)


def test_hps_bad_inputs(scorer):
    with pytest.raises(TypeError, match="uint8"):
        scorer.score(images(2).float(), ["a", "b"])
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        scorer.score(images(2), ["a", "b", "c"])


def test_hps_checkpoint_and_config_errors(tmp_path, reference, ckpt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="version"):
        HPSv2Scorer(str(ckpt), "v3", tokenizer=str(TOKENIZER), arch=ARCH)
    with pytest.raises(ValueError, match="another HPSv2 version"):
        HPSv2Scorer(str(ckpt), "v2.0", tokenizer=str(TOKENIZER), arch=ARCH)
    with pytest.raises(FileNotFoundError) as info:
        HPSv2Scorer(str(tmp_path), "v2.0", tokenizer=str(TOKENIZER), arch=ARCH)
    assert "HPS_v2_compressed.pt" in str(info.value) and "huggingface.co/xswu/HPSv2" in str(info.value)
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        HPSv2Scorer(str(ckpt), tokenizer=str(tmp_path), arch=ARCH)
    with pytest.raises(ValueError, match="expects 600"):
        HPSv2Scorer(str(ckpt), tokenizer=str(TOKENIZER), arch={"text_cfg": {**ARCH["text_cfg"], "vocab_size": 600}})
    with pytest.raises(ValueError, match="shape mismatches"):
        HPSv2Scorer(str(ckpt), tokenizer=str(TOKENIZER), arch={**ARCH, "embed_dim": 24})
    sd = reference.state_dict()
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    bad = tmp_path / "missing"
    bad.mkdir()
    torch.save({"state_dict": sd}, bad / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match="missing 1 keys"):
        HPSv2Scorer(str(bad), tokenizer=str(TOKENIZER), arch=ARCH)
    with pytest.raises(ValueError, match="unsupported open_clip vision_cfg"):
        HPSv2Scorer(str(ckpt), tokenizer=str(TOKENIZER), arch={"vision_cfg": {"global_average_pool": True}})


# ---------------------------------------------------------------------------------------------
# Benchmark protocol
# ---------------------------------------------------------------------------------------------
def test_protocol_average_on_hand_made_scores():
    scores = {"a": [1.0] * 80 + [3.0] * 80, "b": list(range(160)), "c": [0.0] * 80 + [10.0] * 20}
    out = protocol_average(scores, chunk=80)
    assert out["styles"]["a"] == {"mean": 2.0, "chunk_std": 1.0, "n": 160}
    assert out["styles"]["b"]["mean"] == pytest.approx(79.5) and out["styles"]["b"]["chunk_std"] == pytest.approx(40.0)
    # a short last chunk counts as a whole chunk (upstream's np.mean over res[i:i+80])
    assert out["styles"]["c"]["mean"] == pytest.approx(5.0)
    assert out["overall"] == pytest.approx((320 + 79.5 * 160 + 200) / 420)


def write_prompts(directory: Path, n: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    words = ["the cat", "a dog", "red mat", "blue photo", "sitting dogs"]
    for s, style in enumerate(HPS_STYLES):
        (directory / f"{style}.json").write_text(json.dumps([f"{words[(i + s) % 5]} {i}" for i in range(n)]))
    return directory


N_BENCH, CHUNK = 80, 40


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    prompts = write_prompts(root / "prompts", N_BENCH)
    tensors = {style: images(N_BENCH, 32 + 8 * s, 32, seed=10 + s) for s, style in enumerate(HPS_STYLES)}
    return root, prompts, tensors


def test_benchmark_dict_generator_and_directory_inputs_agree(scorer, bench):
    from PIL import Image

    root, prompt_dir, tensors = bench
    by_dict = hpsv2_benchmark(scorer, tensors, prompt_dir, prompts_per_style=N_BENCH, chunk=CHUNK)
    calls = []

    def generate(prompts, style, first):
        calls.append((style, first, len(prompts)))
        return tensors[style][first:first + len(prompts)]

    by_gen = hpsv2_benchmark(scorer, generate, prompt_dir, prompts_per_style=N_BENCH, chunk=CHUNK, batch_size=32)
    folder = root / "images"
    for style, t in tensors.items():
        (folder / style).mkdir(parents=True)
        for i, img in enumerate(t):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / style / f"{i:05d}.png")
    by_dir = hpsv2_benchmark(scorer, folder, prompt_dir, prompts_per_style=N_BENCH, chunk=CHUNK)

    assert calls[:3] == [("anime", 0, 32), ("anime", 32, 32), ("anime", 64, 16)]
    prompts = load_benchmark_prompts(prompt_dir, prompts_per_style=N_BENCH)
    expected = protocol_average({s: (100 * scorer.score(tensors[s], prompts[s])).tolist() for s in HPS_STYLES}, CHUNK)
    for result in (by_dict, by_gen, by_dir):
        assert result["overall"] == pytest.approx(expected["overall"], abs=1e-4)
        for style in HPS_STYLES:
            assert result["styles"][style]["mean"] == pytest.approx(expected["styles"][style]["mean"], abs=1e-4)
            assert result["styles"][style]["n"] == N_BENCH
    assert by_dict["scale"] == 100 and by_dict["chunk"] == CHUNK and set(by_dict["prompt_files"]) == set(HPS_STYLES)
    assert by_dict["scorer"]["version"] == "v2.1"
    json.dumps(by_dict)


def test_benchmark_bad_prompt_files(scorer, tmp_path, bench):
    tensors = bench[2]
    with pytest.raises(FileNotFoundError, match="anime.json") as info:
        hpsv2_benchmark(scorer, tensors, tmp_path, prompts_per_style=N_BENCH, chunk=CHUNK)
    assert "zhwang/HPDv2" in str(info.value)
    d = write_prompts(tmp_path / "p", N_BENCH)
    (d / "photo.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        hpsv2_benchmark(scorer, tensors, d, prompts_per_style=N_BENCH, chunk=CHUNK)
    (d / "photo.json").write_text(json.dumps({"prompts": []}))
    with pytest.raises(ValueError, match="list of strings"):
        hpsv2_benchmark(scorer, tensors, d, prompts_per_style=N_BENCH, chunk=CHUNK)
    (d / "photo.json").write_text(json.dumps(["x"] * 79))
    with pytest.raises(ValueError, match="has 79 prompts"):
        hpsv2_benchmark(scorer, tensors, d, prompts_per_style=N_BENCH, chunk=CHUNK)
    with pytest.raises(ValueError, match="multiple of chunk"):
        hpsv2_benchmark(scorer, tensors, d, prompts_per_style=N_BENCH, chunk=30)


def test_benchmark_bad_images_fail_before_any_scoring(scorer, bench, tmp_path, monkeypatch):
    root, prompt_dir, tensors = bench
    calls = []
    monkeypatch.setattr(scorer, "score", lambda *a, **k: calls.append(1))
    short = dict(tensors, photo=tensors["photo"][:-1])
    with pytest.raises(ValueError, match="80 prompts for 79 images"):
        hpsv2_benchmark(scorer, short, prompt_dir, prompts_per_style=N_BENCH, chunk=CHUNK)
    with pytest.raises(KeyError, match="paintings"):
        hpsv2_benchmark(scorer, {k: v for k, v in tensors.items() if k != "paintings"}, prompt_dir,
                        prompts_per_style=N_BENCH, chunk=CHUNK)
    with pytest.raises(TypeError, match="uint8"):
        hpsv2_benchmark(scorer, dict(tensors, anime=tensors["anime"].float()), prompt_dir,
                        prompts_per_style=N_BENCH, chunk=CHUNK)
    for style in HPS_STYLES:
        (tmp_path / style).mkdir()
    with pytest.raises(FileNotFoundError, match="00000"):
        hpsv2_benchmark(scorer, tmp_path, prompt_dir, prompts_per_style=N_BENCH, chunk=CHUNK)
    with pytest.raises(ValueError, match="existing directory"):
        hpsv2_benchmark(scorer, tmp_path / "absent", prompt_dir, prompts_per_style=N_BENCH, chunk=CHUNK)
    assert calls == []
