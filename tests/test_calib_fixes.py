"""Calibration and quantizer-state fixes: frozen parameters, explicit weight grids, unbiased layer-input
samples with exact ranges, FP recording by the provider itself, freeing before sampling, conv layout."""
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditq.calibration import collect_layer_inputs
from ditq.methods.base import QuantContext
from ditq.quant import QParams, QuantConv2d, QuantizerConfig, QuantLinear, build_quantizer
from ditq.quant.quantizer import FrozenParamsError, Quantizer
from tests.conftest import SHRINK


def Q(fmt="int8", gran="per_tensor", **kw):
    return QuantizerConfig(format=fmt, granularity=gran, **kw)


@pytest.fixture
def w():
    torch.manual_seed(0)
    return torch.randn(24, 64)


# ----------------------------------------------------------------------------- 1. frozen parameters
def test_frozen_params_refuse_fit_reset_and_set_params(w):
    wq = build_quantizer(Q("int4", "per_channel"), "weight")
    QuantLinear(nn.Linear(64, 24), wq, None, name="blocks.0.fc1")
    params = wq.compute_params(w * 0.5)
    wq.set_params(params, freeze=True, frozen_by="gptq")
    assert wq.frozen and wq.frozen_by == "gptq"
    for call in (lambda: wq.fit(w), wq.reset, lambda: wq.set_params(params)):
        match = r"blocks\.0\.fc1\.weight_quantizer .*frozen by 'gptq'.*unfreeze\(\)"
        with pytest.raises(FrozenParamsError, match=match):
            call()
    assert isinstance(FrozenParamsError("x"), RuntimeError)
    assert torch.equal(wq.scale, params.scale)  # untouched by the refused calls
    wq.unfreeze()
    wq.fit(w)
    assert not wq.frozen and torch.equal(wq.scale, wq.compute_params(w).scale)


def test_freeze_arguments_are_checked(w):
    wq = build_quantizer(Q("int4", "per_channel"), "weight")
    with pytest.raises(ValueError, match="nothing to freeze"):
        wq.freeze("gptq")
    with pytest.raises(ValueError, match="needs frozen_by"):
        wq.set_params(wq.compute_params(w), freeze=True)
    with pytest.raises(ValueError, match="without freeze=True"):
        wq.set_params(wq.compute_params(w), frozen_by="gptq")
    wq.fit(w)
    wq.freeze("adaround")
    assert wq.frozen_by == "adaround" and "frozen by adaround" in repr(wq)


def test_frozen_state_survives_state_dict_save_and_load(w, tmp_path):
    src = build_quantizer(Q("int4", "per_group", group_size=32), "weight")
    src.set_params(src.compute_params(w), freeze=True, frozen_by="gptq")
    torch.save(src.state_dict(), tmp_path / "q.pt")
    dst = build_quantizer(Q("int4", "per_group", group_size=32), "weight")
    dst.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    assert dst.frozen_by == "gptq" and torch.equal(dst.scale, src.scale)
    with pytest.raises(FrozenParamsError):
        dst.fit(w)
    # a state dict saved before the frozen state existed still loads (strict), unfrozen
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    again = build_quantizer(Q("int4", "per_group", group_size=32), "weight")
    again.load_state_dict(old)
    assert not again.frozen and torch.equal(again.scale, src.scale)


def _ctx(qlayers, inputs):
    return QuantContext(adapter=None, run=None, qlayers=qlayers, roles={n: "fc1" for n in qlayers},
                        layer_inputs=lambda: inputs)


def test_rtn_skips_frozen_weight_quantizers_and_still_fits_activations(caplog):
    from ditq.methods.rtn import RTN

    torch.manual_seed(0)
    layers = {n: QuantLinear(nn.Linear(16, 8), build_quantizer(Q("int4", "per_channel"), "weight"),
                             build_quantizer(Q("int8", "per_tensor"), "act"), name=n) for n in ("a", "b", "c")}
    pinned = {}
    for n in ("a", "b"):
        wq = layers[n].weight_quantizer
        wq.set_params(wq.compute_params(layers[n].weight * 0.25), freeze=True, frozen_by="gptq")
        pinned[n] = wq.scale.clone()
    x = torch.randn(50, 16)
    inputs = {n: {"rows": x, "min": x.amin(0), "max": x.amax(0)} for n in layers}
    with caplog.at_level(logging.INFO, logger="ditq.methods.rtn"):
        RTN(None).apply(_ctx(layers, inputs))
    for n in ("a", "b"):
        assert torch.equal(layers[n].weight_quantizer.scale, pinned[n])  # not re-fitted
        assert torch.equal(layers[n].quantized_weight(),
                           layers[n].weight_quantizer.quantize_with(layers[n].weight, QParams(pinned[n])))
    c = layers["c"].weight_quantizer
    assert torch.equal(c.scale, c.compute_params(layers["c"].weight).scale)
    assert all(q.act_quantizer.is_fitted for q in layers.values())
    msgs = [r.getMessage() for r in caplog.records if "frozen" in r.getMessage()]
    assert len(msgs) == 1 and "kept 2 frozen" in msgs[0] and "2 weight by gptq" in msgs[0]


# ----------------------------------------------------------------------------- 2. explicit weight grid
def test_edited_weight_is_rounded_on_the_stored_grid_until_refit():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    wq = build_quantizer(Q("int4", "per_channel"), "weight")
    layer = QuantLinear(lin, wq, None)
    x = torch.randn(3, 32)
    layer(x)  # first use
    assert wq.is_fitted
    first = wq.scale.clone()
    lin.weight.data *= 0.3  # e.g. a later weight-editing step
    layer.refresh()
    assert torch.equal(wq.scale, first)
    assert torch.equal(layer.quantized_weight(), wq.quantize_with(lin.weight, QParams(first)))
    layer.refresh(refit=True)
    assert torch.equal(wq.scale, wq.compute_params(lin.weight).scale) and not torch.equal(wq.scale, first)
    assert torch.equal(layer(x), F.linear(x, wq.quantize_with(lin.weight, QParams(wq.scale)), lin.bias))
    wq.freeze("gptq")
    with pytest.raises(FrozenParamsError, match="gptq"):
        layer.refresh(refit=True)


def test_uncached_weight_also_keeps_its_first_grid():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    wq = build_quantizer(Q("int4", "per_channel"), "weight")
    layer = QuantLinear(lin, wq, None)
    layer.cache_weight = False
    x = torch.randn(3, 32)
    layer(x)
    first = wq.scale.clone()
    lin.weight.data *= 2.0
    assert torch.equal(layer(x), F.linear(x, wq.quantize_with(lin.weight, QParams(first)), lin.bias))


def test_weight_range_is_computed_once_for_wrap_plus_rtn(monkeypatch):
    """Construction fits nothing, so an expensive range rule (MSE) runs once per weight, at RTN."""
    from ditq.methods.rtn import RTN

    calls = []
    original = Quantizer._compute_params
    monkeypatch.setattr(Quantizer, "_compute_params",
                        lambda self, x, r: calls.append(self.role) or original(self, x, r))
    torch.manual_seed(0)
    layers = {n: QuantLinear(nn.Linear(16, 8), build_quantizer(Q("int4", "per_channel", range="mse"), "weight"),
                             None, name=n) for n in ("a", "b")}
    assert calls == []
    RTN(None).apply(_ctx(layers, {}))
    for q in layers.values():
        q(torch.randn(2, 16))
    assert calls == ["weight", "weight"]


# ----------------------------------------------------------------------------- 3. unbiased sample + exact range
class _FakeAdapter:
    """The parts of a ModelAdapter collect_layer_inputs uses: the denoiser runs on x alone."""

    device = "cpu"
    null_class = 0

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def denoise(self, x, t, y):
        return self.denoiser(x)


def _collect(denoiser, x, names, max_tokens, batch_size=64):
    calib = {"x": x, "t": torch.zeros(len(x), dtype=torch.long), "y": torch.zeros(len(x), dtype=torch.long)}
    return collect_layer_inputs(_FakeAdapter(denoiser), calib, names, max_tokens, include_uncond=False,
                                batch_size=batch_size, progress=False)


def test_layer_inputs_keep_an_unbiased_sample_and_the_exact_range_apart():
    torch.manual_seed(0)
    x = torch.randn(4000, 6)
    x[123, 2] = 40.0  # an extreme value the sample will almost surely miss
    out = _collect(nn.Sequential(nn.Linear(6, 6)), x, ["0"], max_tokens=200)["0"]
    assert set(out) == {"rows", "min", "max"} and out["rows"].shape == (200, 6)
    assert torch.equal(out["min"], x.amin(0)) and torch.equal(out["max"], x.amax(0))
    members = (out["rows"][:, None, :] == x[None]).all(-1).any(1)
    assert bool(members.all())  # every sample row is a real input row (no appended min/max rows)
    assert float(out["rows"][:, 2].max()) < 40.0

    # minmax uses the exact full-data range; percentile uses the sample alone
    data_range = (out["min"], out["max"])
    for sym in (True, False):
        for gran in ("per_tensor", "per_channel"):
            mm = build_quantizer(Q("int8", gran, symmetric=sym), "act")
            mm.fit(out["rows"], data_range=data_range)
            full = build_quantizer(Q("int8", gran, symmetric=sym), "act")
            full.fit(x)
            assert torch.equal(mm.scale, full.scale)
    pct = build_quantizer(Q("int8", "per_tensor", range="percentile", percentile=99.0), "act")
    pct.fit(out["rows"], data_range=data_range)
    alone = build_quantizer(Q("int8", "per_tensor", range="percentile", percentile=99.0), "act")
    alone.fit(out["rows"])
    assert torch.equal(pct.scale, alone.scale)
    nv = build_quantizer(Q("nvfp4", "per_block"), "act")
    nv.fit(out["rows"], data_range=data_range)
    assert float(nv.tensor_amax) == 40.0


def test_high_percentile_is_not_pulled_to_the_data_maximum():
    """The old layout appended the full-data max to a 4096-row sample, so the 99.99th percentile
    (rank 4098 of 4098) WAS the full-data maximum."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, 1, generator=g)
    out = _collect(nn.Sequential(nn.Linear(1, 1)), x, ["0"], max_tokens=4096, batch_size=10_000)["0"]
    q = build_quantizer(Q("int8", "per_tensor", range="percentile", percentile=99.99), "act")
    q.fit(out["rows"], data_range=(out["min"], out["max"]))
    assert float(q.scale) * 127 < 0.9 * float(x.abs().max())


def test_mse_search_starts_from_the_full_range():
    torch.manual_seed(0)
    rows = torch.randn(2000, 4)
    lo, hi = rows.amin(0) * 3, rows.amax(0) * 3  # the full data reached further than the sample
    q = build_quantizer(Q("int8", "per_tensor", range="mse", clip_search_points=10, clip_min_ratio=0.1), "act")
    q.fit(rows, data_range=(lo, hi))
    sample_only = build_quantizer(q.cfg, "act")
    sample_only.fit(rows)
    assert not torch.equal(q.scale, sample_only.scale)  # candidates are fractions of the full range
    assert float(q.scale) <= float((hi.max() - lo.min()) / 255) + 1e-12


def test_data_range_is_checked():
    x = torch.randn(100, 4)
    q = build_quantizer(Q("int8"), "act")
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        q.fit(x, data_range=(x.amin(), x.amax()))
    with pytest.raises(ValueError, match="outside the given"):
        q.fit(x, data_range=(x.amin(0) + 0.1, x.amax(0)))
    with pytest.raises(ValueError, match="activation calibration samples"):
        build_quantizer(Q("int8"), "weight").fit(x, data_range=(x.amin(0), x.amax(0)))
    assert not q.is_fitted


# ----------------------------------------------------------------------------- 5. conv layout by module type
def test_layer_input_layout_follows_the_module_type_not_the_input_rank():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 4)  # a Linear over the last dim of a 4-D input
    out = _collect(nn.Sequential(nn.Linear(4, 3)), x, ["0"], max_tokens=10_000)["0"]
    assert out["rows"].shape == (30, 4)
    assert torch.equal(out["min"], x.reshape(-1, 4).amin(0))
    conv = QuantConv2d(nn.Conv2d(2, 3, 1), None, None)
    out = _collect(nn.Sequential(conv), x, ["0"], max_tokens=10_000)["0"]
    assert out["rows"].shape == (60, 2)  # NCHW: channels (dim 1) moved last
    assert torch.equal(out["max"], x.permute(0, 2, 3, 1).reshape(-1, 2).amax(0))


# ----------------------------------------------------------------------------- 4. pipeline: FP recording, freeing
class _StopBeforeQuantizedSampling(Exception):
    pass


def _run_until_quantized_sampling(compose, tmp_path, monkeypatch, overrides, check=lambda: None):
    """Run the pipeline up to the quantized model's sampling; `check()` runs right then."""
    import ditq.pipeline as pipeline
    from ditq.config import validate_config

    sample_images = pipeline.sample_images

    def stop(*a, desc, **k):
        if desc == "FP samples":
            return sample_images(*a, desc=desc, **k)
        check()
        raise _StopBeforeQuantizedSampling

    monkeypatch.setattr(pipeline, "sample_images", stop)
    paths = [f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results"]
    cfg = validate_config(compose(SHRINK + paths + overrides))
    with pytest.raises(_StopBeforeQuantizedSampling):
        pipeline.run(cfg, output_dir=tmp_path / "out", progress=False)


def test_layer_inputs_asked_for_undeclared_are_still_full_precision(compose, tmp_path, monkeypatch):
    import ditq.calibration as calibration
    from ditq.methods.rtn import RTN

    states = []
    original = calibration.collect_layer_inputs

    def spy(adapter, *a, **k):
        states.append({m.quant_enabled for m in adapter.denoiser.modules() if hasattr(m, "quant_enabled")})
        return original(adapter, *a, **k)

    rtn_apply = RTN.apply

    def apply_then_read(self, ctx):  # dynamic activations: the step never declared the need
        assert not self.needs_layer_inputs(ctx)
        rtn_apply(self, ctx)
        ctx.layer_inputs()

    monkeypatch.setattr(calibration, "collect_layer_inputs", spy)
    monkeypatch.setattr(RTN, "apply", apply_then_read)
    _run_until_quantized_sampling(compose, tmp_path, monkeypatch, ["method=rtn_dynamic", "bits=w8a8"])
    assert states == [{False}]  # recorded with every quantized layer switched to full precision


def test_layer_inputs_are_released_before_sampling(compose, tmp_path, monkeypatch):
    import ditq.calibration.lazy as lazy

    holders, seen = [], []

    class Recorded(lazy.Lazy):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            holders.append(self)

        def get(self):
            seen.append("get")
            return super().get()

    monkeypatch.setattr(lazy, "Lazy", Recorded)
    check = lambda: seen.append([(h.name, h.loaded, h.released) for h in holders])  # noqa: E731
    _run_until_quantized_sampling(compose, tmp_path, monkeypatch, ["method=rtn", "bits=w8a8"], check)
    assert seen[0] == "get" and seen[-1] == [("layer inputs", False, True)]  # used by RTN, freed before sampling
    with pytest.raises(RuntimeError, match="released after the quantization steps"):
        holders[0].get()
    # the cache entry has the new layout and a versioned spec (old [T+2, C] entries are not served)
    (manifest,) = (tmp_path / "cache" / "layer_inputs").glob("*.json")
    assert json.loads(manifest.read_text())["spec"]["li_v"] == 2
    payload = torch.load(manifest.with_suffix(".pt"), weights_only=True)
    assert all(set(v) == {"rows", "min", "max"} for v in payload.values())
