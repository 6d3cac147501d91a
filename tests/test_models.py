import pytest
import torch
from omegaconf import OmegaConf

from ditq.config import validate_config
from ditq.models import MissingCheckpointError, load_adapter
from tests.helpers import random_dit


def test_embedded_model_loads_with_roles(compose):
    run = validate_config(compose([]))
    adapter = load_adapter(run.model)
    roles = {}
    for info in adapter.layers():
        roles.setdefault(info.role, []).append(info.name)
    n_blocks = len(adapter.blocks())
    assert n_blocks == 6
    assert len(roles["qkv"]) == 3 * n_blocks
    assert len(roles["proj"]) == len(roles["fc1"]) == len(roles["fc2"]) == len(roles["adaln"]) == n_blocks
    assert set(roles["final"]) == {"proj_out_1", "proj_out_2"}
    assert "pos_embed.proj" in roles["embed"]
    assert adapter.latent_shape == (1, 8, 8) and adapter.null_class == 10


def test_embedded_model_counts_shared_embedder_once(compose):
    adapter = load_adapter(validate_config(compose([])).model)
    all_params = sum(p.numel() for p in adapter.denoiser.parameters())
    unique = sum(p.numel() for p in adapter.unique_parameters())
    emb = sum(p.numel() for p in adapter.denoiser.transformer_blocks[0].norm1.emb.parameters())
    assert all_params - unique == 5 * emb  # 6 identical copies, one counted
    assert adapter.parameter_bits({}) == 32 * unique


def test_denoise_depends_on_label_and_time():
    adapter = random_dit()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 10])
    a = adapter.denoise(x, t, torch.tensor([1, 1]))
    b = adapter.denoise(x, t, torch.tensor([1, adapter.null_class]))
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])
    c = adapter.denoise(x, torch.tensor([10, 900]), torch.tensor([1, 1]))
    assert not torch.allclose(a[1], c[1])


def test_missing_checkpoint_says_what_to_download(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = validate_config(compose(["model=dit_xl_256", "dataset=imagenet", f"paths.models_dir={tmp_path}"]))
    with pytest.raises(MissingCheckpointError) as err:
        load_adapter(run.model)
    msg = str(err.value)
    assert "facebook/DiT-XL-2-256" in msg and "huggingface-cli download" in msg
    assert str(tmp_path / "DiT-XL-2-256") in msg and "model.path" in msg


def test_broken_checkpoint_dir_is_reported(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    from ditq.config.schema import ModelConfig

    cfg = OmegaConf.structured(ModelConfig(name="broken", weights="local", path=str(tmp_path), num_classes=10))
    with pytest.raises((MissingCheckpointError, ValueError)) as err:
        load_adapter(cfg)
    assert "broken" in str(err.value) or str(tmp_path) in str(err.value)


def test_dit_xl_architecture_roles_at_reduced_depth(compose):
    # The DiT-XL/2 config with 2 of its 28 blocks: same widths, same role map.
    run = validate_config(compose(["model=dit_xl_256", "dataset=imagenet", "model.weights=random", "model.arch.num_layers=2"]))
    adapter = load_adapter(run.model)
    infos = adapter.layers()
    widths = {i.role: adapter.denoiser.get_submodule(i.name).weight.shape for i in infos}
    assert widths["qkv"] == (1152, 1152) and widths["fc1"] == (4608, 1152) and widths["fc2"] == (1152, 4608)
    assert widths["adaln"] == (6 * 1152, 1152)
    assert adapter.latent_shape == (4, 32, 32) and adapter.cfg_channels == 3


@pytest.mark.slow
def test_full_dit_xl_builds_at_scale(compose):
    run = validate_config(compose(["model=dit_xl_256", "dataset=imagenet", "model.weights=random"]))
    adapter = load_adapter(run.model)
    n = sum(p.numel() for p in adapter.denoiser.parameters())
    assert 740e6 < n < 760e6  # diffusers keeps a per-block copy of the embedder
    unique = sum(p.numel() for p in adapter.unique_parameters())
    assert unique < n
    blocks = [i for i in adapter.layers() if i.role in ("qkv", "proj", "fc1", "fc2")]
    assert len(blocks) == 28 * 6
