import torch
from omegaconf import OmegaConf

from ditq.calibration import collect_layer_inputs, collect_trajectory_inputs, select_steps
from ditq.config.schema import CalibConfig
from ditq.sampling import Sampler
from tests.helpers import random_dit, sampler_cfg


def calib_cfg(**kw):
    base = dict(num_samples=6, seed_start=100, num_timesteps=3, batch_size=4)
    base.update(kw)
    return OmegaConf.structured(CalibConfig(**base))


def test_select_steps_modes():
    seeds = list(range(10))
    uni = select_steps(10, calib_cfg(timesteps="uniform", num_timesteps=4), seeds)
    assert uni[0] == {0, 3, 6, 9} and all(s == uni[0] for s in uni)
    assert select_steps(5, calib_cfg(timesteps="all"), seeds)[3] == set(range(5))
    rnd = select_steps(50, calib_cfg(timesteps="random_per_sample"), seeds)
    assert all(len(s) == 1 for s in rnd)
    assert len({next(iter(s)) for s in rnd}) > 3  # different seeds, different steps
    assert select_steps(50, calib_cfg(timesteps="random_per_sample"), [7])[0] == rnd[7]  # per-seed


def test_trajectory_inputs_record_selected_steps():
    adapter = random_dit()
    sampler = Sampler(adapter, sampler_cfg(num_steps=5))
    out = collect_trajectory_inputs(sampler, calib_cfg(timesteps="uniform", num_timesteps=3), 10, progress=False)
    assert out["x"].shape == (6 * 3, 1, 8, 8)
    assert sorted(set(out["t"].tolist())) == [0, 400, 800]
    assert sorted(set(out["step"].tolist())) == [0, 2, 4]
    assert sorted(set(out["seed"].tolist())) == list(range(100, 106))
    # the record at the first step is the seed's initial noise
    first = out["step"] == 0
    from ditq.sampling import noise_for_seeds

    assert torch.allclose(out["x"][first], noise_for_seeds(out["seed"][first].tolist(), (1, 8, 8)))


def test_layer_inputs_keep_exact_channel_ranges():
    adapter = random_dit()
    sampler = Sampler(adapter, sampler_cfg(num_steps=4))
    traj = collect_trajectory_inputs(sampler, calib_cfg(timesteps="all"), 10, progress=False)
    names = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2", "pos_embed.proj",
             "transformer_blocks.0.norm1.linear"]
    full = {}

    def grab(name):
        def hook(mod, args):
            x = args[0]
            rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x.reshape(-1, x.shape[-1])
            full.setdefault(name, []).append(rows)
        return hook

    mods = dict(adapter.denoiser.named_modules())
    hs = [mods[n].register_forward_pre_hook(grab(n)) for n in names]
    x = torch.cat([traj["x"], traj["x"]])
    t = torch.cat([traj["t"], traj["t"]])
    y = torch.cat([traj["y"], torch.full_like(traj["y"], adapter.null_class)])
    adapter.denoise(x, t, y)
    for h in hs:
        h.remove()
    got = collect_layer_inputs(adapter, traj, names, max_tokens=50, include_uncond=True, batch_size=7, progress=False)
    for n in names:
        ref = torch.cat(full[n])
        assert set(got[n]) == {"rows", "min", "max"}
        assert got[n]["rows"].shape[1] == ref.shape[1]
        assert got[n]["rows"].shape[0] <= 50  # the sample only: no min/max rows appended
        assert torch.allclose(got[n]["min"], ref.amin(0), atol=1e-5)
        assert torch.allclose(got[n]["max"], ref.amax(0), atol=1e-5)


def test_non_finite_activation_is_reported():
    adapter = random_dit()
    traj = {"x": torch.full((2, 1, 8, 8), float("nan")), "t": torch.tensor([5, 5]), "y": torch.tensor([1, 2])}
    import pytest

    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        collect_layer_inputs(adapter, traj, ["transformer_blocks.0.attn1.to_q"], 10, include_uncond=False,
                             progress=False)
