"""RepQ-ViT on DiT (ditq.methods.repq): the exact reparameterisation through the adaLN linear, the
explicit-softmax attention processor (ditq.quant.attention), the log2 quantizer (ditq.quant.log2),
and the method composition conf/method/repq_vit.yaml end to end."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.conftest import SHRINK
from tests.helpers import random_dit, run_pipeline

Q = "transformer_blocks.0.attn1.to_q"
FC1 = "transformer_blocks.0.ff.net.0.proj"
ADALN = "transformer_blocks.0.norm1.linear"


def _records(n=6, seed=0, timesteps=(999, 500, 20)):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([timesteps[i % len(timesteps)] for i in range(n)])
    return {"x": torch.randn(n, 1, 8, 8, generator=g), "t": t, "y": torch.randint(0, 10, (n,), generator=g)}


def _setup(compose, paths, adapter=None, overrides=(), bits="w8a8"):
    """(run, adapter, qlayers, ctx) of method=repq_vit with FP layer inputs from a few records, held in
    a Lazy as the pipeline holds them."""
    from ditq.calibration import collect_layer_inputs
    from ditq.calibration.lazy import Lazy
    from ditq.config import validate_config
    from ditq.methods.base import QuantContext
    from ditq.methods.wrap import full_precision, wrap_layers
    from ditq.models import load_adapter

    run = validate_config(compose(SHRINK + paths + ["method=repq_vit", f"bits={bits}", *overrides]))
    adapter = adapter or load_adapter(run.model)
    qlayers, roles = wrap_layers(adapter, run)

    def record():
        with full_precision(qlayers):
            return collect_layer_inputs(adapter, _records(8), list(qlayers), 512, include_uncond=True,
                                        batch_size=8, progress=False)

    ctx = QuantContext(adapter=adapter, run=run, qlayers=qlayers, roles=roles, layer_inputs=Lazy(record, "layer inputs"),
                       progress=False)
    return run, adapter, qlayers, ctx


def _steps(run):
    from ditq.methods.registry import build_steps

    return build_steps(list(run.method.steps))


# ----------------------------------------------------------------------------- log2 quantizer
def test_log2_grid_values_zeros_and_bit_width():
    from ditq.quant.log2 import Log2Quantizer, log2_quantize

    q = Log2Quantizer(2)  # levels 1, 1/2, 1/4, 1/8, and 0 below
    x = torch.tensor([1.0, 0.9, 0.5, 0.36, 0.3, 0.25, 0.125, 2 ** -3.4, 2 ** -3.6, 1e-3, 0.0, 1.5, -0.1])
    want = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0, 0.0, 0.0, 1.0, 0.0])
    assert torch.equal(q(x), want)  # round in the log domain; 2^-3.6 rounds to k = 4 > 3: zero; > 1 saturates
    assert torch.equal(q.levels(), torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64))
    # 4 bits: 16 levels down to 2^-15, zero below 2^-15.5
    out = log2_quantize(torch.tensor([2 ** -15, 2 ** -15.4, 2 ** -15.6]), 4)
    assert torch.equal(out, torch.tensor([2 ** -15, 2 ** -15, 0.0]))
    # every output of a random probability tensor is a level or zero; dtype and shape kept
    p = torch.softmax(torch.randn(3, 7, 9) * 4, dim=-1).half()
    o = Log2Quantizer(3)(p)
    assert o.dtype == p.dtype and o.shape == p.shape
    grid = set(Log2Quantizer(3).levels().tolist()) | {0.0}
    assert set(o.float().unique().tolist()) <= grid
    with pytest.raises(ValueError, match="bits=0"):
        Log2Quantizer(0)
    # scale: levels scale * 2^-k
    assert torch.equal(log2_quantize(torch.tensor([0.5, 0.26]), 2, scale=0.5), torch.tensor([0.5, 0.25]))
    # base sqrt(2) (RepQ-ViT's grid): levels 2^(-k/2), k = 0 .. 3 at 2 bits, zero below 2^-1.75
    s2 = Log2Quantizer(2, sqrt2=True)
    torch.testing.assert_close(s2.levels(), torch.tensor([1.0, 2 ** -0.5, 0.5, 2 ** -1.5], dtype=torch.float64))
    x = torch.tensor([1.0, 0.75, 0.6, 0.4, 2 ** -1.7, 2 ** -1.8, 0.0])
    want = torch.tensor([1.0, 2 ** -0.5, 2 ** -0.5, 2 ** -1.5, 2 ** -1.5, 0.0, 0.0])
    torch.testing.assert_close(s2(x), want, rtol=0, atol=0)
    # half the log step: on probabilities its relative error is about half of base 2's
    p = torch.softmax(torch.randn(64, 64) * 3, dim=-1)
    rel = lambda q: ((q(p) - p).abs() / p).mean().item()  # noqa: E731
    assert rel(Log2Quantizer(8, sqrt2=True)) < 0.6 * rel(Log2Quantizer(8))


# ----------------------------------------------------------------------------- attention processor
def test_processor_equals_stock_attention_without_quantizer():
    from ditq.quant import attention as qa

    adapter = random_dit()
    r = _records(4)
    with torch.no_grad():
        stock = adapter.denoise(r["x"], r["t"], r["y"])
        attns = qa.attention_modules(adapter.denoiser)
        assert len(attns) == 2  # one self-attention per block
        procs = qa.install(attns, lambda n, a: None, gate=False)
        assert not any(p.active for p in procs.values())
        assert torch.equal(adapter.denoise(r["x"], r["t"], r["y"]), stock)  # inactive: the stock SDPA path
        for p in procs.values():  # explicit softmax with an identity "quantizer": stock to float32 rounding
            p.quantizer = lambda probs: probs
        explicit = adapter.denoise(r["x"], r["t"], r["y"])
        assert all(p.quantized_calls == 1 for p in procs.values())
        torch.testing.assert_close(explicit, stock, rtol=1e-5, atol=1e-6)
        # in chunks of the batch (a small score budget) it is the same
        old, qa.MAX_SCORE_ELEMENTS = qa.MAX_SCORE_ELEMENTS, 1
        try:
            torch.testing.assert_close(adapter.denoise(r["x"], r["t"], r["y"]), explicit, rtol=1e-6, atol=1e-7)
        finally:
            qa.MAX_SCORE_ELEMENTS = old
        assert qa.remove(adapter.denoiser) == 2 and not qa.installed(adapter.denoiser)
        assert torch.equal(adapter.denoise(r["x"], r["t"], r["y"]), stock)


def test_processor_with_a_mask_equals_stock():
    from diffusers.models.attention_processor import Attention

    from ditq.quant.attention import QuantAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(3, 5, 16)
    mask = torch.zeros(3, 5)
    mask[:, -2:] = -10000.0  # diffusers' additive mask
    with torch.no_grad():
        stock = attn(x, attention_mask=mask)
        attn.set_processor(QuantAttnProcessor(lambda p: p))
        torch.testing.assert_close(attn(x, attention_mask=mask), stock, rtol=1e-5, atol=1e-6)


def test_install_needs_quantized_layers_to_follow():
    from ditq.quant import attention as qa

    adapter = random_dit()
    with pytest.raises(ValueError, match="none of them is quantized"):
        qa.install(qa.attention_modules(adapter.denoiser), lambda n, a: (lambda p: p))
    assert not qa.installed(adapter.denoiser)  # nothing half installed


# ----------------------------------------------------------------------------- the reparameterisation
def test_reparam_keeps_the_fp_function_and_records_are_new_tensors(compose, paths):
    from ditq.methods.wrap import full_precision

    run, adapter, qlayers, ctx = _setup(compose, paths)
    r = _records(4, seed=3)
    with torch.no_grad(), full_precision(qlayers):
        before = adapter.denoise(r["x"], r["t"], r["y"])
    fp_inputs = ctx.layer_inputs()
    kept = {n: {k: v.clone() for k, v in rec.items()} for n, rec in fp_inputs.items()}
    originals = {n: rec["rows"] for n, rec in fp_inputs.items()}
    w_adaln = adapter.denoiser.get_submodule(ADALN).weight.detach().clone()
    repq, rtn = _steps(run)
    assert repq.needs_layer_inputs(ctx)
    repq.apply(ctx)
    assert not torch.equal(adapter.denoiser.get_submodule(ADALN).weight, w_adaln)  # the fold happened
    with torch.no_grad(), full_precision(qlayers):
        after = adapter.denoise(r["x"], r["t"], r["y"])
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    # the recorded tensors were not written; the entries of the post-norm consumers are new
    inputs = ctx.layer_inputs()
    for n, rec in kept.items():
        assert torch.equal(originals[n], rec["rows"]), n
    for n in (Q, FC1):
        assert inputs[n]["rows"] is not originals[n] and not torch.equal(inputs[n]["rows"], kept[n]["rows"])
    proj = "transformer_blocks.0.attn1.to_out.0"
    assert inputs[proj]["rows"] is originals[proj]
    # the new records are the consumers' inputs in the reparameterised FP model
    from ditq.calibration import collect_layer_inputs

    with full_precision(qlayers):
        fresh = collect_layer_inputs(adapter, _records(8), [Q, FC1], 512, include_uncond=True, batch_size=8,
                                     progress=False)
    for n in (Q, FC1):
        torch.testing.assert_close(fresh[n]["min"], inputs[n]["min"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fresh[n]["max"], inputs[n]["max"], rtol=1e-4, atol=1e-5)
    # the per-tensor grid is frozen by repq; rtn keeps it and fits the rest
    assert qlayers[Q].act_quantizer.frozen_by == "repq" and qlayers[Q].act_quantizer.scale.ndim == 0
    rtn.apply(ctx)
    assert qlayers[Q].act_quantizer.frozen_by == "repq"
    assert qlayers[proj].act_quantizer.is_fitted and not qlayers[proj].act_quantizer.frozen
    assert ctx.diagnostics["repq"]["sites"] == 2 * 6


def test_reparameterised_per_tensor_error_is_lower_than_plain_per_tensor(compose, paths):
    """On the calibration inputs of the post-norm activations, the per-tensor grid after the
    reparameterisation (mapped back to x) equals the per-channel grid and beats a plain per-tensor one."""
    from ditq.methods.repq import channel_params, post_norm_sites, reparam_params
    from ditq.quant.quantizer import build_quantizer

    run, adapter, qlayers, ctx = _setup(compose, paths)
    fp = {n: dict(rec) for n, rec in ctx.layer_inputs().items()}
    plain = {}
    for n in (Q, FC1):
        pq = build_quantizer(qlayers[n].act_quantizer.cfg, "act")
        pq.fit(fp[n]["rows"], data_range=(fp[n]["min"], fp[n]["max"]))
        plain[n] = pq
    sites = {s.consumers[0]: s for s in post_norm_sites(adapter)}
    s_c, z_c = {}, {}
    for n in (Q, FC1):
        s_c[n], z_c[n] = channel_params(qlayers[n].act_quantizer, fp[n])
    _steps(run)[0].apply(ctx)
    new = ctx.layer_inputs()
    for n in (Q, FC1):
        x = fp[n]["rows"]
        r, b, _, _ = reparam_params(s_c[n], z_c[n])
        x_hat = (qlayers[n].act_quantizer(new[n]["rows"]).double() + b) * r  # back to x's space
        err_rep = (x_hat - x.double()).pow(2).mean().item()
        err_plain = (plain[n](x).double() - x.double()).pow(2).mean().item()
        per_channel = build_quantizer(dataclasses.replace(qlayers[n].act_quantizer.cfg, granularity="per_channel"),
                                      "act")
        per_channel.fit(x, data_range=(fp[n]["min"], fp[n]["max"]))
        err_pc = (per_channel(x).double() - x.double()).pow(2).mean().item()
        assert err_rep < 0.5 * err_plain, (n, err_rep, err_plain)
        assert math.isclose(err_rep, err_pc, rel_tol=1e-3), (n, err_rep, err_pc)
    assert sites[Q].kind == "attn" and sites[FC1].kind == "mlp"


def test_softmax_quantizer_is_on_when_quantized_and_off_in_full_precision(compose, paths):
    from ditq.methods.wrap import full_precision
    from ditq.quant.attention import installed
    from ditq.sampling import Sampler

    run, adapter, qlayers, ctx = _setup(compose, paths)
    for step in _steps(run):
        step.apply(ctx)
    procs = installed(adapter.denoiser)
    assert len(procs) == 6 and all((p.quantizer.bits, p.quantizer.scale, p.quantizer.sqrt2) == (8, 1.0, True)
                                   for p in procs.values())
    sampler = Sampler(adapter, run.sampler)
    seeds, labels = [0, 1], torch.tensor([3, 4])
    q_samples = sampler.sample(seeds, labels, progress=False)
    calls = {n: p.quantized_calls for n, p in procs.items()}
    assert set(calls.values()) == {run.sampler.num_steps}  # every denoiser call of the quantized sampling
    with full_precision(qlayers):
        assert not any(p.active for p in procs.values())
        fp_samples = sampler.sample(seeds, labels, progress=False)
    assert {n: p.quantized_calls for n, p in procs.items()} == calls  # off inside full_precision
    assert all(p.active for p in procs.values())  # and back on afterwards
    assert not torch.equal(q_samples, fp_samples)
    # one quantized layer of an attention switched to FP turns that attention's softmax off too
    qlayers[Q].quant_enabled = False
    assert not procs["transformer_blocks.0.attn1"].active and procs["transformer_blocks.1.attn1"].active
    qlayers[Q].quant_enabled = True
    r = _records(2)
    with torch.no_grad():
        q_out = adapter.denoise(r["x"], r["t"], r["y"])
        for p in procs.values():
            p.quantizer = None
        no_softmax = adapter.denoise(r["x"], r["t"], r["y"])
    assert not torch.equal(q_out, no_softmax)  # the log2 grid changes the output


def test_bad_setups_fail_before_calibration(compose, paths):
    from ditq.methods.repq import RepQError

    # a dynamic per-token activation quantizer has no static per-tensor grid to reparameterise to
    run, adapter, qlayers, ctx = _setup(compose, paths, overrides=["method.act.granularity=per_token",
                                                                    "method.act.dynamic=true"])
    with pytest.raises(RepQError, match="per_tensor"):
        _steps(run)[0].needs_layer_inputs(ctx)
    assert not ctx.layer_inputs.loaded  # nothing recorded
    # without quantized attention layers the activations there are FP: no softmax quantizer by default,
    # and an explicit softmax_bits has no layer switch to follow back to FP
    run, adapter, qlayers, ctx = _setup(compose, paths, overrides=["method.layers=[fc1,fc2]"])
    assert _steps(run)[0]._softmax_bits(ctx) == {f"transformer_blocks.{i}.attn1": None for i in range(6)}
    run, adapter, qlayers, ctx = _setup(compose, paths, overrides=[
        "method.layers=[fc1,fc2]", "method.steps=[{name: repq, softmax_bits: 8}, {name: rtn}]"])
    with pytest.raises(RepQError, match="softmax: false"):
        _steps(run)[0].needs_layer_inputs(ctx)
    # a layer-inputs provider that cannot hold the transformed inputs: refused before any weight changes
    run, adapter, qlayers, ctx = _setup(compose, paths)
    recorded = ctx.layer_inputs()
    ctx.layer_inputs = lambda: recorded
    w = adapter.denoiser.get_submodule(ADALN).weight.detach().clone()
    with pytest.raises(RepQError, match="replace"):
        _steps(run)[0].apply(ctx)
    assert torch.equal(adapter.denoiser.get_submodule(ADALN).weight, w)
    # rtn before repq: the weights are already fitted on the unfolded values
    run, adapter, qlayers, ctx = _setup(compose, paths, overrides=["method.steps=[{name: rtn}, {name: repq}]"])
    rtn, repq = _steps(run)
    rtn.apply(ctx)
    with pytest.raises(RepQError, match="put repq first"):
        repq.apply(ctx)


def test_reparam_with_symmetric_activations_keeps_the_fp_function(compose, paths):
    """No zero point: b = 0, only the channel ratios fold; still the same FP function."""
    from ditq.methods.wrap import full_precision

    run, adapter, qlayers, ctx = _setup(compose, paths, overrides=["method.act.symmetric=true"])
    r = _records(3, seed=5)
    with torch.no_grad(), full_precision(qlayers):
        before = adapter.denoise(r["x"], r["t"], r["y"])
    _steps(run)[0].apply(ctx)
    assert qlayers[Q].act_quantizer.zero_point is None and qlayers[Q].act_quantizer.frozen_by == "repq"
    with torch.no_grad(), full_precision(qlayers):
        torch.testing.assert_close(adapter.denoise(r["x"], r["t"], r["y"]), before, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- end to end
def test_repq_vit_w8a8_end_to_end(compose, paths, tmp_path):
    row = run_pipeline(compose, paths + ["method=repq_vit", "bits=w8a8"], tmp_path / "repq")
    assert all(math.isfinite(v) for v in row["metrics"].values())
    assert {"fid", "psnr", "fid_to_fp"} <= set(row["metrics"])
    assert row["quantized_layers"] == 6 * 6  # q, k, v, proj, fc1, fc2 per block (adaLN carries the fold)
