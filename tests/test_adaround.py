"""AdaRound (plain and FP4DiT's scale-aware) with BRECQ block reconstruction: the soft rounding on
INT / FP / block grids, Theorem 1's gradient property, the block algorithm, the step and its errors."""
import math

import pytest
import torch

from ditq.algorithms.adaround import (GAMMA, ZETA, AdaRoundError, SoftRounding, adaround_block, beta_at,
                                      reconstruction_loss)
from tests.conftest import SHRINK
from tests.helpers import random_dit, run_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


GRIDS = [
    ("int4", {"granularity": "per_channel", "symmetric": False}),
    ("int3", {"granularity": "per_channel", "symmetric": True}),
    ("fp4_e2m1", {"granularity": "per_group", "group_size": 16}),
    ("fp4_e3m0", {"granularity": "per_group", "group_size": 16}),
    ("fp4_e1m2", {"granularity": "per_channel"}),
    ("fp8_e4m3", {"granularity": "per_channel"}),
    ("mxfp4", {"granularity": "per_channel"}),
    ("nvfp4", {"granularity": "per_channel"}),
]


def _quantizer(fmt, wcfg, w):
    from ditq.config.schema import quantizer_config
    from ditq.quant.quantizer import build_quantizer

    q = build_quantizer(quantizer_config(dict(wcfg), fmt, "weight", "w"), "weight")
    q.fit(w)
    return q


def _grid_neighbours(q, w):
    """Reference lo / hi from the format's explicit grid (the test may look at the format)."""
    from ditq.quant.granularity import apply_params

    grid = q.format.grid().double()

    def fn(v, s, z):
        u = v.double() / s.double()
        if z is not None:
            u = u + z.double()
        i = torch.searchsorted(grid, u.contiguous(), right=True).clamp(1, len(grid) - 1)
        lo, hi = grid[i - 1], grid[i]
        zz = 0.0 if z is None else z.double()
        return ((lo - zz) * s.double()).float(), ((hi - zz) * s.double()).float(), u.float(), lo.float(), hi.float()

    return apply_params(w, q.scale, q.zero_point, q.group_size, fn)


@pytest.mark.parametrize("fmt,wcfg", GRIDS)
def test_h_starts_at_the_fractional_part_between_the_grid_neighbours(fmt, wcfg):
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    q = _quantizer(fmt, wcfg, w)
    for scale_aware in (False, True):
        r = SoftRounding(w, q, scale_aware=scale_aware)
        lo, hi, u, ulo, uhi = _grid_neighbours(q, w)
        free = r.free
        assert free.float().mean() > 0.9
        assert torch.allclose(r.lo[free], lo[free], rtol=1e-6, atol=0)
        assert torch.allclose(r.hi[free], hi[free], rtol=1e-6, atol=0)
        frac = ((u - ulo) / (uhi - ulo))[free]
        assert torch.allclose(r.h()[free], frac, atol=1e-5)
        assert torch.allclose(r.soft_weight(), torch.where(free, w, r.lo), atol=1e-5)
        # elements at or beyond the grid's ends are fixed at the end value (the quantizer's clamp)
        assert torch.equal(r.soft_weight()[~free], q(w)[~free])


@pytest.mark.parametrize("fmt,wcfg", GRIDS)
def test_hardened_weights_lie_on_the_quantizers_grid(fmt, wcfg):
    torch.manual_seed(1)
    w = torch.randn(6, 64) * 0.1
    q = _quantizer(fmt, wcfg, w)
    r = SoftRounding(w, q, scale_aware=True)
    with torch.no_grad():
        r.param.copy_(torch.randn_like(r.param) * r.step)  # an arbitrary learned state
    hard = r.hard_weight()
    assert torch.equal(q(hard), hard)  # fake-quantizing again changes nothing
    assert bool(((hard == r.lo) | (hard == r.hi)).all())
    assert 0.2 < r.flips() < 0.8  # random choices flip about half the free elements


def test_the_gap_is_the_step_at_negative_binade_edges():
    """w just above -2^e on E3M0 (no mantissa): the upper neighbour is -2^(e-1), not 0."""
    q = _quantizer("fp4_e3m0", {"granularity": "per_tensor"}, torch.tensor([[16.0, -16.0]]))  # max 16: scale 1
    w = torch.tensor([[-4.0, -3.0, 5.0, 16.0, -16.0, 0.1]])
    r = SoftRounding(w, q, scale_aware=False)
    assert r.lo.tolist() == [[-4.0, -4.0, 4.0, 16.0, -16.0, 0.0]]
    assert r.hi.tolist() == [[-2.0, -2.0, 8.0, 16.0, -8.0, 0.25]]  # E3M0 subnormal step 2^-2
    assert r.free.tolist() == [[True, True, True, False, True, True]]


def test_scale_aware_gradients_do_not_depend_on_the_binade():
    """Theorem 1: with the same fractional position in binades of different steps and the same
    dL/dw, plain AdaRound's gradients scale with the step s, the scale-aware ones do not."""
    q = _quantizer("fp4_e2m1", {"granularity": "per_tensor"}, torch.tensor([[6.0]]))  # scale 1: steps 0.5, 1, 2
    w = torch.tensor([[0.5 + 0.3 * 0.5, 2.0 + 0.3 * 1.0, 4.0 + 0.3 * 2.0]])  # 30% above lo in each binade
    grads = {}
    for scale_aware in (False, True):
        r = SoftRounding(w, q, scale_aware=scale_aware)
        assert r.step.tolist() == [[0.5, 1.0, 2.0]]
        r.soft_weight().sum().backward()  # dL/dw_soft = 1 for every element
        grads[scale_aware] = r.param.grad.flatten()
    plain, aware = grads[False], grads[True]
    assert torch.allclose(plain / plain[0], torch.tensor([1.0, 2.0, 4.0]), rtol=1e-5)
    assert torch.allclose(aware, aware[0].expand(3), rtol=1e-5)
    # on an INT grid (one step) both forms give equal gradients per element
    qi = _quantizer("int4", {"granularity": "per_tensor", "symmetric": True}, torch.tensor([[7.0]]))
    wi = torch.tensor([[0.3, 2.3, 5.3]])
    ri = SoftRounding(wi, qi, scale_aware=False)
    ri.soft_weight().sum().backward()
    assert torch.allclose(ri.param.grad, ri.param.grad[0, 0].expand(1, 3), rtol=1e-5)


def test_h_formula_and_hardening_threshold():
    q = _quantizer("int4", {"granularity": "per_tensor", "symmetric": True}, torch.tensor([[7.0]]))
    w = torch.tensor([[0.25, 1.75]])
    r = SoftRounding(w, q, scale_aware=False)
    v = r.param.detach()
    assert torch.allclose(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, torch.tensor([[0.25, 0.75]]), atol=1e-6)
    assert r.hard_weight().tolist() == [[0.0, 2.0]]  # V < 0 rounds down, V >= 0 up (here = nearest)
    assert r.flips() == 0.0


def test_beta_schedule_and_losses():
    assert beta_at(0, 100, 0.2, 20, 2) is None and beta_at(19, 100, 0.2, 20, 2) is None
    assert beta_at(20, 100, 0.2, 20, 2) == 20.0
    assert math.isclose(beta_at(60, 100, 0.2, 20, 2), 11.0)
    assert beta_at(99, 100, 0.2, 20, 2) > 2.0
    a, b = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    assert float(reconstruction_loss(a, b, "brecq")) == 3.0  # summed over dim 1, mean over the rest
    assert float(reconstruction_loss(a, b, "mean")) == 1.0
    assert float(reconstruction_loss((a, {"k": b, "i": torch.ones(2, dtype=torch.long)}),
                                     (b, {"k": b, "i": torch.zeros(2, dtype=torch.long)}))) == 3.0


# -- the block algorithm ---------------------------------------------------------------------------
def _block_setup(fmt="fp4_e2m1", wcfg=None, afmt=None, seed=0, rows=48):
    from ditq.calibration.blocks import BlockRunner
    from tests.test_block_engine import _records, _wrap

    adapter = random_dit()
    qlayers = _wrap(adapter, fmt, afmt, weight=wcfg or {"granularity": "per_group", "group_size": 16})
    runner = BlockRunner(adapter)
    r = _records(rows, seed=seed)
    from ditq.calibration.engine import full_precision

    with full_precision(qlayers):
        hidden, call = runner.capture(r["x"], r["t"], r["y"])
    names = runner.segment_layers(list(qlayers))[0]
    layers = {n: qlayers[n] for n in names}
    with full_precision(layers):
        target = runner.run_block(0, hidden, call)
    block = runner.blocks[0]

    def forward(rows):
        from ditq.methods.adaround import RowSet

        h, c = RowSet(lambda j: (hidden, call), [len(hidden)]).gather(rows)
        out = block(h, *c.args, **c.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def tgt(rows):
        return target[torch.as_tensor(rows).sort().values]

    return adapter, layers, forward, tgt, len(hidden), block


@pytest.mark.parametrize("scale_aware", [False, True])
def test_adaround_block_beats_round_to_nearest_and_installs_grid_weights(scale_aware):
    torch.manual_seed(0)
    adapter, layers, forward, tgt, n, block = _block_setup("fp4_e2m1", afmt="int8")
    res = adaround_block(layers, forward, tgt, n, iters=100, lr=1e-2 if not scale_aware else 1e-3,
                         scale_aware=scale_aware, seed=0, log_every=20, name="block 0", frozen_modules=[block])
    assert res.loss_final < 0.8 * res.loss_nearest  # hardened AdaRound beats round-to-nearest
    assert len(res.curve) == 6 and res.curve[0][3] is None and res.curve[0][2] == 0.0  # warm-up: no regulariser
    regs = [c[2] for c in res.curve[1:]]
    assert regs[-1] < 0.5 * regs[0]  # the rounding variables are driven to 0 / 1
    for n_, layer in layers.items():
        wq = layer.weight_quantizer
        assert wq.frozen_by == "adaround"
        src = layer.weight_source
        assert src is not None and torch.equal(wq(src), src)  # on the grid: re-quantizing changes nothing
        assert torch.equal(layer.quantized_weight(), src)  # the forward uses exactly the hardened values
        assert 0.0 <= res.per_layer[n_]["flips"] < 0.5
        assert not torch.equal(layer.weight, src)  # `weight` stays the FP weight
    assert sum(v["flips"] for v in res.per_layer.values()) > 0  # some weights round away from nearest
    assert all(p.grad is None for p in block.parameters())  # no gradient reached the model
    assert all("quantized_weight" not in layer.__dict__ for layer in layers.values())


def test_adaround_int_block_also_improves():
    adapter, layers, forward, tgt, n, block = _block_setup(
        "int3", wcfg={"granularity": "per_channel", "symmetric": False})
    res = adaround_block(layers, forward, tgt, n, iters=100, lr=1e-2, seed=0, frozen_modules=[block])
    assert res.loss_final < 0.8 * res.loss_nearest


def test_adaround_stops_on_nan_naming_block_and_iteration():
    adapter, layers, forward, tgt, n, block = _block_setup()
    calls = {"n": 0}

    def bad_target(rows):
        calls["n"] += 1
        out = tgt(rows)
        return out * float("nan") if calls["n"] > 5 else out  # evaluation uses 2 calls, then iterations

    with pytest.raises(AdaRoundError, match=r"block 7.*iteration 3 of 50"):
        adaround_block(layers, forward, bad_target, n, iters=50, name="block 7", frozen_modules=[block])
    # the layers are left untouched: not frozen, forward restored
    for layer in layers.values():
        assert not layer.weight_quantizer.frozen and "quantized_weight" not in layer.__dict__


def test_adaround_block_bad_arguments():
    adapter, layers, forward, tgt, n, block = _block_setup()
    with pytest.raises(AdaRoundError, match="iters=0"):
        adaround_block(layers, forward, tgt, n, iters=0)
    name = next(iter(layers))
    layers[name].weight_quantizer.fit(layers[name].weight.detach())
    layers[name].weight_quantizer.freeze("gptq")
    with pytest.raises(AdaRoundError, match=f"{name}.*frozen by 'gptq'"):
        adaround_block(layers, forward, tgt, n, iters=5)
    layers[name].weight_quantizer.unfreeze()
    layers[name].weight_quantizer = None
    with pytest.raises(AdaRoundError, match=f"{name}.*no weight quantizer"):
        adaround_block(layers, forward, tgt, n, iters=5)


# -- the step, end to end ----------------------------------------------------------------------------
def test_adaround_options_refuse_bad_values(compose, paths):
    from ditq.config import ConfigError, validate_config

    for bad, msg in (("method.steps.1.iters=0", "iters=0"), ("method.steps.1.warmup=1.0", "warmup"),
                     ("method.steps.1.rec_loss=l1", "rec_loss"), ("+method.steps.1.roles=[qkvx]", "qkvx")):
        with pytest.raises((ConfigError, ValueError), match=msg):
            validate_config(compose(SHRINK + paths + ["method=adaround_fp_scaleaware", bad]))


def test_adaround_scaleaware_runs_end_to_end_and_records_diagnostics(compose, paths, tmp_path):
    row = run_pipeline(compose, paths + ["method=adaround_fp_scaleaware", "bits=w4a8_fp4", "method.steps.1.iters=4",
                                         "method.steps.1.log_every=2"], tmp_path / "run")
    d = row["diagnostics"]["adaround"]
    assert d["scale_aware"] is True and d["iters"] == 4
    assert set(d["segments"]) == {str(k) for k in range(6)}  # the embedded DiT's 6 blocks (pre/tail not quantized)
    seg = d["segments"]["0"]
    assert seg["iters"] == 4 and math.isfinite(seg["loss_final"]) and seg["seconds"] > 0
    assert len(seg["per_layer"]) == 7  # q, k, v, out, fc1, fc2, adaLN
    assert all(0.0 <= v["flips"] <= 1.0 for v in seg["per_layer"].values())
    assert seg["curve"][0][0] == 0


def test_adaround_refuses_unfitted_static_activations_and_untargetable_roles(compose, paths, tmp_path):
    from ditq.config import validate_config
    from ditq.pipeline import run

    cfg = validate_config(compose(SHRINK + paths + ["method=adaround_int", "bits=w4a8",
                                                    "method.steps=[{name: adaround, iters: 2}]"]))
    with pytest.raises(AdaRoundError, match="static activation quantizers.*rtn"):
        run(cfg, output_dir=tmp_path / "a", progress=False)
    cfg = validate_config(compose(SHRINK + paths + ["method=adaround_fp", "bits=w4a8_fp4",
                                                    "+method.steps.1.roles=[fc1,final]"]))
    with pytest.raises(AdaRoundError, match=r"proj_out_\d \(final\)"):
        run(cfg, output_dir=tmp_path / "b", progress=False)


def test_adaround_pre_and_tail_segments_are_reconstructed(compose, paths, tmp_path):
    """The patch embedding ("pre") and the final layers ("tail") are rounded with their segments. (Diagnostics
    off: they refuse DiT's block-0 timestep embedder, which the tail calls a second time.)"""
    row = run_pipeline(compose, paths + ["method=adaround_fp", "bits=w4a8_fp4", "method.steps.1.iters=3",
                                         "method.layers=[embed,final]", "method.weight.group_size=4",
                                         "diagnostics.enabled=false"],
                       tmp_path / "run")
    segs = row["diagnostics"]["adaround"]["segments"]
    assert "pre" in segs and "tail" in segs
    assert "pos_embed.proj" in segs["pre"]["per_layer"]
    assert set(segs["tail"]["per_layer"]) == {"proj_out_1", "proj_out_2"}


def test_adaround_step_on_pixart_reconstructs_pre_blocks_and_tail(tmp_path):
    """Text-to-image: the "pre" segment's outputs (hidden, adaLN vector, projected captions) are the
    reconstruction target of adaLN-single and the caption projection; the caption states and masks
    travel row by row with the block calls."""
    from types import SimpleNamespace

    from ditq.calibration.blocks import BlockRunner
    from ditq.methods.adaround import AdaRound
    from ditq.methods.base import QuantContext
    from ditq.methods.options import AdaRoundOptions
    from ditq.models import load_adapter
    from tests.test_pixart import _bank, _build_dir, _cfg, _inputs, _wrap

    adapter = load_adapter(_cfg(_build_dir(tmp_path / "tp", num_layers=2)))
    adapter.set_text_bank(_bank(adapter))
    qlayers = _wrap(adapter, "fp4_e2m1")
    x, t, y = _inputs(6, seed=3)
    records = {"x": x, "t": torch.tensor([999, 500, 20, 999, 500, 20]), "y": y}
    run = SimpleNamespace(calib=SimpleNamespace(include_uncond=True), sampler=SimpleNamespace(cfg_scale=4.5))
    ctx = QuantContext(adapter=adapter, run=run, qlayers=qlayers, roles={li.name: li.role for li in adapter.layers()},
                       layer_inputs=lambda: {}, calib_records=lambda: records, scratch_dir=str(tmp_path / "s"),
                       progress=False)
    AdaRound(AdaRoundOptions(iters=3, batch_size=4, pass_batch_size=4, log_every=0)).apply(ctx)
    d = ctx.diagnostics["adaround"]
    assert set(d["segments"]) == {"pre", "0", "1", "tail"} and d["layers"] == len(qlayers) and d["rows"] == 12
    assert {"adaln_single.linear", "caption_projection.linear_1"} <= set(d["segments"]["pre"]["per_layer"])
    assert all(q.weight_quantizer.frozen_by == "adaround" for q in qlayers.values())
    with torch.no_grad():
        out = adapter.denoise(x, records["t"], y)
    assert torch.isfinite(out).all() and torch.equal(BlockRunner(adapter).replay(x, records["t"], y), out)
    assert not any(tmp_path.joinpath("s").glob("adaround_io_*"))  # spill dir removed


def test_rows_drawn_across_pass_batches_run_the_block_as_the_whole_batch_does():
    from ditq.calibration.blocks import BlockRunner
    from ditq.methods.adaround import RowSet
    from tests.test_block_engine import _records

    adapter = random_dit()
    runner = BlockRunner(adapter)
    r = _records(10, seed=2)
    chunks = [runner.capture(r["x"][a:b], r["t"][a:b], r["y"][a:b]) for a, b in ((0, 4), (4, 8), (8, 10))]
    whole = runner.run_block(0, *runner.capture(r["x"], r["t"], r["y"]))
    rows = RowSet(lambda j: chunks[j], [4, 4, 2])
    h, call = rows.gather(torch.tensor([9, 0, 5, 4]))
    assert call.t.tolist() == r["t"][[0, 4, 5, 9]].tolist() and call.out_shape[0] == 4
    torch.testing.assert_close(runner.run_block(0, h, call), whole[[0, 4, 5, 9]], rtol=1e-5, atol=1e-6)


def test_sequential_false_feeds_each_block_the_fp_models_inputs(tmp_path):
    from types import SimpleNamespace

    from ditq.methods.adaround import AdaRound
    from ditq.methods.base import QuantContext
    from ditq.methods.options import AdaRoundOptions
    from tests.test_block_engine import _records, _wrap

    results = {}
    for sequential in (True, False):
        adapter = random_dit()
        qlayers = _wrap(adapter, "int3", weight={"granularity": "per_channel"},
                        layers=("qkv", "proj", "fc1", "fc2", "adaln"))
        run = SimpleNamespace(calib=SimpleNamespace(include_uncond=False), sampler=SimpleNamespace(cfg_scale=1.0))
        ctx = QuantContext(adapter=adapter, run=run, qlayers=qlayers, roles={}, layer_inputs=lambda: {},
                           calib_records=lambda: _records(8, seed=4), scratch_dir=str(tmp_path), progress=False)
        AdaRound(AdaRoundOptions(iters=2, sequential=sequential, log_every=0)).apply(ctx)
        results[sequential] = ctx.diagnostics["adaround"]
    seq, fp = results[True]["segments"], results[False]["segments"]
    assert seq["0"]["loss_nearest"] == fp["0"]["loss_nearest"]  # block 0: the same (FP) inputs
    assert seq["1"]["loss_nearest"] != fp["1"]["loss_nearest"]  # block 1: quantized block 0's outputs vs FP
    assert results[False]["sequential"] is False
