"""Q-DiT's baselines as ditq compositions: PTQ4DM (NDTC calibration, MSE ranges), SmoothQuant
(exact scale folding into DiT blocks, then RTN) and GPTQ with PTQ4DM's activation quantizer."""
from __future__ import annotations

import math

import pytest
import torch

from ditq.calibration.lazy import Lazy
from ditq.calibration.trajectories import ndtc_probabilities, ndtc_step, select_steps
from ditq.config import ConfigError, validate_config
from ditq.methods import fold
from ditq.methods.base import QuantContext
from ditq.methods.fold import FoldError, dit_blocks, fold_input_scale, fold_v_scale
from ditq.methods.options import SmoothQuantOptions
from ditq.methods.smoothquant import SmoothQuant
from tests.conftest import SHRINK
from tests.helpers import denoise_inputs, random_dit, rel_max_err, run_pipeline

Q, V, OUT, FC1 = (f"transformer_blocks.0.{n}" for n in ("attn1.to_q", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj"))


def _cfg(compose, *overrides):
    return validate_config(compose(SHRINK + list(overrides)))


def _embedded(compose):
    from ditq.models import load_adapter

    return load_adapter(_cfg(compose).model)


def _denoise(adapter, inputs):
    with torch.no_grad():
        return adapter.denoise(*inputs)


def _log_uniform(n: int, seed: int, lo: float = 0.05, hi: float = 20.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(math.log(lo) + torch.rand(n, generator=g) * (math.log(hi) - math.log(lo)))


def _apply_folds(adapter, which: str, seed: int = 0) -> None:
    for k, block in enumerate(dit_blocks(adapter)):
        width = block.attn1.to_q.in_features
        if which in ("attn", "all"):
            fold_input_scale(adapter, k, "attn", _log_uniform(width, seed + 3 * k))
        if which in ("mlp", "all"):
            fold_input_scale(adapter, k, "mlp", _log_uniform(width, seed + 3 * k + 1))
        if which in ("v", "all"):
            fold_v_scale(block, _log_uniform(block.attn1.to_v.out_features, seed + 3 * k + 2))


# ----------------------------------------------------------------------------- fold exactness
@pytest.mark.parametrize("which", ["attn", "mlp", "v", "all"])
@pytest.mark.parametrize("model", ["embedded", "random"])
def test_fold_is_exact(compose, model, which):
    adapter = _embedded(compose) if model == "embedded" else random_dit()
    inputs = denoise_inputs()
    ref = _denoise(adapter, inputs)
    before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    _apply_folds(adapter, which)
    changed = [n for n, p in adapter.denoiser.named_parameters() if not torch.equal(p, before[n])]
    assert changed  # the folds did change weights ...
    assert rel_max_err(_denoise(adapter, inputs), ref) < 1e-5  # ... and the function is the same to float32 rounding


@pytest.mark.parametrize("wrong", [
    ("scale_msa", "shift_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp"),  # shift/scale swapped
    ("shift_mlp", "scale_mlp", "gate_mlp", "shift_msa", "scale_msa", "gate_msa"),  # attention/MLP halves swapped
])
def test_fold_with_a_wrong_chunk_order_is_not_exact(monkeypatch, wrong):
    """The exactness tests above would catch a wrong adaLN chunk order (diffusers' AdaLayerNormZero)."""
    adapter = random_dit()
    inputs = denoise_inputs()
    ref = _denoise(adapter, inputs)
    monkeypatch.setattr(fold, "ADALN_CHUNKS", wrong)
    _apply_folds(adapter, "all")
    assert rel_max_err(_denoise(adapter, inputs), ref) > 1e-3


def test_fold_refuses_bad_scales_and_fitted_quantizers():
    adapter = random_dit()
    width = dit_blocks(adapter)[0].attn1.to_q.in_features
    with pytest.raises(FoldError, match="finite and > 0"):
        fold_input_scale(adapter, 0, "attn", torch.zeros(width))
    with pytest.raises(FoldError, match="1-D tensor of 32"):
        fold_input_scale(adapter, 0, "mlp", torch.ones(width + 1))
    with pytest.raises(FoldError, match="out of range"):
        fold_input_scale(adapter, 7, "attn", torch.ones(width))
    with pytest.raises(FoldError, match="target="):
        fold_input_scale(adapter, 0, "fc2", torch.ones(width))
    from ditq.quant.modules import QuantLinear
    from ditq.quant.quantizer import build_quantizer
    from ditq.quant.spec import QuantizerConfig

    block = dit_blocks(adapter)[0]
    q = QuantLinear(block.attn1.to_v, build_quantizer(QuantizerConfig(format="int8", granularity="per_channel"), "weight"))
    block.attn1.to_v = q
    q.refresh()  # fits the weight grid
    before = block.attn1.to_out[0].weight.detach().clone()
    with pytest.raises(FoldError, match="attn1.to_v: weight quantizer fitted"):
        fold_v_scale(block, torch.full((width,), 2.0))
    assert torch.equal(block.attn1.to_out[0].weight, before)  # nothing folded


# ----------------------------------------------------------------------------- the SmoothQuant step
def _smoothquant_setup(compose, *overrides):
    """The embedded model wrapped for method=smoothquant, with FP calibration trajectories and layer inputs."""
    from ditq.calibration import collect_layer_inputs, collect_trajectory_inputs
    from ditq.methods.wrap import full_precision, wrap_layers
    from ditq.models import load_adapter
    from ditq.sampling import Sampler

    run = _cfg(compose, "method=smoothquant", "bits=w8a8", *overrides)
    adapter = load_adapter(run.model)
    sampler = Sampler(adapter, run.sampler, clip_sample=run.model.clip_sample)
    calib = collect_trajectory_inputs(sampler, run.calib, adapter.num_classes, progress=False)
    qlayers, roles = wrap_layers(adapter, run)

    def record():
        with full_precision(qlayers):
            return collect_layer_inputs(adapter, calib, list(qlayers), 512, include_uncond=True, progress=False)

    lazy = Lazy(record, "layer inputs")
    ctx = QuantContext(adapter=adapter, run=run, qlayers=qlayers, roles=roles, layer_inputs=lazy, progress=False)
    return run, adapter, calib, qlayers, ctx, record


def _act_output_error(x: torch.Tensor, w: torch.Tensor) -> float:
    """|| (Q(x) - x) W^T ||: the layer-output error of per-tensor asymmetric INT8 MinMax activations."""
    from ditq.quant.quantizer import build_quantizer
    from ditq.quant.spec import QuantizerConfig

    aq = build_quantizer(QuantizerConfig(format="int8", granularity="per_tensor", symmetric=False), "act")
    aq.fit(x)
    return float(torch.linalg.norm((aq(x) - x) @ w.t()))


def test_smoothquant_step_exact_and_reduces_act_error(compose):
    from ditq.methods.wrap import full_precision

    run, adapter, calib, qlayers, ctx, record = _smoothquant_setup(compose)
    original = ctx.layer_inputs()
    kept = {n: {k: v.clone() for k, v in rec.items()} for n, rec in original.items()}
    weights = {n: q.weight.detach().clone() for n, q in qlayers.items()}
    ada = dit_blocks(adapter)[0].norm1.linear.weight.detach().clone()
    recs = (calib["x"][:6], calib["t"][:6], calib["y"][:6])
    with full_precision(qlayers):
        ref = _denoise(adapter, recs)

    SmoothQuant(SmoothQuantOptions()).apply(ctx)

    with full_precision(qlayers):  # the smoothed FP model is the same function
        assert rel_max_err(_denoise(adapter, recs), ref) < 1e-5
    assert not torch.equal(dit_blocks(adapter)[0].norm1.linear.weight, ada)
    smoothed = ctx.layer_inputs()
    for n, rec in original.items():  # cached tensors untouched
        assert all(torch.equal(rec[k], kept[n][k]) for k in rec)
    fc2 = "transformer_blocks.0.ff.net.2"
    assert smoothed[fc2] is original[fc2] and torch.equal(qlayers[fc2].weight, weights[fc2])  # fc2: unsmoothed
    again = record()  # the replaced entries are what the smoothed model sees
    for n in (Q, V, OUT, FC1):
        assert torch.allclose(smoothed[n]["max"], again[n]["max"], rtol=1e-4, atol=1e-6)
        assert torch.allclose(smoothed[n]["min"], again[n]["min"], rtol=1e-4, atol=1e-6)
    # per-tensor activation quantization error at the smoothed layers' outputs, on calibration inputs
    before = after = 0.0
    for n in qlayers:
        if ctx.roles[n] in ("qkv", "proj", "fc1"):
            before += _act_output_error(original[n]["rows"], weights[n])
            after += _act_output_error(smoothed[n]["rows"], qlayers[n].weight.detach())
    print(f"act-quant output error, smoothed / unsmoothed: {after / before:.3f}")
    assert after < 0.9 * before, (after, before)
    info = ctx.diagnostics["smoothquant"]
    assert info["alpha"] == 0.5 and info["smoothed_inputs"] == 3 * len(dit_blocks(adapter))


def test_smoothquant_refuses_fitted_quantizers(compose):
    from ditq.methods.rtn import RTN

    _, adapter, _, qlayers, ctx, _ = _smoothquant_setup(compose)
    RTN(None).apply(ctx)
    before = {n: q.weight.detach().clone() for n, q in qlayers.items()}
    with pytest.raises(FoldError, match="before the scale folding.*put the smoothing step first"):
        SmoothQuant(SmoothQuantOptions()).apply(ctx)
    assert all(torch.equal(q.weight, before[n]) for n, q in qlayers.items())  # nothing half-folded


def test_lazy_replace():
    lazy = Lazy(lambda: {"a": 1}, "things")
    assert lazy.get() == {"a": 1}
    lazy.replace({"a": 2})
    assert lazy.get() == {"a": 2}
    lazy.release()
    with pytest.raises(RuntimeError, match="released"):
        lazy.replace({"a": 3})


# ----------------------------------------------------------------------------- NDTC calibration
class _Calib:
    timesteps, ndtc_mean, ndtc_std = "ndtc", 0.4, 0.4


def test_ndtc_is_deterministic_per_seed():
    seeds = list(range(1_000_000, 1_000_200))
    picks = select_steps(25, _Calib, seeds)
    assert all(len(p) == 1 for p in picks)
    assert picks == select_steps(25, _Calib, seeds)
    assert select_steps(25, _Calib, seeds[50:60]) == picks[50:60]  # a seed's step ignores the other seeds
    assert len({min(p) for p in picks}) > 5


def test_ndtc_distribution_as_documented():
    n, seeds = 25, range(20_000)
    counts = [0] * n
    for s in seeds:
        counts[ndtc_step(n, s, 0.4, 0.4)] += 1
    probs = ndtc_probabilities(n, 0.4, 0.4)
    assert abs(sum(probs) - 1) < 1e-12
    for c, p in zip(counts, probs):
        assert abs(c / len(seeds) - p) < 4 * math.sqrt(p * (1 - p) / len(seeds)) + 1e-3
    # u < 0 clamps to the last (cleanest) step: P = Phi(-1) + the first bin; most mass on the clean side
    assert probs[-1] == pytest.approx(0.5 * (1 + math.erf((1 / n - 0.4) / (0.4 * math.sqrt(2)))))
    assert sum(probs[n // 2 + 1:]) > 0.5 > sum(probs[: n // 2])
    assert ndtc_step(n, 0, 0.0, 1e-9) == n - 1 and ndtc_step(n, 0, 1.0, 1e-9) == 0


def test_ptq4dm_config(compose):
    run = _cfg(compose, "method=ptq4dm")
    assert run.calib.timesteps == "ndtc"
    assert _cfg(compose, "method=ptq4dm", "calib.timesteps=uniform").calib.timesteps == "uniform"
    assert _cfg(compose, "method=rtn").calib.timesteps == "uniform"
    a, w = run.method.act, run.method.weight
    assert (a.granularity, a.symmetric, a.dynamic, a.range) == ("per_tensor", False, False, "mse")
    assert (w.granularity, w.range) == ("per_channel", "mse")
    assert list(run.method.layers) == ["qkv", "proj", "cross_attn", "fc1", "fc2", "conv"]
    gptq = _cfg(compose, "method=gptq")
    assert gptq.method.act.range == "mse" and gptq.method.act.clip_norm == a.clip_norm == 2.4
    with pytest.raises(ConfigError, match="calib.ndtc_std=0.0 must be a finite number > 0"):
        _cfg(compose, "method=ptq4dm", "calib.ndtc_std=0")


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_smoothquant_alpha_out_of_range(compose, alpha):
    with pytest.raises(ConfigError, match=r"method\.steps.*smoothquant.*alpha=.*must be in \[0, 1\].*method\.steps\.0\.alpha"):
        _cfg(compose, "method=smoothquant", f"method.steps.0.alpha={alpha}")
    with pytest.raises(ConfigError, match="fc2 cannot be smoothed exactly"):
        _cfg(compose, "method=smoothquant", "method.steps.0.roles=[qkv,fc2]")


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", ["ptq4dm", "smoothquant", "gptq"])
def test_baseline_end_to_end(compose, paths, tmp_path, method):
    row = run_pipeline(compose, paths + [f"method={method}", "bits=w8a8"], tmp_path / "run")
    m = row["metrics"]
    assert m and all(math.isfinite(v) for v in m.values()), m
    assert row["config"]["method"]["name"] == method
    if method == "ptq4dm":
        assert row["config"]["calib"]["timesteps"] == "ndtc"
    if method == "smoothquant":
        assert row["diagnostics"]["smoothquant"]["smoothed_inputs"] > 0
