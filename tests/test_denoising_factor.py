"""DFA's denoising factor gamma_t: the DDIM closed form equals the coefficient measured through the
scheduler at every step; the numeric measurement on DDPM and DPM-Solver; the loss weights."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ditq.config.schema import SamplerConfig
from ditq.sampling import Sampler
from ditq.sampling.denoising_factor import ddim_gamma, dfa_weights, gamma_for_sampler, measured_gamma

ROOT = Path(__file__).resolve().parents[1]


class _SchedulerOnly:
    """The one adapter method a Sampler's scheduler needs: the embedded DiT's schedule."""

    def scheduler_config(self):
        return json.loads((ROOT / "src/ditq/assets/tiny_dit_digits/scheduler/scheduler_config.json").read_text())


def _sampler(name: str, **kw) -> Sampler:
    cfg = OmegaConf.merge(OmegaConf.structured(SamplerConfig), OmegaConf.load(ROOT / f"conf/sampler/{name}.yaml"), kw)
    return Sampler(_SchedulerOnly(), cfg)


@pytest.mark.parametrize("name", ["ddim25", "ddim50"])
def test_ddim_closed_form_equals_the_schedulers_own_coefficient_at_every_step(name):
    s = _sampler(name)
    closed = ddim_gamma(s.make_scheduler())
    numeric = measured_gamma(s.make_scheduler)
    assert list(closed) == s.timesteps() and len(closed) == s.cfg.num_steps
    for t in closed:
        assert closed[t] == pytest.approx(numeric[t], abs=1e-6), t
    g = list(closed.values())
    assert all(v < 0 for v in g)  # x0_pred removes the predicted noise
    assert abs(g[0]) > abs(g[len(g) // 2]) > abs(g[-1])  # the noisiest steps pass the most error on


def test_measured_gamma_on_ddpm_matches_its_posterior_mean_coefficient():
    """DDPM: x_prev = mean + sigma z, mean's eps coefficient = -beta_t / (sqrt(alpha_t) sqrt(1 - abar_t))
    (with t_prev = t - 1 in the 1000-step sampler); the seeded noise cancels in the difference."""
    s = _sampler("ddpm250", num_steps=1000, timestep_spacing="leading")
    sch = s.make_scheduler()
    ac, betas = sch.alphas_cumprod.double(), sch.betas.double()
    g = gamma_for_sampler(s)
    for t in (999, 500, 10):
        expected = float(-betas[t] / ((1 - betas[t]).sqrt() * (1 - ac[t]).sqrt()))
        # diffusers recovers beta_t as 1 - abar_t / abar_prev in float32: ~1e-7 / beta_t relative error at small t
        assert g[t] == pytest.approx(expected, rel=1e-3), t


def test_measured_gamma_works_for_the_multistep_dpm_solver():
    s = _sampler("dpm20")
    g = gamma_for_sampler(s)
    assert list(g) == s.timesteps()
    assert all(torch.isfinite(torch.tensor(v)) and v != 0 for v in g.values())


def test_dfa_weights_have_mean_one_and_power_zero_is_uniform():
    g = {900: -0.5, 500: -0.25, 0: -0.05}
    w = dfa_weights(g, 1.0)
    assert sum(w.values()) / 3 == pytest.approx(1.0)
    assert w[900] / w[500] == pytest.approx(2.0) and w[500] / w[0] == pytest.approx(5.0)
    assert dfa_weights(g, 2.0)[900] / dfa_weights(g, 2.0)[500] == pytest.approx(4.0)
    assert all(v == pytest.approx(1.0) for v in dfa_weights(g, 0.0).values())
    with pytest.raises(ValueError, match="dfa=false"):
        dfa_weights({1: 0.0, 2: 0.0})
