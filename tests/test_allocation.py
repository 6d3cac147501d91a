"""group_allocation (ditq.methods.allocation): Q-DiT Table 5's ILP and Hessian-based group-size
allocation on the embedded model: sensitivities, the constraint of the run's search group, errors
before any work, and shrunk end-to-end runs of method=qdit_ilp / qdit_hessian."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ditq.config import validate_config
from ditq.methods.allocation import PLAN_FILE, AllocationError, GroupAllocation, layer_sensitivities
from ditq.methods.base import QuantContext
from ditq.methods.cost import check_constraints, layer_tokens, plan_cost, shared_copies
from ditq.methods.options import GroupAllocationOptions
from ditq.methods.plan import QuantPlan
from ditq.quant.spec import QuantizerConfig
from tests.conftest import SHRINK
from tests.helpers import run_pipeline

OUTLIER = "transformer_blocks.3.ff.net.2"  # fc2, weight [128, 512]


@pytest.fixture(scope="module")
def cfg():
    from hydra import compose, initialize_config_dir

    from ditq.paths import config_dir

    def make(*overrides):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return validate_config(compose("config", overrides=SHRINK + ["bits=w4a8", "search=embedded",
                                                                         "method=qdit_ilp", *overrides]))

    return make


def _inputs(adapter, names, outlier: str | None = None, rows: int = 64):
    """Synthetic FP calibration rows per layer: unit Gaussians; `outlier`'s input gets a few channels
    30x larger (what makes large groups costly for it)."""
    out = {}
    for i, n in enumerate(names):
        c = adapter.denoiser.get_submodule(n).weight.shape[1]
        x = torch.randn(rows, c, generator=torch.Generator().manual_seed(i))
        if n == outlier:
            x[:, ::37] *= 30.0
        out[n] = {"rows": x, "min": x.amin(0), "max": x.amax(0)}
    return out


@pytest.fixture(scope="module")
def model(cfg):
    """The embedded model wrapped by qdit's plan (search settings do not change it); each test's
    context starts from fresh quantizers of that plan."""
    from ditq.methods.plan import plan_for_run
    from ditq.methods.wrap import wrap_layers
    from ditq.models import load_adapter

    run = cfg()
    adapter = load_adapter(run.model)
    plan = plan_for_run(run, adapter)
    qlayers, roles = wrap_layers(adapter, run, plan=plan)
    return adapter, plan, qlayers, roles, _inputs(adapter, list(qlayers), OUTLIER)


def _ctx(run, tmp_path, model, inputs_fail=False):
    from ditq.methods.wrap import apply_plan

    adapter, plan, qlayers, roles, data = model
    apply_plan(qlayers, plan, rebuild=True)

    def layer_inputs():
        if inputs_fail:
            raise AssertionError("calibration inputs were requested before the settings were checked")
        return data

    return QuantContext(adapter=adapter, run=run, qlayers=qlayers, roles=roles, layer_inputs=layer_inputs,
                        plan=plan, output_dir=str(tmp_path), progress=False)


def _step(**kw):
    return GroupAllocation(GroupAllocationOptions(**kw))


def _cost(ctx, plan):
    return plan_cost(plan, layer_tokens(ctx.adapter, plan.layers), shared_copies(ctx.adapter, plan.layers))


# ----------------------------------------------------------------------------- the step
@pytest.mark.parametrize("strategy", ["ilp", "hessian"])
def test_allocation_meets_bitops_and_refines_the_sensitive_layer(cfg, model, tmp_path, strategy):
    run = cfg()
    ctx = _ctx(run, tmp_path, model)
    base = ctx.plan
    step = _step(strategy=strategy)
    assert step.needs_layer_inputs(ctx)
    step.apply(ctx)
    chosen = ctx.plan
    d = ctx.diagnostics["group_allocation"]
    sizes = {n: lp.weight.group_size for n, lp in chosen.quantized().items()}
    assert len(sizes) == 36 and len(set(sizes.values())) > 1  # mixed
    assert all(chosen.layers[n].act.group_size == g for n, g in sizes.items())  # tied
    # the constraint: BitOps no more than the uniform plan at the target (32)
    target = base.with_group_sizes({n: 32 for n in sizes})
    assert d["budget"] == _cost(ctx, target)["bitops"] == d["target_cost"]
    assert check_constraints(_cost(ctx, chosen), max_bitops=d["budget"]) == []
    assert d["cost"] == _cost(ctx, chosen)["bitops"]
    # the layer with outlier input channels is the most sensitive one and gets the smallest group
    per = d["per_layer"]
    assert max(per, key=lambda n: per[n]["sensitivity"]["32"]) == OUTLIER
    assert sizes[OUTLIER] == 8 < sorted(sizes.values())[len(sizes) // 2]
    # smaller groups are less sensitive (both weights and activations get finer ranges)
    s = per[OUTLIER]["sensitivity"]
    assert s["8"] < s["32"] < s["128"]
    # the wrapped layers were rebuilt for the chosen plan; the plan file reloads to it
    q = ctx.qlayers[OUTLIER]
    assert q.weight_quantizer.group_size == 8 and q.act_quantizer.group_size == 8
    assert QuantPlan.load(tmp_path / PLAN_FILE) == chosen
    assert d["strategy"] == strategy and d["solver"] in ("milp", "bnb") and d["sensitivity_s"] >= 0


@pytest.mark.parametrize("constraint", ["storage", "mean_group_size", "none"])
def test_other_constraints(cfg, model, tmp_path, constraint):
    run = cfg(f"search.constraint={constraint}")
    ctx = _ctx(run, tmp_path, model)
    base = ctx.plan
    _step(strategy="hessian", solver="bnb").apply(ctx)
    d, chosen = ctx.diagnostics["group_allocation"], ctx.plan
    cost = _cost(ctx, chosen)
    target = _cost(ctx, base.with_group_sizes({n: 32 for n in d["per_layer"]}))
    if constraint == "storage":
        assert check_constraints(cost, max_storage_bits=target["storage_bits"]) == []
        assert cost["storage_bits"] == pytest.approx(d["cost"], abs=1)
    elif constraint == "mean_group_size":
        assert check_constraints(cost, min_mean_group_size=32) == [] and d["budget"] == -32 * 36
    else:  # each layer's smallest sensitivity
        assert d["budget"] is None
        for n, e in d["per_layer"].items():
            s = e["sensitivity"]
            assert s[str(e["group_size"])] == min(s.values()), n


def test_explicit_max_bitops(cfg, model, tmp_path):
    run = cfg()
    ctx = _ctx(run, tmp_path, model)
    uniform64 = _cost(ctx, ctx.plan.with_group_sizes({n: 64 for n in ctx.qlayers}))["bitops"]
    ctx = _ctx(cfg(f"search.max_bitops={uniform64}"), tmp_path, model)
    _step().apply(ctx)
    d = ctx.diagnostics["group_allocation"]
    assert d["budget"] == uniform64 and d["budget_source"] == "search.max_bitops"
    assert d["cost"] <= uniform64 and _cost(ctx, ctx.plan)["bitops"] == d["cost"]


# ----------------------------------------------------------------------------- the sensitivities
def _group_plan(g, weight=True, act=True):
    from ditq.methods.plan import LayerPlan

    w = QuantizerConfig("int4", "per_group", group_size=g, symmetric=False) if weight else None
    a = QuantizerConfig("int8", "per_token_group", group_size=g, symmetric=False, dynamic=True) if act else None
    return LayerPlan("fc1", (64, 32), w, a)


def test_hessian_proxy_equals_the_measured_mse_when_its_diagonals_are_exact():
    """The weight term is exact when X^T X is diagonal, the activation term when W^T W is."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(256, 32, generator=g))
    x = q * torch.linspace(1, 20, 32) * 16  # orthogonal columns: X^T X diagonal
    w = torch.randn(64, 32, generator=g)
    plans = [_group_plan(gs, act=False) for gs in (8, 16, 32)]
    ilp = layer_sensitivities("ilp", w, x, plans)
    hes = layer_sensitivities("hessian", w, x, plans)
    assert ilp == pytest.approx(hes, rel=1e-4) and ilp[0] < ilp[2]
    wq, _ = torch.linalg.qr(torch.randn(64, 32, generator=g))
    w = wq * torch.linspace(0.5, 3, 32)  # orthogonal columns: W^T W diagonal
    x = torch.randn(256, 32, generator=g) * torch.linspace(0.1, 10, 32)
    plans = [_group_plan(gs, weight=False) for gs in (8, 16, 32)]
    ilp = layer_sensitivities("ilp", w, x, plans)
    assert ilp == pytest.approx(layer_sensitivities("hessian", w, x, plans), rel=1e-4)
    assert layer_sensitivities("hessian", w, x, plans, act_term=False) == [0.0, 0.0, 0.0]  # FP weights
    # with both sides quantized and generic data the proxy still tracks the MSE's order of magnitude
    x = torch.randn(256, 32, generator=g)
    both = [_group_plan(gs) for gs in (8, 32)]
    a, b = layer_sensitivities("ilp", w, x, both), layer_sensitivities("hessian", w, x, both)
    assert all(0.5 < u / v < 2 for u, v in zip(a, b))


def test_hessian_diagonal_is_the_accumulators():
    from ditq.calibration.stats import HessianAccumulator

    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(16)
    acc.add(x)
    torch.testing.assert_close(acc.H.diagonal() / 2, x.pow(2).mean(0))


# ----------------------------------------------------------------------------- errors before work
def test_bad_settings_fail_before_calibration(cfg, model, tmp_path):
    cases = [
        (["search.choices=[8,16,256]"], r"search\.choices=\[256, 16, 8\]: group size 256 does not fit layer "
                                        r"transformer_blocks\.0\.attn1\.to_q \(input width 128\)"),
        (["search.target_group_size=256"], r"search\.target_group_size=256 is wider than layer "
                                           r"transformer_blocks\.0\.attn1\.to_q"),
        (["search.max_bitops=1000"], r"search\.constraint=bitops: even the largest group size of "
                                     r"search\.choices=\[128, 64, 32, 16, 8\].*search\.max_bitops"),
        (["search.constraint=mean_group_size", "search.choices=[8,16]"],
         r"summed group size 576, but 1152 is >= needed \(search\.target_group_size=32 x 36"),
    ]
    for overrides, match in cases:
        ctx = _ctx(cfg(*overrides), tmp_path, model, inputs_fail=True)
        with pytest.raises(AllocationError, match=match):
            _step().needs_layer_inputs(ctx)


def test_static_activations_are_refused(cfg, tmp_path):
    from ditq.methods.plan import plan_for_run
    from ditq.methods.wrap import wrap_layers
    from ditq.models import load_adapter

    run = cfg("method.act.dynamic=false", "method.act.granularity=per_tensor", "method.act.group_size=null",
              "method.steps=[{name: group_allocation}]")
    adapter = load_adapter(run.model)
    plan = plan_for_run(run, adapter)
    qlayers, roles = wrap_layers(adapter, run, plan=plan)
    ctx = _ctx(run, tmp_path, (adapter, plan, qlayers, roles, {}), inputs_fail=True)
    with pytest.raises(AllocationError, match=r"ties each layer's weight and activation group sizes.*dynamic"):
        _step().needs_layer_inputs(ctx)


def test_memoised_with_group_sizes_equals_layer_by_layer(model):
    """with_group_sizes resolves each distinct layer setting once: the same plan as one layer at a time."""
    plan = model[1]
    sizes = {n: (8, 16, 64)[i % 3] for i, n in enumerate(plan.quantized())}
    fast = plan.with_group_sizes(sizes)
    slow = plan
    for n, g in sizes.items():
        slow = slow.with_group_sizes({n: g})
    assert fast == slow and fast.created_by == plan.created_by
    a, b = fast.layers["transformer_blocks.0.attn1.to_q"], fast.layers["transformer_blocks.1.attn1.to_q"]
    assert a.weight == b.weight and a.weight is not b.weight  # equal, never shared


def test_options_are_checked():
    from ditq.methods.registry import parse_step

    with pytest.raises(ValueError, match=r"step 'group_allocation': strategy='fid'; choose one of ilp, hessian"):
        parse_step({"name": "group_allocation", "strategy": "fid"})
    with pytest.raises(ValueError, match="max_rows=0"):
        parse_step({"name": "group_allocation", "max_rows": 0})


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", ["qdit_ilp", "qdit_hessian"])
def test_end_to_end(compose, paths, tmp_path, method):
    row = run_pipeline(compose, paths + [f"method={method}", "search=embedded", "bits=w4a8"], tmp_path / "run")
    assert all(math.isfinite(v) for v in row["metrics"].values())
    d = row["diagnostics"]["group_allocation"]
    assert d["strategy"] == method.split("_")[1] and d["cost"] <= d["budget"]
    groups = row["plan"]["groups"]
    sizes = Counter()
    for grp in groups:
        if grp["weight"] is not None:
            assert grp["weight"]["group_size"] == grp["act"]["group_size"]
            sizes[grp["weight"]["group_size"]] += len(grp["layers"])
    assert len(sizes) > 1 and sum(sizes.values()) == 36  # mixed group sizes recorded in the row
    assert row["cost"]["bitops"] == d["cost"] <= d["budget"]
    used = QuantPlan.load(tmp_path / "run" / "plan.yaml")
    assert used == QuantPlan.load(tmp_path / "run" / PLAN_FILE)
    assert "gptq" in row["diagnostics"] and row["diagnostics"]["gptq"]["layers"] == 36


def test_kxk_convolution_is_refused(cfg):
    """A patch-embedding conv's recorded inputs are pixels, not the patches its weight multiplies."""
    from ditq.methods.allocation import allocation_problem
    from tests.helpers import TINY_ARCH, random_dit

    adapter = random_dit(dict(TINY_ARCH, in_channels=8, out_channels=8))
    run = cfg("method.layers=[qkv,embed]", "search.choices=[8,4]", "search.target_group_size=8")
    plan = QuantPlan.from_run(run, adapter)
    with pytest.raises(AllocationError, match=r"layer pos_embed\.proj \(embed\) is a \(2, 2\) convolution"):
        allocation_problem(plan, adapter, run.search)
    # without it the same settings work
    ok = QuantPlan.from_run(cfg("search.choices=[8,4]", "search.target_group_size=8"), adapter)
    assert allocation_problem(ok, adapter, run.search).choices == [8, 4]
