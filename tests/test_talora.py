"""TALoRA (MSFP): the timestep context (mixed timesteps, guidance stacks, missing / mismatched timesteps),
LoRA branch shapes on linears and convs, the router (straight-through gradient, fixed partition, too many
branches), the step (loss decreases, diagnostics, saved weights, model size), checkpoint resume to identical
weights and checkpoints of another configuration."""
from types import SimpleNamespace

import pytest
import torch

from ditq.algorithms.finetune import Checkpointer, CheckpointMismatchError, FinetuneError, finetune
from ditq.quant.lora import (LoRABranch, Router, TimestepContext, TimestepContextError, declared_storage_bits,
                             install_lora, lora_modules)
from tests.conftest import SHRINK
from tests.helpers import random_dit, run_pipeline, sampler_cfg


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TS = [800, 600, 400, 200, 0]  # tests.helpers.sampler_cfg(num_steps=5)'s DDIM timesteps


def _wrap(adapter, wfmt="int3", afmt="int4"):
    from tests.test_block_engine import _wrap as wrap

    return wrap(adapter, wfmt, afmt=afmt)


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)


def _wrap_all(model, wfmt="int4"):
    from ditq.config.schema import quantizer_config
    from ditq.quant.modules import QuantConv2d, QuantLinear
    from ditq.quant.quantizer import build_quantizer

    qlayers = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            wq = build_quantizer(quantizer_config({"granularity": "per_channel"}, wfmt, "weight", "w"), "weight")
            cls = QuantConv2d if isinstance(mod, torch.nn.Conv2d) else QuantLinear
            q = cls(mod, wq, None, name=name)
            model.set_submodule(name, q)
            qlayers[name] = q
    return qlayers


def _randomise_up(qlayers, seed=0):
    g = torch.Generator().manual_seed(seed)
    for q in qlayers.values():
        w = q.branch.up.weight
        w.data.copy_(torch.randn(w.shape, generator=g) * 0.1)


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([TS[i % 5] for i in range(n)]), torch.arange(n) % 10


# -- timestep context ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fixed", "learned"])
def test_rows_of_mixed_timesteps_and_guidance_stacks_route_row_by_row(kind):
    adapter = random_dit()
    qlayers = _wrap(adapter)
    router = Router(3, kind, TS, seed=2)
    router.fit_partition()  # a random learned router may send every timestep to one branch
    install_lora(adapter.denoiser, qlayers, router, rank=2)
    _randomise_up(qlayers)
    x, t, y = _inputs(6)
    with torch.no_grad():
        whole = adapter.denoise(x, t, y)
        rows = torch.cat([adapter.denoise(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(6)])
        torch.testing.assert_close(whole, rows, rtol=1e-4, atol=1e-5)
        # a guidance batch: cat([x, x]) with cat([t, t]) and the null condition on the second half
        null = torch.full_like(y, 10)
        stacked = adapter.denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        torch.testing.assert_close(stacked[:6], whole, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stacked[6:], adapter.denoise(x, t, null), rtol=1e-4, atol=1e-5)
        # the branch does matter: the same row at another timestep's branch gives another output
        assert len(set(router.routing().values())) > 1
        with torch.no_grad():
            from ditq.quant.modules import full_precision

            with full_precision(qlayers):
                fp = adapter.denoise(x, t, y)
        assert not torch.allclose(fp, whole)
    assert router.choice(torch.tensor(TS)).tolist() == list(router.routing().values())


def test_a_lora_layer_without_a_timestep_or_with_another_batch_size_is_an_error():
    adapter = random_dit()
    qlayers = _wrap(adapter)
    ctx = install_lora(adapter.denoiser, qlayers, Router(2, "fixed", TS), rank=2)
    name, layer = next((n, q) for n, q in qlayers.items() if q.weight.ndim == 2 and q.in_features == 32)
    with pytest.raises(TimestepContextError, match=f"{name}.*without a timestep.*talora"):
        layer(torch.randn(3, 32))
    ctx.set(torch.tensor([800, 0]))
    with pytest.raises(TimestepContextError, match="3 rows but the denoiser call has 2 timesteps"):
        layer(torch.randn(3, 32))
    ctx.clear()
    with torch.no_grad():  # the hooks set and clear it around every denoiser call
        adapter.denoise(*_inputs(2))
    assert ctx.t is None
    ctx.remove()
    with pytest.raises(TimestepContextError):
        adapter.denoise(*_inputs(2))


def test_unet_conv_branches_with_keyword_positional_and_scalar_timesteps():
    unet = _tiny_unet()
    qlayers = _wrap_all(unet)
    router = Router(2, "fixed", TS)
    install_lora(unet, qlayers, router, rank=3)
    conv = qlayers["down_blocks.0.downsamplers.0.conv"] if "down_blocks.0.downsamplers.0.conv" in qlayers else None
    assert conv is not None and conv.stride == (2, 2)
    assert tuple(conv.branch.down.weight.shape) == (6, conv.in_channels, 3, 3)
    assert tuple(conv.branch.up.weight.shape) == (conv.out_channels, 6, 1, 1)
    lin = next(q for q in qlayers.values() if q.weight.ndim == 2)
    assert tuple(lin.branch.down.weight.shape) == (6, lin.in_features)
    assert tuple(lin.branch.up.weight.shape) == (lin.out_features, 6)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([800, 800, 0, 0])
    with torch.no_grad():
        before = unet(x, timestep=t).sample
        from ditq.quant.modules import full_precision

        with full_precision(qlayers):
            fp = unet(x, timestep=t).sample
        _randomise_up(qlayers, seed=3)
        kw = unet(x, timestep=t).sample
        pos = unet(x, t).sample  # Hunyuan-style: the timestep as the second positional argument
        torch.testing.assert_close(kw, pos)
        scalar = unet(x[:2], 800).sample  # a scalar timestep is expanded to the batch
        torch.testing.assert_close(scalar, kw[:2], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, fp)  # quantized
    assert not torch.allclose(kw, before)  # and the branches add to it (B was zero before)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_branch_starts_at_zero_and_gated_path_equals_grouped_path(kind):
    from ditq.quant.modules import QuantConv2d, QuantLinear

    if kind == "linear":
        layer, x = torch.nn.Linear(16, 12), torch.randn(5, 7, 16)
        q = QuantLinear(layer, name="l")
    else:
        layer, x = torch.nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(5, 6, 8, 8)
        q = QuantConv2d(layer, name="c")
    ctx = TimestepContext(Router(3, "learned", TS, seed=1))
    ctx.router.fit_partition()
    q.branch = LoRABranch(q, 2, 3, ctx, alpha=4.0)
    assert q.branch.scale == 2.0
    ctx.set(torch.tensor([800, 600, 400, 200, 0]))
    with torch.no_grad():
        torch.testing.assert_close(q(x), layer(x))  # B = 0: the layer as it was
        q.branch.up.weight.normal_()
        grouped = q(x)  # no gradient: rows grouped by branch, each runs its own slice
        choice = ctx.router.choice(ctx.t)
        assert len(set(choice.tolist())) == 3
        for i in range(5):  # row i = the layer + its own branch alone
            k = int(choice[i])
            sl = slice(2 * k, 2 * k + 2)
            br = q.branch
            if kind == "linear":
                own = x[i] @ br.down.weight[sl].T @ br.up.weight[:, sl].T
            else:
                h = torch.nn.functional.conv2d(x[i:i + 1], br.down.weight[sl], None, 2, 1)
                own = torch.nn.functional.conv2d(h, br.up.weight[:, sl])[0]
            torch.testing.assert_close(grouped[i], layer(x[i:i + 1])[0] + 2.0 * own, rtol=1e-4, atol=1e-5)
    ctx.router.requires_grad_(True)
    ctx.set(ctx.t)
    dense = q(x)  # gradient through the gates: all branches, gated
    assert ctx._gates.requires_grad
    torch.testing.assert_close(dense.detach(), grouped, rtol=1e-5, atol=1e-6)


def test_lora_input_reads_the_quantized_or_the_fp_input():
    from ditq.config.schema import quantizer_config
    from ditq.quant.modules import QuantLinear
    from ditq.quant.quantizer import build_quantizer

    x = torch.randn(4, 16)
    outs = {}
    for src in ("quantized", "fp"):
        aq = build_quantizer(quantizer_config({"granularity": "per_token", "dynamic": True}, "int3", "act", "a"), "act")
        torch.manual_seed(0)
        q = QuantLinear(torch.nn.Linear(16, 8), None, aq, name="l")
        ctx = TimestepContext(Router(1, "fixed", TS))
        q.branch = LoRABranch(q, 2, 1, ctx, lora_input=src, generator=torch.Generator().manual_seed(0))
        torch.nn.init.normal_(q.branch.up.weight, generator=torch.Generator().manual_seed(1))
        ctx.set(torch.zeros(4))
        with torch.no_grad():
            base = torch.nn.functional.linear(aq(x), q.weight, q.bias)
            inp = aq(x) if src == "quantized" else x
            expected = base + inp @ q.branch.down.weight.T @ q.branch.up.weight.T
            outs[src] = q(x)
            torch.testing.assert_close(outs[src], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs["quantized"], outs["fp"])


def test_router_straight_through_gradient_reaches_the_router():
    adapter = random_dit()
    qlayers = _wrap(adapter)
    router = Router(3, "learned", TS, seed=0)
    install_lora(adapter.denoiser, qlayers, router, rank=2)
    _randomise_up(qlayers)
    mods = lora_modules(adapter.denoiser, qlayers)
    for p in adapter.denoiser.parameters():
        p.requires_grad_(False)
    for p in mods.parameters():
        p.requires_grad_(True)
    x, t, y = _inputs(5)
    gates = router(t)
    assert torch.equal(gates.detach(), torch.nn.functional.one_hot(gates.argmax(1), 3).float())  # hard in value
    adapter.denoise(x, t, y).pow(2).mean().backward()
    for p in (router.w1.weight, router.w2.weight, router.b2.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_fixed_partition_and_too_many_branches():
    r = Router(3, "fixed", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0])
    assert list(r.routing().values()) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # contiguous, equal counts (4, 3, 3)
    assert r.choice(torch.tensor([640, 540, 999, 10])).tolist() == [0, 1, 0, 2]  # off-grid: the nearest timestep's
    assert Router(1, "learned", TS).routing() == {t: 0 for t in TS}  # K = 1: plain LoRA
    learned = Router(4, "learned", [900, 800, 700, 600, 500, 400, 300, 200], seed=3)
    assert learned.fit_partition() == 1.0 and list(learned.routing().values()) == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="6 branches over 5 sampler timesteps.*at most 5"):
        Router(6, "learned", TS)


def test_step_check_plan_refuses_more_branches_than_sampler_steps_and_steps_after_it(compose, paths, tmp_path):
    from ditq.config import validate_config
    from ditq.methods.talora import TALoRAError
    from ditq.pipeline import run

    cfg = validate_config(compose(SHRINK + paths + ["method=efficientdm", "method.steps.1.branches=5"]))
    with pytest.raises(TALoRAError, match="branches=5 over the sampler's 4 timesteps"):
        run(cfg, output_dir=tmp_path / "a", progress=False)
    cfg = validate_config(compose(SHRINK + paths + ["method=efficientdm",
                                                    "method.steps=[{name: talora, iters: 2}, {name: rtn}]"]))
    with pytest.raises(TALoRAError, match=r"\['rtn'\] after talora"):
        run(cfg, output_dir=tmp_path / "b", progress=False)


def test_options_refuse_bad_values(compose, paths):
    from ditq.config import ConfigError, validate_config

    for bad, msg in (("method.steps.1.branches=0", "branches=0"), ("method.steps.1.router=soft", "router='soft'"),
                     ("method.steps.1.lora_bits=8", "lora_bits=8"), ("method.steps.1.lora_input=x", "lora_input"),
                     ("method.steps.1.dfa_power=-1", "dfa_power")):
        with pytest.raises((ConfigError, ValueError), match=msg):
            validate_config(compose(SHRINK + paths + ["method=efficientdm", "++" + bad]))


# -- the step ------------------------------------------------------------------------------------------
def _ctx(tmp_path, adapter=None, qlayers=None, n=10, include_uncond=True, name="out"):
    from ditq.methods.base import QuantContext
    from tests.test_block_engine import _records

    adapter = adapter or random_dit()
    qlayers = qlayers or _wrap(adapter)
    run = SimpleNamespace(calib=SimpleNamespace(include_uncond=include_uncond), sampler=sampler_cfg(num_steps=5),
                          model=SimpleNamespace(clip_sample=False),
                          method=SimpleNamespace(steps=[{"name": "rtn"}, {"name": "talora"}]))
    return QuantContext(adapter=adapter, run=run, qlayers=qlayers, roles={}, layer_inputs=lambda: {},
                        calib_records=lambda: _records(n, seed=1, timesteps=tuple(TS)), timesteps=list(TS),
                        scratch_dir=str(tmp_path / "scratch"), progress=False, output_dir=str(tmp_path / name))


def _step(**kw):
    from ditq.methods.options import TALoRAOptions
    from ditq.methods.talora import TALoRA

    base = dict(iters=30, branches=2, rank=4, lr=3e-3, log_every=10, checkpoint_every=10)
    base.update(kw)
    opts = TALoRAOptions(**base)
    opts.check()
    return TALoRA(opts)


@pytest.mark.parametrize("router,dfa", [("learned", True), ("fixed", False)])
def test_step_lowers_the_error_to_fp_and_records_saves_and_counts_the_lora(tmp_path, router, dfa):
    ctx = _ctx(tmp_path)
    adapter = ctx.adapter
    bits = {n: q.bits_per_weight() for n, q in ctx.qlayers.items()}
    size_before = adapter.parameter_bits({**bits, **declared_storage_bits(adapter.denoiser)})
    _step(router=router, dfa=dfa).apply(ctx)
    d = ctx.diagnostics["talora"]
    assert d["rows"] == 20 and d["layers"] == len(ctx.qlayers)  # 10 records + their unconditional twins
    assert d["mse_after"] < 0.5 * d["mse_before"] and d["loss_last"] < d["loss_first"]
    assert set(d["mse_by_t_before"]) == set(TS) and all(
        d["mse_by_t_after"][t] < d["mse_by_t_before"][t] for t in TS)
    assert d["routing"] == {str(t): k for t, k in zip(TS, [0, 0, 0, 1, 1])}
    assert (d["dfa_weights"] is not None) == dfa and d["curve"][0][0] == 0 and d["curve"][-1][0] == 29
    # saved with its spec, still installed (sampling routes by timestep), weights at fp16 values
    state = torch.load(tmp_path / "out" / "talora.pt", weights_only=False)
    assert state["spec"]["options"]["router"] == router and state["routing"] == {t: k for t, k in zip(TS, [0, 0, 0, 1, 1])}
    mods = lora_modules(adapter.denoiser, ctx.qlayers)
    for k, v in mods.state_dict().items():
        assert torch.equal(state["state_dict"][k], v)
        if v.is_floating_point():
            assert torch.equal(v, v.half().float())
    assert not any(p.requires_grad for p in mods.parameters())
    # the model size counts every LoRA / router weight at 16 bits
    n_new = d["lora_params"] + d["router_params"]
    assert n_new == sum(p.numel() for p in mods.parameters()) and n_new > 0
    size_after = adapter.parameter_bits({**bits, **declared_storage_bits(adapter.denoiser)})
    assert size_after - size_before == 16 * n_new
    assert adapter.parameter_bits(bits) - size_before == 32 * n_new  # without the declaration: 32 bits


def test_finetune_resumes_a_killed_run_to_identical_weights(tmp_path):
    """N iterations straight vs N/2, killed, rerun: the same weights, bit for bit."""

    def build():
        adapter = random_dit()
        qlayers = _wrap(adapter)
        install_lora(adapter.denoiser, qlayers, Router(3, "learned", TS, seed=0), rank=2)
        mods = lora_modules(adapter.denoiser, qlayers)
        for p in adapter.denoiser.parameters():
            p.requires_grad_(False)
        for p in mods.parameters():
            p.requires_grad_(True)
        x, t, y = _inputs(8, seed=5)
        with torch.no_grad():
            target = adapter.denoise(x, t, y) * 1.1
        calls = [0]

        def loss_of(rows, kill_at=None):
            calls[0] += 1
            if kill_at is not None and calls[0] > kill_at:
                raise KeyboardInterrupt("killed")
            return (adapter.denoise(x[rows], t[rows], y[rows]) - target[rows]).pow(2).mean()

        groups = [{"params": list(mods.parameters()), "lr": 1e-2}]
        return mods, groups, loss_of

    spec = {"model": "m", "options": {"rank": 2}}
    mods, groups, loss_of = build()
    straight = finetune(mods, groups, loss_of, 8, iters=8, batch_size=3, seed=1, progress=False)
    ref = {k: v.clone() for k, v in mods.state_dict().items()}

    path = tmp_path / "ck" / "checkpoint.pt"
    mods, groups, loss_of = build()
    with pytest.raises(KeyboardInterrupt):
        finetune(mods, groups, lambda r: loss_of(r, kill_at=5), 8, iters=8, batch_size=3, seed=1, progress=False,
                 checkpointer=Checkpointer(path, spec), checkpoint_every=4)
    assert torch.load(path, weights_only=False)["iteration"] == 4
    mods, groups, loss_of = build()
    resumed = finetune(mods, groups, loss_of, 8, iters=8, batch_size=3, seed=1, progress=False,
                       checkpointer=Checkpointer(path, spec), checkpoint_every=4)
    assert resumed.resumed_from == 4 and resumed.loss_first == straight.loss_first
    assert resumed.loss_last == straight.loss_last
    for k, v in mods.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_checkpoint_of_another_configuration_is_refused_or_restarted(tmp_path, caplog):
    path = tmp_path / "c.pt"
    Checkpointer(path, {"model": {"name": "a"}, "options": {"rank": 4}}).save({"iteration": 1})
    with pytest.raises(CheckpointMismatchError, match=r"options\.rank: 4 -> 8"):
        Checkpointer(path, {"model": {"name": "a"}, "options": {"rank": 8}}, explicit=True).load()
    auto = Checkpointer(path, {"model": {"name": "b"}, "options": {"rank": 4}})
    assert auto.load() is None and "model.name" in auto.restart_reason
    assert "starting over" in caplog.text
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="cannot be read"):
        Checkpointer(path, {}, explicit=True).load()
    assert Checkpointer(path, {}).load() is None


def test_step_with_an_explicit_checkpoint_of_other_options_names_the_fields(tmp_path):
    ck = str(tmp_path / "mine.pt")
    _step(iters=4, checkpoint=ck).apply(_ctx(tmp_path, name="a"))
    with pytest.raises(CheckpointMismatchError, match=r"options\.rank: 4 -> 2"):
        _step(iters=4, rank=2, checkpoint=ck).apply(_ctx(tmp_path, name="b"))
    # the automatic checkpoint, keyed by the spec: a finished run's rerun resumes at its end, other options get
    # their own checkpoint; a file under the key holding another spec is logged and replaced
    ctx = _ctx(tmp_path, name="c")
    _step(iters=4).apply(ctx)
    ctx2 = _ctx(tmp_path, name="d")
    _step(iters=4).apply(ctx2)
    assert ctx2.diagnostics["talora"]["resumed_from"] == 4
    assert ctx2.diagnostics["talora"]["mse_after"] == ctx.diagnostics["talora"]["mse_after"]
    ctx3 = _ctx(tmp_path, name="e")
    _step(iters=4, lr=1e-3).apply(ctx3)
    d = ctx3.diagnostics["talora"]
    assert d["resumed_from"] is None and d["checkpoint"] != ctx.diagnostics["talora"]["checkpoint"]
    stored = torch.load(d["checkpoint"], weights_only=False)
    Checkpointer(d["checkpoint"], {**stored.pop("spec"), "v": 0}).save(stored)  # e.g. an older spec format
    ctx4 = _ctx(tmp_path, name="f")
    _step(iters=4, lr=1e-3).apply(ctx4)
    d4 = ctx4.diagnostics["talora"]
    assert d4["resumed_from"] is None and "v: 0 -> 1" in d4["checkpoint_restart"]
    assert d4["mse_after"] == d["mse_after"]


def test_nan_loss_stops_naming_the_iteration():
    p = torch.nn.Parameter(torch.ones(2))
    values = iter([1.0, 2.0, float("nan")])

    def loss_of(rows):
        return p.sum() * next(values)

    with pytest.raises(FinetuneError, match="nan at iteration 2"):
        finetune(torch.nn.ModuleDict(), [{"params": [p], "lr": 1e-3}], loss_of, 4, iters=5, batch_size=2,
                 progress=False)


def test_efficientdm_runs_end_to_end_and_counts_the_lora_in_the_model_size(compose, paths, tmp_path):
    rows = {}
    for name, extra in (("rtn", ["method=rtn"]), ("edm", ["method=efficientdm", "method.steps.1.iters=3"])):
        rows[name] = run_pipeline(compose, paths + ["bits=w4a8", "diagnostics.enabled=false"] + extra, tmp_path / name)
    d = rows["edm"]["diagnostics"]["talora"]
    assert d["branches"] == 1 and d["router"] == "single" and d["dfa"] is False and d["iters"] == 3
    assert (tmp_path / "edm" / "talora.pt").is_file()
    extra_bits = 16 * (d["lora_params"] + d["router_params"])
    assert rows["edm"]["size_mb"] * 8e6 - rows["rtn"]["size_mb"] * 8e6 == pytest.approx(extra_bits, rel=1e-9)


def test_step_on_the_unet_adapter_trains_conv_branches_and_counts_them(tmp_path):
    """The U-Net adapter (unconditional, convs): rows route by timestep, the error to FP falls."""
    from tests.test_block_engine import _records
    from tests.test_unet_adapter import _wrap_all as wrap_unet
    from tests.test_unet_adapter import tiny_unet

    adapter = tiny_unet()
    qlayers = wrap_unet(adapter, "int3")
    ctx = _ctx(tmp_path, adapter=adapter, qlayers=qlayers, include_uncond=False)
    records = {**_records(10, seed=1, timesteps=tuple(TS)), "y": torch.zeros(10, dtype=torch.long)}  # no condition
    ctx.calib_records = lambda: records
    _step(iters=30, branches=3, rank=2).apply(ctx)
    d = ctx.diagnostics["talora"]
    assert d["rows"] == 10 and d["mse_after"] < 0.7 * d["mse_before"]
    convs = [q for q in qlayers.values() if q.weight.ndim == 4]
    assert convs and all(q.branch.up.weight.abs().sum() > 0 for q in convs)
    assert sorted(set(d["routing"].values())) == [0, 1, 2]


def test_method_configs_compose_with_their_ablations(compose, paths):
    from ditq.config import validate_config

    def steps(method):
        cfg = validate_config(compose(SHRINK + paths + ["model=tiny_unet_digits", "sampler.cfg_scale=1.0",
                                                        "eval=digits_uncond", f"method={method}", "bits=w4a4_fp4"]))
        return {s["name"]: dict(s) for s in cfg.method.steps}, [s["name"] for s in cfg.method.steps]

    msfp, order = steps("msfp")
    ptq, ptq_order = steps("msfp_ptq")
    assert order == ptq_order + ["talora"] and msfp["mixup_sign"] == ptq["mixup_sign"]  # msfp = msfp_ptq + talora
    t = msfp["talora"]
    assert (t["branches"], t["rank"], t["router"], t["dfa"]) == (4, 4, "learned", True)
    for method, diff in (("msfp_lora1", {"branches": 1}), ("msfp_nodfa", {"dfa": False})):
        s, o = steps(method)
        assert o == order and s["mixup_sign"] == msfp["mixup_sign"] and s["talora"] == {**t, **diff}
    edm, edm_order = steps("efficientdm")
    assert edm_order == ["rtn", "talora"] and edm["talora"]["branches"] == 1 and edm["talora"]["dfa"] is False
