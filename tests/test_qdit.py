"""Q-DiT's foundation: the method composition (conf/method/qdit*.yaml), per-layer group sizes that
drive both the weight and the activation quantizer of a layer, the cost model
(ditq.methods.cost) and the cost recorded in each quantized run's row."""
from __future__ import annotations

import math

import pytest
import torch

from ditq.config import validate_config
from ditq.methods.cost import (FP_BITS, check_constraints, layer_costs, layer_tokens, plan_cost, row_cost,
                               shared_copies, weight_group_size)
from ditq.methods.plan import LayerPlan, PlanError, QuantPlan, model_layers
from ditq.quant.spec import QuantizerConfig
from tests.conftest import SHRINK
from tests.helpers import run_pipeline

Q = "transformer_blocks.0.attn1.to_q"  # qkv, weight [128, 128]
FC2 = "transformer_blocks.0.ff.net.2"  # fc2, weight [128, 512]
ADALN = "transformer_blocks.0.norm1.linear"


@pytest.fixture(scope="module")
def qdit_cfg():
    from hydra import compose, initialize_config_dir

    from ditq.paths import config_dir

    def make(*overrides):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return validate_config(compose("config", overrides=SHRINK + ["bits=w4a8", *overrides]))

    return make


@pytest.fixture(scope="module")
def adapter(qdit_cfg):
    from ditq.models import load_adapter

    return load_adapter(qdit_cfg("method=qdit").model)


def _group_reference(x: torch.Tensor, g: int, bits: int = 8) -> torch.Tensor:
    """Asymmetric MinMax fake quantization per (token, group of g channels), Q-DiT's formula."""
    *lead, c = x.shape
    qmax = 2 ** bits - 1
    out = torch.empty_like(x)
    for start in range(0, c, g):
        part = x[..., start:start + g]
        lo, hi = part.amin(-1, keepdim=True), part.amax(-1, keepdim=True)
        scale = (hi - lo).clamp_min(1e-5) / qmax
        zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
        out[..., start:start + g] = (torch.clamp(torch.round(part / scale) + zp, 0, qmax) - zp) * scale
    return out


# ----------------------------------------------------------------------------- the composition
def test_qdit_composition(qdit_cfg, adapter):
    run = qdit_cfg("method=qdit")
    assert [s["name"] for s in run.method.steps] == ["gptq"]  # no rtn step: activations are dynamic
    plan = QuantPlan.from_run(run, adapter)
    w, a = plan.layers[Q].weight, plan.layers[Q].act
    assert (w.granularity, w.group_size, w.symmetric, w.range) == ("per_group", 128, False, "minmax")
    assert (a.granularity, a.group_size, a.symmetric, a.dynamic, a.range) == ("per_token_group", 128, False, True,
                                                                              "minmax")
    assert w.format == "int4" and a.format == "int8"
    assert {lp.role for lp in plan.quantized().values()} == {"qkv", "proj", "fc1", "fc2"}
    assert not plan.layers[ADALN].quantized  # adaLN off by default
    # the one-override switch and the variant file give the same plan, adaLN included
    on = QuantPlan.from_run(qdit_cfg("method=qdit", "method.layers=[qkv,proj,fc1,fc2,adaln]"), adapter)
    variant = QuantPlan.from_run(qdit_cfg("method=qdit_adaln"), adapter)
    assert on.layers[ADALN].weight.group_size == 128 and on.layers[ADALN].act.granularity == "per_token_group"
    assert on.digest() == variant.digest() != plan.digest()


# ----------------------------------------------------------------------------- with_group_sizes
def test_with_group_sizes_ties_weight_and_act(qdit_cfg, adapter):
    plan = QuantPlan.from_run(qdit_cfg("method=qdit"), adapter)
    out = plan.with_group_sizes({Q: 32, FC2: 64})
    assert (out.layers[Q].weight.group_size, out.layers[Q].act.group_size) == (32, 32)
    assert (out.layers[FC2].weight.group_size, out.layers[FC2].act.group_size) == (64, 64)
    assert out.layers[Q].weight.granularity == "per_group" and out.layers[Q].act.granularity == "per_token_group"
    assert plan.layers[Q].weight.group_size == 128  # not mutated
    # an FP side stays FP
    half = plan.with_layer(Q, act=None).with_group_sizes({Q: 32})
    assert half.layers[Q].act is None and half.layers[Q].weight.group_size == 32
    with pytest.raises(PlanError, match="positive int"):
        plan.with_group_sizes({Q: 0})
    with pytest.raises(PlanError, match="no layer 'nope'"):
        plan.with_group_sizes({"nope": 32})
    with pytest.raises(PlanError, match=r"group_size=256 is larger than the layer's width 128"):
        plan.with_group_sizes({Q: 256})
    static = QuantPlan.from_run(qdit_cfg("method=gptq"), adapter)  # static per-tensor activations
    with pytest.raises(PlanError, match=r"layer transformer_blocks\.0\.attn1\.to_q.*dynamic"):
        static.with_group_sizes({Q: 32})


# ----------------------------------------------------------------------------- end to end
def test_per_layer_group_sizes_drive_weight_and_act(compose, paths, qdit_cfg, adapter, tmp_path):
    from ditq.methods.wrap import wrap_layers

    plan = QuantPlan.from_run(qdit_cfg("method=qdit"), adapter).with_group_sizes({Q: 32, FC2: 64})
    src = plan.save(tmp_path / "groups.yaml")
    row = run_pipeline(compose, paths + ["method=qdit", "bits=w4a8", f"method.plan={src}"], tmp_path / "run")
    assert all(math.isfinite(v) for v in row["metrics"].values())
    used = QuantPlan.load(tmp_path / "run" / "plan.yaml")
    for name, g in ((Q, 32), (FC2, 64), ("transformer_blocks.1.attn1.to_q", 128)):
        assert (used.layers[name].weight.group_size, used.layers[name].act.group_size) == (g, g), name
    # the wrapped layers' act quantizers use their own group size: a forward equals the reference
    from ditq.models import load_adapter

    fresh = load_adapter(qdit_cfg("method=qdit").model)
    qlayers, _ = wrap_layers(fresh, None, plan=used)
    x = torch.randn(2, 16, 512, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 8, 512)
    for name, g in ((Q, 32), (FC2, 64)):
        aq = qlayers[name].act_quantizer
        xi = x[..., :qlayers[name].weight.shape[1]]
        assert aq.group_size == g
        got = aq(xi)
        torch.testing.assert_close(got, _group_reference(xi, g), rtol=0, atol=1e-5)
        assert not torch.allclose(got, _group_reference(xi, 128 if g != 128 else 32))
    # the row records the cost of the plan it used
    assert row["cost"]["bitops"] == plan_cost(used, layer_tokens(fresh, used.layers), shared_copies(fresh))["bitops"]
    assert row["cost"]["storage_bits"] > plan_cost(QuantPlan.from_run(qdit_cfg("method=qdit"), adapter),
                                                   layer_tokens(adapter), shared_copies(adapter))["storage_bits"]


def test_qdit_run_row_has_cost(compose, paths, tmp_path, adapter):
    row = run_pipeline(compose, paths + ["method=qdit", "bits=w4a8"], tmp_path / "run")
    assert "gptq" in str(row["timings"]) and all(math.isfinite(v) for v in row["metrics"].values())
    cost = row["cost"]
    plan = QuantPlan.load(tmp_path / "run" / "plan.yaml")
    assert cost == pytest.approx({**plan_cost(plan, layer_tokens(adapter), shared_copies(adapter)), "tokens": 16,
                                  "unit": "per sample, per denoiser forward"})
    assert cost["mean_group_size"] == 128.0 and cost["quantized_layers"] == 36
    assert 0 < cost["storage_mb"] < row["size_mb"]  # the plan's layers, not biases / norms


# ----------------------------------------------------------------------------- cost model
def _tiny_plan() -> QuantPlan:
    int4g = QuantizerConfig("int4", "per_group", group_size=32, symmetric=False)
    int8tg = QuantizerConfig("int8", "per_token_group", group_size=32, symmetric=False, dynamic=True)
    return QuantPlan({
        "a": LayerPlan("qkv", (10, 48), int4g, int8tg),  # 48 = 32 + 16: the last group is short
        "b": LayerPlan("adaln", (6, 8), None, None),  # full precision
        "c": LayerPlan("embed", (4, 2, 2, 2), QuantizerConfig("int8", "per_channel"), None),  # conv
    }, model="tiny")


def test_cost_by_hand():
    tokens = {"a": 16, "b": 1, "c": 16}
    rows = {r.name: r for r in layer_costs(_tiny_plan(), tokens)}
    a, b, c = rows["a"], rows["b"], rows["c"]
    # 2 segments (32 + 16) per output: 16 tokens x 10 rows x 2 FP16 rescale multiply-adds
    assert a.macs == 16 * 10 * 48 == 7680 and a.rescale_bitops == 16 * 10 * 2 * 16 * 16 == 81920
    assert a.bitops == 7680 * 4 * 8 + 81920
    # 480 elements x 4 bits + 10 rows x 2 groups x (16-bit scale + 4-bit zero point)
    assert a.storage_bits == 480 * 4 + 10 * 2 * 20 == 2320 and a.group_size == 32
    assert b.macs == 48 and b.bitops == 48 * FP_BITS * FP_BITS and b.rescale_bitops == 0 and b.storage_bits == 48 * 32 and b.group_size is None
    # conv: 16 output positions x 4 out x (2*2*2) in; symmetric per channel: one 16-bit scale per row
    assert c.macs == 512 and c.bitops == 512 * 8 * FP_BITS and c.rescale_bitops == 0 and c.storage_bits == 32 * 8 + 4 * 16
    assert c.group_size == 8  # no groups: the row's full width
    total = plan_cost(_tiny_plan(), tokens)
    assert total["bitops"] == 245760 + 81920 + 49152 + 131072 and total["macs"] == 7680 + 48 + 512
    assert total["storage_bits"] == 2320 + 1536 + 320 and total["storage_mb"] == pytest.approx(4176 / 8e6)
    assert total["mean_group_size"] == 20.0 and total["quantized_layers"] == 2
    # one token count for every layer
    assert plan_cost(_tiny_plan(), 2)["macs"] == 2 * (480 + 48 + 32)


def test_smaller_groups_cost_more_storage_and_bitops():
    plan = _tiny_plan()
    finer = plan.with_group_sizes({"a": 16})
    base, fine = plan_cost(plan, 16), plan_cost(finer, 16)
    assert fine["storage_bits"] == base["storage_bits"] + 10 * (3 - 2) * 20
    # one more rescale segment per (token, output row): the BitOps constraint sees group sizes
    assert fine["bitops"] == base["bitops"] + 16 * 10 * (3 - 2) * 16 * 16
    assert fine["mean_group_size"] < base["mean_group_size"]
    assert weight_group_size(finer.layers["a"]) == 16


def test_constraints():
    cost = plan_cost(_tiny_plan(), 16)
    assert check_constraints(cost, min_mean_group_size=20, max_bitops=cost["bitops"]) == []
    problems = check_constraints(cost, min_mean_group_size=128, max_bitops=1000, max_storage_bits=10)
    assert len(problems) == 3 and "mean_group_size 20.0 < min_mean_group_size 128" in problems[2]
    fp = QuantPlan({"b": LayerPlan("adaln", (6, 8), None, None)})
    assert check_constraints(plan_cost(fp, 1), min_mean_group_size=1) == ["mean_group_size None < min_mean_group_size 1"]


def test_cost_bad_input_is_named():
    with pytest.raises(PlanError, match="no token count for layer c"):
        layer_costs(_tiny_plan(), {"a": 16, "b": 1})
    with pytest.raises(PlanError, match="tokens for layer a must be a positive int"):
        layer_costs(_tiny_plan(), 0)
    with pytest.raises(PlanError, match="layer x has no weight shape"):
        layer_costs(QuantPlan({"x": LayerPlan("qkv", None, None, None)}), 1)


def test_layer_tokens_of_the_embedded_model(adapter):
    tokens = layer_tokens(adapter)
    assert tokens[Q] == tokens["pos_embed.proj"] == tokens["proj_out_2"] == 16  # 8x8 pixels, patch 2
    assert tokens[ADALN] == tokens["proj_out_1"] == 1  # conditioning only
    assert tokens["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"] == 1
    assert set(tokens) == {info.name for info in adapter.layers()}


def test_row_cost_of_the_embedded_model(qdit_cfg, adapter):
    plan = QuantPlan.from_run(qdit_cfg("method=qdit"), adapter)
    cost = row_cost(plan, adapter)
    # every quantized linear of a block: 16 tokens x out x in x 4 x 8; hidden 128, mlp 512, 6 blocks
    block_macs = 16 * (3 * 128 * 128 + 128 * 128 + 512 * 128 + 128 * 512)
    quantized = sum(r.bitops for r in layer_costs(plan, layer_tokens(adapter)) if r.weight_bits == 4)
    # group 128: one rescale segment per output for the 128-wide inputs, 4 for fc2 (512 wide)
    block_rescale = 16 * (3 * 128 + 128 + 512 + 128 * 4) * 16 * 16
    assert quantized == 6 * (block_macs * 4 * 8 + block_rescale)
    assert cost["mean_group_size"] == 128 and cost["tokens"] == 16


def test_shared_copies_count_once(adapter):
    """diffusers' per-block timestep embedders equal block 0's: counted once, as size_mb does."""
    copies = shared_copies(adapter)
    assert len(copies) == 2 * 5 and all(".norm1.emb.timestep_embedder." in n for n in copies)
    assert not any(n.startswith("transformer_blocks.0.") for n in copies)
    fp = QuantPlan({n: LayerPlan(r, s, None, None) for n, (r, s) in model_layers(adapter).items()})
    rows = layer_costs(fp, layer_tokens(adapter), copies)
    assert all(r.copy and r.storage_bits == 0 and r.macs == 0 for r in rows if r.name in copies)
    # all-FP plan: 32 bits per counted weight = the model's size without biases / norms / label table
    weights = sum(p.numel() for p in adapter.unique_parameters() if p.dim() >= 2)
    label_table = adapter.denoiser.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.numel()
    assert plan_cost(fp, 1, copies)["storage_bits"] == 32 * (weights - label_table)
    with pytest.raises(PlanError, match="copies names layers the plan does not have"):
        layer_costs(fp, 1, ["nope"])


def test_gptq_quantizes_each_layer_with_its_own_group_size(compose, paths, qdit_cfg, adapter, tmp_path, monkeypatch):
    """The public code passes the first block's group size to every block's GPTQ; here each layer's
    frozen GPTQ grid has the groups of its own plan entry."""
    from ditq.methods import gptq as gptq_mod

    seen = {}
    real = gptq_mod.gptq_layer

    def spy(q, hessian, name, **options):
        res = real(q, hessian, name, **options)
        seen[name] = tuple(q.weight_quantizer.scale.shape)
        return res

    monkeypatch.setattr(gptq_mod, "gptq_layer", spy)
    q1 = "transformer_blocks.1.attn1.to_q"
    plan = QuantPlan.from_run(qdit_cfg("method=qdit"), adapter).with_group_sizes({Q: 32, q1: 64, FC2: 16})
    src = plan.save(tmp_path / "groups.yaml")
    run_pipeline(compose, paths + ["method=qdit", "bits=w4a8", f"method.plan={src}", "diagnostics.enabled=false"],
                 tmp_path / "run")
    assert seen[Q] == (128, 4) and seen[q1] == (128, 2) and seen[FC2] == (128, 32)
    assert seen["transformer_blocks.2.attn1.to_q"] == (128, 1)  # the uniform 128 elsewhere
