"""CLIP score end to end on a tiny random transformers CLIPModel (offline)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ditq.metrics.clip_score import ClipScorer
from ditq.metrics.t2i_common import CLIP_MEAN, CLIP_STD

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "t2i"
PROMPTS = ["the cat", "a dog on the mat", "red", "blue photo", "sit", "the red cat sat on a blue mat"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_tiny_clip(path: Path, seed: int = 0, hidden: int = 32) -> Path:
    from transformers import CLIPConfig, CLIPModel

    path.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(FIXTURES / "clip_tokenizer" / name, path / name)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=535, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=533, eos_token_id=534,
                         pad_token_id=534),
        vision_config=dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": 3,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_resize": True, "do_center_crop": True,
        "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
    }))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer(str(clip_dir))


def images(n: int = 6, h: int = 45, w: int = 37, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def reference_similarity(clip_dir: Path, imgs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """100 * cos through transformers' own CLIP processor, tokenizer and CLIPModel.forward."""
    from transformers import CLIPModel, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    pixels = Processor.from_pretrained(str(clip_dir))(images=[im for im in imgs], return_tensors="pt")["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(str(clip_dir))(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return 100 * torch.diagonal(out.logits_per_image).double() / model.logit_scale.exp().double()


def test_clip_score_matches_transformers_reference_and_definition(scorer, clip_dir):
    imgs = images()
    sim = scorer.similarity(imgs, PROMPTS, batch_size=4)
    score = scorer.score(imgs, PROMPTS, batch_size=4)
    ref = reference_similarity(clip_dir, imgs, PROMPTS)
    assert sim.dtype == score.dtype == torch.float64 and score.shape == (6,)
    torch.testing.assert_close(sim, ref, atol=2e-4, rtol=0)
    torch.testing.assert_close(score, ref.clamp(min=0), atol=2e-4, rtol=0)
    assert (sim.abs() <= 100).all() and (score >= 0).all()
    assert sim.min() < 0 < sim.max()  # the random model gives both signs, so the clamp is exercised


def test_clip_score_does_not_depend_on_batching(scorer):
    imgs = images(5, 40, 40, seed=1)
    prompts = PROMPTS[:5]
    torch.testing.assert_close(scorer.score(imgs, prompts, batch_size=1), scorer.score(imgs, prompts, batch_size=32),
                               atol=1e-4, rtol=0)


def test_clip_settings_record_model_and_definition(scorer, clip_dir):
    s = scorer.settings()
    assert s["metric"] == "clip_score" and s["model"] == str(clip_dir)
    assert "100*max(cos" in s["definition"]
    assert s["preprocessing"]["center_crop"] == 32 and s["preprocessing"]["crop_offset"] == "floor"
    assert s["tokenizer"]["max_length"] == 16
    json.dumps(s)


def test_clip_bad_inputs_fail_before_scoring(scorer):
    with pytest.raises(TypeError, match="uint8"):
        scorer.score(torch.rand(2, 3, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        scorer.score(images(3), ["a", "b"])
    with pytest.raises(ValueError, match="permute"):
        scorer.score(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), ["a", "b"])


def test_clip_missing_files(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ClipScorer(str(tmp_path))
    partial = tmp_path / "no-weights"
    partial.mkdir()
    shutil.copy(clip_dir / "preprocessor_config.json", partial)
    shutil.copy(clip_dir / "config.json", partial)
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-base-patch32"):
        ClipScorer(str(partial))


def test_clip_checkpoint_not_matching_config_is_refused(tmp_path, clip_dir):
    other = write_tiny_clip(tmp_path / "wider", hidden=48)
    bad = tmp_path / "mismatch"
    shutil.copytree(clip_dir, bad)
    shutil.copy(other / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        ClipScorer(str(bad))
