#!/usr/bin/env python
"""Parity of ditq's text-to-image scorers with the upstream packages (outside CI).

Compares, on the same PNG images, prompts and checkpoint files:
  * ImageReward v1.0: `image-reward` 1.5 (`ImageReward.load(...).score`) vs `ImageRewardScorer`;
  * HPSv2 v2.0 and v2.1: `hpsv2` 1.2.0 (`hpsv2.img_score.score`) vs `HPSv2Scorer`;
  * the HPSv2 benchmark protocol: `hpsv2.evaluation.evaluate_benchmark` vs `hpsv2_benchmark`;
  * CLIP score: torchmetrics' `CLIPScore` vs `ClipScorer`.
No real checkpoint can be downloaded here, so the upstream side instantiates upstream's own
model classes with random weights (full size: BLIP ViT-L + BERT for ImageReward, open_clip
ViT-H-14 for HPSv2) and saves them in the published formats (`ImageReward.pt` = the model's
state dict; `HPS_v2*_compressed.pt` = {"state_dict": ...}); the ImageReward MLP head is
re-drawn with std 1/sqrt(fan_in) so that rewards spread. The benchmark and CLIP checks use small
random models of the same classes (real vocabularies), to keep CPU time low.

Tokenizer files (nothing is downloaded): `--bert-vocab` must be bert-base-uncased's vocab.txt
(its sha256 is checked and printed); the CLIP BPE file is open_clip's
bpe_simple_vocab_16e6.txt.gz from the isolated environment.

    bash scripts/parity_t2i_env.sh /tmp/t2i_parity_venv
    python scripts/parity_t2i.py all --upstream-python /tmp/t2i_parity_venv/bin/python \
        --bert-vocab /path/to/bert-base-uncased/vocab.txt --workdir /tmp/t2i_parity

Subcommands: `upstream` (run by the isolated env's python), `ours` (the project env), `compare`,
`all` (the three in order). Only the standard library is imported at module level, so the same
file runs under both interpreters.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

BERT_BASE_UNCASED_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
# ImageReward's med_config.json (THUDM/ImageReward, train/src/config/med_config.json; the file its
# package downloads from the Hub repo THUDM/ImageReward).
MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}
# Images: (name, height, width); non-square and odd sizes exercise resize and crop offsets.
IMAGES = [("sq224", 224, 224), ("sq512", 512, 512), ("tall", 300, 227), ("wide", 227, 300),
          ("land", 480, 640), ("small", 160, 160)]
PROMPTS = [
    "A photo of a cat sitting on a red sofa",
    "An astronaut riding a horse on Mars, trending on artstation &amp; highly detailed, 4k",
    "Café au lait, naïve ART — “quoted”   spaces\tand\nnewlines!!",
    "a very long prompt " + " ".join(f"with detail number {i} and a golden frame" for i in range(12)),
]
CLIP_PROMPTS = 3  # the long prompt (> 77 tokens) is truncated differently by torchmetrics
BENCH_STYLES = ("anime", "concept-art", "paintings", "photo")
BENCH_PROMPTS_PER_STYLE = 160  # two chunks of 80
BENCH_ARCH = {"embed_dim": 32,
              "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
HPS_VERSIONS = {"v2.0": ("HPS_v2_compressed.pt", 20), "v2.1": ("HPS_v2.1_compressed.pt", 21)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def pairs() -> list[tuple[int, int]]:
    return [(p, i) for p in range(len(PROMPTS)) for i in range(len(IMAGES))]


# ---------------------------------------------------------------------------------------------
# Upstream side (isolated env)
# ---------------------------------------------------------------------------------------------
def write_images(work: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (work / "images").mkdir(parents=True, exist_ok=True)
    for name, h, w in IMAGES:
        coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.integers(-25, 26, size=smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(work / "images" / f"{name}.png")


def upstream_image_reward(work: Path, bert_vocab: Path) -> list[float]:
    import torch

    tok_dir = work / "bert-base-uncased"  # BLIP's init_tokenizer: BertTokenizer.from_pretrained('bert-base-uncased')
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.txt").write_bytes(bert_vocab.read_bytes())
    med = work / "med_config.json"
    med.write_text(json.dumps(MED_CONFIG, indent=2))
    os.chdir(work)
    from ImageReward.ImageReward import ImageReward as UpstreamImageReward

    torch.manual_seed(0)
    model = UpstreamImageReward(med_config=str(med), device="cpu")
    with torch.no_grad():
        for layer in model.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.in_features))
                layer.bias.normal_(0.0, 0.1)
    ckpt = work / "ImageReward.pt"
    torch.save(model.state_dict(), ckpt)
    del model
    log(f"ImageReward: random checkpoint {ckpt} ({ckpt.stat().st_size / 2**30:.2f} GiB)")

    import ImageReward as RM

    scorer = RM.load(str(ckpt), device="cpu", med_config=str(med))
    return [float(scorer.score(PROMPTS[p], str(work / "images" / f"{IMAGES[i][0]}.png"))) for p, i in pairs()]


def upstream_open_clip(model_name: str):
    from hpsv2.src.open_clip import create_model_and_transforms

    # hpsv2.img_score.initialize_model's arguments, without the pretrained tag (no download)
    model, _, preprocess_val = create_model_and_transforms(
        model_name, None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    return model, preprocess_val


def upstream_hps(work: Path) -> dict[str, list[float]]:
    import torch
    import hpsv2.img_score as img_score

    out = {}
    for version, (filename, seed) in HPS_VERSIONS.items():
        torch.manual_seed(seed)
        model, preprocess_val = upstream_open_clip("ViT-H-14")
        ckpt = work / filename
        torch.save({"state_dict": model.state_dict()}, ckpt)
        log(f"HPSv2 {version}: random ViT-H-14 checkpoint {ckpt} ({ckpt.stat().st_size / 2**30:.2f} GiB)")
        img_score.model_dict.clear()
        img_score.model_dict.update(model=model, preprocess_val=preprocess_val)  # skips the download
        by_prompt = {}
        for p, prompt in enumerate(PROMPTS):
            paths = [str(work / "images" / f"{name}.png") for name, _, _ in IMAGES]
            by_prompt[p] = [float(s) for s in img_score.score(paths, prompt, cp=str(ckpt), hps_version=version)]
        out[version] = [by_prompt[p][i] for p, i in pairs()]
        img_score.model_dict.clear()
        del model
    return out


def upstream_benchmark(work: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from hpsv2 import evaluation
    from hpsv2.src.open_clip import factory, get_tokenizer

    bench = work / "bench"
    prompt_dir, img_root = bench / "prompts", bench / "images" / "parity-model"
    prompt_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    nouns = ["castle", "robot", "forest", "city at night", "portrait of a knight", "bowl of fruit", "dragon", "ship"]
    for s, style in enumerate(BENCH_STYLES):
        prompts = [f"{style} {nouns[(i + s) % len(nouns)]}, variation {i}" for i in range(BENCH_PROMPTS_PER_STYLE)]
        (prompt_dir / f"{style}.json").write_text(json.dumps(prompts))
        (img_root / style).mkdir(parents=True, exist_ok=True)
        for i in range(BENCH_PROMPTS_PER_STYLE):
            h, w = (int(v) for v in rng.choice([64, 96, 150, 256], size=2))  # square and not
            coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
            img.save(img_root / style / f"{i:05d}.jpg", format="PNG")  # lossless content, upstream's file name

    factory._MODEL_CONFIGS["parity-tiny"] = json.loads(json.dumps(BENCH_ARCH))
    torch.manual_seed(3)
    model, preprocess_val = upstream_open_clip("parity-tiny")
    ckpt = bench / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    model.eval()
    tokenizer = get_tokenizer("parity-tiny")

    recorded = []  # per-batch diagonals, at full precision
    diagonal = torch.diagonal

    def recording_diagonal(x, *args, **kwargs):
        d = diagonal(x, *args, **kwargs)
        recorded.append(d.detach().cpu().tolist())
        return d

    printed = io.StringIO()
    torch.diagonal = recording_diagonal
    try:
        with contextlib.redirect_stdout(printed):
            evaluation.evaluate_benchmark(str(prompt_dir), str(img_root), model, 20, preprocess_val, tokenizer, "cpu")
    finally:
        torch.diagonal = diagonal
    styles_in_order = os.listdir(img_root)  # the order evaluate_benchmark iterates in
    flat = [v for batch in recorded for v in batch]
    scores, k = {}, 0
    for style in styles_in_order:
        scores[style] = flat[k:k + BENCH_PROMPTS_PER_STYLE]
        k += BENCH_PROMPTS_PER_STYLE
    summary = {}
    for line in printed.getvalue().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "parity-model":
            summary[parts[1]] = {"mean": float(parts[2]), **({"chunk_std": float(parts[3])} if len(parts) > 3 else {})}
    return {"scores": scores, "printed": summary, "stdout": printed.getvalue()}


def upstream_clip(work: Path) -> dict:
    import gzip

    import numpy as np
    import torch
    from PIL import Image
    import open_clip
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    clip_dir = work / "clip-tiny"
    clip_dir.mkdir(exist_ok=True)
    # transformers' CLIP tokenizer files, derived from OpenAI's BPE file as transformers' own
    # conversion did: the merges it uses, and the vocabulary they imply.
    gz = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (clip_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    sot = open_clip.tokenizer.SimpleTokenizer(str(gz))
    vocab = {k: v for k, v in sot.encoder.items() if v < 49406}
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    (clip_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    CLIPTokenizer(str(clip_dir / "vocab.json"), str(clip_dir / "merges.txt")).save_pretrained(clip_dir)
    CLIPImageProcessor().save_pretrained(clip_dir)
    torch.manual_seed(4)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=32)
    CLIPModel(cfg).save_pretrained(clip_dir)
    metric = CLIPScore(model_name_or_path=str(clip_dir))
    raw, clamped_mean = [], {}
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    for p, i in pairs():
        if p >= CLIP_PROMPTS:
            continue
        img = torch.from_numpy(np.array(Image.open(work / "images" / f"{IMAGES[i][0]}.png"))).permute(2, 0, 1)
        score, _ = _clip_score_update(img.unsqueeze(0), [PROMPTS[p]], metric.model, metric.processor)
        raw.append(float(score[0]))
        metric.update(img.unsqueeze(0), [PROMPTS[p]])
    clamped_mean = float(metric.compute())
    return {"similarity": raw, "torchmetrics_compute": clamped_mean}


def run_upstream(args) -> None:
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    import torch
    import open_clip

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    bert_vocab = Path(args.bert_vocab).resolve()
    gz = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    (work / "bpe_simple_vocab_16e6.txt.gz").write_bytes(gz.read_bytes())
    write_images(work)
    out_file = work / "upstream.json"
    result = json.loads(out_file.read_text()) if out_file.is_file() else {"timings": {}}  # --skip keeps old sections
    result.update(bert_vocab_sha256=sha256(bert_vocab), torch=torch.__version__)
    for name, fn in (("clip", lambda: upstream_clip(work)), ("benchmark", lambda: upstream_benchmark(work)),
                     ("image_reward", lambda: upstream_image_reward(work, bert_vocab)),
                     ("hpsv2", lambda: upstream_hps(work))):
        if name in args.skip:
            continue
        t0 = time.time()
        log(f"upstream {name} ...")
        result[name] = fn()
        result["timings"][name] = time.time() - t0
    out_file.write_text(json.dumps(result, indent=1))
    log(f"wrote {out_file}")


# ---------------------------------------------------------------------------------------------
# ditq side (project env)
# ---------------------------------------------------------------------------------------------
def load_png(path):
    import numpy as np
    import torch
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


def ours_pairwise(scorer, work: Path, n_prompts: int, method: str = "score") -> list[float]:
    """Scores in `pairs()` order; each image with all prompts in one batch."""
    values = {}
    for i, (name, _, _) in enumerate(IMAGES):
        img = load_png(work / "images" / f"{name}.png")
        batch = img.unsqueeze(0).expand(n_prompts, -1, -1, -1).contiguous()
        scores = getattr(scorer, method)(batch, PROMPTS[:n_prompts]).tolist()
        for p in range(n_prompts):
            values[(p, i)] = scores[p]
    return [values[k] for k in pairs() if k[0] < n_prompts]


def run_ours(args) -> None:
    import torch
    from ditq.metrics.clip_score import ClipScorer
    from ditq.metrics.hps import HPSv2Scorer, hpsv2_benchmark
    from ditq.metrics.image_reward import ImageRewardScorer

    work = Path(args.workdir).resolve()
    gz = work / "bpe_simple_vocab_16e6.txt.gz"
    upstream = json.loads((work / "upstream.json").read_text())
    upstream = {k: v for k, v in upstream.items() if k not in args.skip}
    out_file = work / "ours.json"
    result = json.loads(out_file.read_text()) if out_file.is_file() else {"timings": {}}  # --skip keeps old sections
    t0 = time.time()
    if "clip" in upstream:
        clip = ClipScorer(str(work / "clip-tiny"))
        result["clip"] = {"similarity": ours_pairwise(clip, work, CLIP_PROMPTS, "similarity"),
                          "score": ours_pairwise(clip, work, CLIP_PROMPTS, "score")}
        result["timings"]["clip"] = time.time() - t0
    if "benchmark" in upstream:
        t0 = time.time()
        bench = work / "bench"
        scorer = HPSv2Scorer(str(bench / "HPS_v2.1_compressed.pt"), "v2.1", tokenizer=str(gz), arch=BENCH_ARCH)
        res = hpsv2_benchmark(scorer, bench / "images" / "parity-model", bench / "prompts",
                              prompts_per_style=BENCH_PROMPTS_PER_STYLE, batch_size=20)
        result["benchmark"] = {"scores": res["scores"], "styles": res["styles"], "overall": res["overall"]}
        result["timings"]["benchmark"] = time.time() - t0
    if "image_reward" in upstream:
        t0 = time.time()
        scorer = ImageRewardScorer(str(work / "ImageReward.pt"), med_config=str(work / "med_config.json"),
                                   tokenizer=str(Path(args.bert_vocab).resolve()))
        result["image_reward"] = ours_pairwise(scorer, work, len(PROMPTS))
        del scorer
        result["timings"]["image_reward"] = time.time() - t0
    if "hpsv2" in upstream:
        result["hpsv2"] = {}
        for version, (filename, _) in HPS_VERSIONS.items():
            t0 = time.time()
            scorer = HPSv2Scorer(str(work / filename), version, tokenizer=str(gz))
            result["hpsv2"][version] = ours_pairwise(scorer, work, len(PROMPTS))
            del scorer
            result["timings"][f"hpsv2_{version}"] = time.time() - t0
    result["torch"] = torch.__version__
    out_file.write_text(json.dumps(result, indent=1))
    log(f"wrote {out_file}")


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------
def diff_line(name: str, ref: list[float], ours: list[float]) -> tuple[str, float]:
    if len(ref) != len(ours):
        raise SystemExit(f"{name}: {len(ref)} upstream values vs {len(ours)} ours")
    d = [abs(a - b) for a, b in zip(ref, ours)]
    mean = sum(ref) / len(ref)
    spread = math.sqrt(sum((r - mean) ** 2 for r in ref) / len(ref))
    return (f"{name:<34} n={len(ref):<4} max|diff|={max(d):.3e}  upstream range [{min(ref):.4f}, {max(ref):.4f}] "
            f"std {spread:.4f}"), max(d)


def run_compare(args) -> int:
    work = Path(args.workdir).resolve()
    up = json.loads((work / "upstream.json").read_text())
    ours = json.loads((work / "ours.json").read_text())
    vocab_note = "official bert-base-uncased" if up.get("bert_vocab_sha256") == BERT_BASE_UNCASED_VOCAB_SHA256 \
        else f"NOT the official bert-base-uncased vocab (sha256 {up.get('bert_vocab_sha256')})"
    print(f"BERT vocab: {vocab_note}")
    worst = 0.0
    rows = []
    up = {k: v for k, v in up.items() if k in ours or k in ("bert_vocab_sha256", "timings")}
    if "image_reward" in up:
        rows.append(diff_line("ImageReward v1.0 (ViT-L, full size)", up["image_reward"], ours["image_reward"]))
    for version in ("v2.0", "v2.1"):
        if version in up.get("hpsv2", {}):
            rows.append(diff_line(f"HPSv2 {version} (ViT-H-14, full size)", up["hpsv2"][version],
                                  ours["hpsv2"][version]))
    if "clip" in up:
        rows.append(diff_line("CLIP 100*cos vs torchmetrics", up["clip"]["similarity"], ours["clip"]["similarity"]))
    if "benchmark" in up:
        styles = sorted(up["benchmark"]["scores"])
        rows.append(diff_line("HPSv2 benchmark per-image (x100)", [v for s in styles for v in up["benchmark"]["scores"][s]],
                              [v for s in styles for v in ours["benchmark"]["scores"][s]]))
    for text, d in rows:
        print(text)
        worst = max(worst, d)
    if "benchmark" in up:
        printed = up["benchmark"]["printed"]
        print("HPSv2 benchmark protocol (upstream prints 2 decimals for means, 4 for chunk stds):")
        for style, r in sorted(ours["benchmark"]["styles"].items()):
            u = printed.get(style, {})
            print(f"  {style:<12} upstream {u.get('mean')!s:>8} / {u.get('chunk_std')!s:>8}   "
                  f"ours {r['mean']:.4f} / {r['chunk_std']:.6f}")
        print(f"  {'Average':<12} upstream {printed.get('Average', {}).get('mean')!s:>8}   ours {ours['benchmark']['overall']:.4f}")
        bad = [s for s, r in ours["benchmark"]["styles"].items()
               if abs(round(r["mean"], 2) - printed[s]["mean"]) > 0.0100001
               or abs(round(r["chunk_std"], 4) - printed[s]["chunk_std"]) > 0.000100001]
        if abs(round(ours["benchmark"]["overall"], 2) - printed["Average"]["mean"]) > 0.0100001:
            bad.append("Average")
        print("  protocol: " + ("MISMATCH in " + ", ".join(bad) if bad else "agrees at the printed precision"))
        worst = max(worst, 1.0 if bad else 0.0)
    if "clip" in up:
        clamped = [max(v, 0.0) for v in ours["clip"]["similarity"]]
        mean_sim = sum(ours["clip"]["similarity"]) / len(clamped)
        print(f"CLIP aggregate: torchmetrics compute() {up['clip']['torchmetrics_compute']:.6f}; "
              f"ours max(mean 100cos, 0) {max(mean_sim, 0):.6f}; ours mean per-pair-clamped score "
              f"{sum(ours['clip']['score']) / len(clamped):.6f} "
              f"({sum(v < 0 for v in ours['clip']['similarity'])} of {len(clamped)} pairs have cos < 0)")
    print(f"timings upstream {json.dumps({k: round(v, 1) for k, v in up['timings'].items()})}")
    print(f"timings ours     {json.dumps({k: round(v, 1) for k, v in ours['timings'].items()})}")
    print(f"LARGEST SCORE DIFFERENCE: {worst:.3e}")
    return 0 if worst <= args.tolerance else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["upstream", "ours", "compare", "all"])
    parser.add_argument("--workdir", default="/tmp/t2i_parity")
    parser.add_argument("--bert-vocab", help="bert-base-uncased vocab.txt (needed by `upstream`, `ours`, `all`)")
    parser.add_argument("--upstream-python", default="/tmp/t2i_parity_venv/bin/python")
    parser.add_argument("--skip", nargs="*", default=[], choices=["clip", "benchmark", "image_reward", "hpsv2"],
                        help="sections to leave out (their earlier results in the JSON files are kept)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest accepted absolute score difference")
    args = parser.parse_args()
    if args.command in ("upstream", "ours", "all") and not args.bert_vocab:
        parser.error("--bert-vocab is required")
    if args.command == "upstream":
        run_upstream(args)
    elif args.command == "ours":
        run_ours(args)
    elif args.command == "compare":
        return run_compare(args)
    else:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        common = ["--workdir", args.workdir, "--bert-vocab", args.bert_vocab] + (["--skip", *args.skip] if args.skip else [])
        t0 = time.time()
        subprocess.run([args.upstream_python, __file__, "upstream", *common], check=True, env=env)
        log(f"upstream side took {time.time() - t0:.0f} s")
        t0 = time.time()
        subprocess.run([sys.executable, __file__, "ours", *common], check=True, env=env)
        log(f"ditq side took {time.time() - t0:.0f} s")
        return run_compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
