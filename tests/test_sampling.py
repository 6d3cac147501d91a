import torch

from ditq.sampling import Sampler, labels_for_seeds, noise_for_seeds
from tests.helpers import random_dit, sampler_cfg


def test_noise_and_labels_depend_only_on_the_seed():
    a = noise_for_seeds([5, 6, 7], (1, 8, 8))
    b = noise_for_seeds([7, 5], (1, 8, 8))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    for mode in ("balanced", "random"):
        la = labels_for_seeds(list(range(100)), 10, mode)
        lb = labels_for_seeds(list(range(50, 60)), 10, mode)
        assert torch.equal(la[50:60], lb)
    assert torch.bincount(labels_for_seeds(list(range(100)), 10, "balanced")).tolist() == [10] * 10


def _run(adapter, cfg, seeds, bs):
    s = Sampler(adapter, cfg)
    return s.sample(seeds, labels_for_seeds(seeds, 10, "random"), batch_size=bs, progress=False)


def test_sample_i_is_independent_of_batch_size_and_neighbours():
    adapter = random_dit()
    for cfg in (sampler_cfg(), sampler_cfg(kind="dpm_solver", timestep_spacing="linspace"),
                sampler_cfg(eta=0.7), sampler_cfg(kind="ddpm", num_steps=6)):
        full = _run(adapter, cfg, list(range(8)), bs=8)
        small = _run(adapter, cfg, list(range(8)), bs=3)
        assert torch.allclose(full, small, atol=1e-5), cfg.kind
        alone = _run(adapter, cfg, [5], bs=1)
        assert torch.allclose(full[5], alone[0], atol=1e-5), cfg.kind


def test_guidance_follows_original_dit_channels():
    adapter = random_dit(dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                              num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10))
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 500])
    y = torch.tensor([3, 4])
    cond = adapter.denoise(x, t, y)
    uncond = adapter.denoise(x, t, torch.full_like(y, adapter.null_class))
    adapter.cfg_channels = 3
    s = Sampler(adapter, sampler_cfg(cfg_scale=4.0))
    eps = s.guided_eps(x, t, y)
    expect = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(eps[:, :3], expect[:, :3], atol=1e-5)
    assert torch.allclose(eps[:, 3:], cond[:, 3:], atol=1e-5)  # 4th channel: conditional only
    adapter.cfg_channels = None
    assert torch.allclose(Sampler(adapter, sampler_cfg(cfg_scale=4.0)).guided_eps(x, t, y), expect, atol=1e-5)
    assert torch.allclose(Sampler(adapter, sampler_cfg(cfg_scale=1.0)).guided_eps(x, t, y), cond, atol=1e-6)


def test_callback_sees_every_step():
    adapter = random_dit()
    seen = []
    s = Sampler(adapter, sampler_cfg(num_steps=5))
    s.sample([1, 2], torch.tensor([0, 1]), batch_size=2, callback=lambda i, t, x, y: seen.append((i, t, x.shape[0])),
             progress=False)
    assert [i for i, _, _ in seen] == list(range(5))
    assert [t for _, t, _ in seen] == s.timesteps() == [800, 600, 400, 200, 0]


def test_non_finite_samples_are_refused_naming_the_seeds():
    import pytest

    adapter = random_dit()
    adapter.denoiser.proj_out_2.bias.data[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN/Inf samples for seeds \[3, 4\]"):
        Sampler(adapter, sampler_cfg(num_steps=3)).sample([3, 4], torch.tensor([0, 1]), batch_size=2, progress=False)
