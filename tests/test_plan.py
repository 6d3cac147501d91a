"""Per-layer quantization plans (ditq.methods.plan): build, save/load, check against the model,
wrap layers from them, rebuild quantizers for a changed plan, record them in the result row."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from ditq.config import ConfigError, validate_config
from ditq.methods.plan import PlanError, PlanSpec, QuantPlan
from tests.conftest import SHRINK

EXAMPLE = Path(__file__).resolve().parents[1] / "conf" / "plans" / "example_tiny_dit_mixed.yaml"
Q = "transformer_blocks.0.attn1.to_q"  # qkv, weight [128, 128]
FC1 = "transformer_blocks.0.ff.net.0.proj"  # fc1, weight [512, 128]
FC2 = "transformer_blocks.0.ff.net.2"  # fc2, weight [128, 512]


@pytest.fixture(scope="module")
def run_cfg():
    from hydra import compose, initialize_config_dir

    from ditq.paths import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return validate_config(compose("config", overrides=SHRINK + ["bits=w4a8"]))


def _adapter(run_cfg, **model):
    from ditq.models import load_adapter

    cfg = OmegaConf.merge(run_cfg.model, model) if model else run_cfg.model
    return load_adapter(cfg)


@pytest.fixture
def adapter(run_cfg):
    return _adapter(run_cfg)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _default_plan():
    return {"default": {"weight": {"format": "int4", "granularity": "per_channel"},
                        "act": {"format": "int8", "symmetric": False}},
            "roles": {"embed": None, "final": None}}


# ----------------------------------------------------------------------------- round trip
def test_plan_save_load_round_trip(run_cfg, adapter, tmp_path):
    plan = QuantPlan.from_run(run_cfg, adapter)
    assert len(plan.quantized()) == 6 * 7 and plan.layers[Q].weight.format == "int4"
    path = plan.save(tmp_path / "plan.yaml")
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]  # atomic: no temporary file left behind
    back = QuantPlan.load(path)  # a saved plan is fully expanded: loads without the model
    assert back == plan and back.model == "tiny_dit_digits" and back.structure == plan.structure
    assert back.layers[Q] == plan.layers[Q] and back.layers[Q].shape == (128, 128)
    # and the quantizers built from it are the same: identical quantized weights
    from ditq.methods.wrap import wrap_layers

    other = _adapter(run_cfg)
    qa, _ = wrap_layers(adapter, run_cfg)  # no plan: method + bits, as before plans existed
    qb, _ = wrap_layers(other, run_cfg, plan=QuantPlan.load(path))
    assert list(qa) == list(qb)
    for name in qa:
        for q in (qa[name], qb[name]):
            q.weight_quantizer.fit(q.weight.data)
            q.refresh()
        assert torch.equal(qa[name].w_hat, qb[name].w_hat), name


def test_run_from_saved_plan_reproduces_it(compose, tmp_path):
    from ditq.pipeline import run

    paths = [f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results"]
    first = run(validate_config(compose(SHRINK + paths + [f"method.plan={EXAMPLE}"])), output_dir=tmp_path / "a",
                progress=False)
    saved = tmp_path / "a" / "plan.yaml"
    assert saved.is_file() and first["plan"]["file"] == str(saved.resolve())
    assert first["plan"]["source"] == str(EXAMPLE) and first["plan"]["quantized_layers"] == 42
    assert first["wbits"] == "mixed" and first["abits"] == 8
    # the row's compact plan: fc1 layers in the 8-bit group, the rest of the quantized layers at 4 bits
    groups = {g["weight"]["format"]: g for g in first["plan"]["groups"]}
    assert groups["int8"]["roles"] == ["fc1"] and len(groups["int8"]["layers"]) == 6
    assert FC1 in groups["int8"]["layers"] and FC2 in groups["int4"]["layers"]
    json.dumps(first["plan"])  # JSON-able (the results store writes it)

    second = run(validate_config(compose(SHRINK + paths + [f"method.plan={saved}"])), output_dir=tmp_path / "b",
                 progress=False)
    assert second["plan"]["sha256"] == first["plan"]["sha256"]
    assert second["metrics"] == first["metrics"]  # same quantizers, same images
    assert second["bits_per_weight"] == first["bits_per_weight"] and second["size_mb"] == first["size_mb"]
    assert QuantPlan.load(tmp_path / "b" / "plan.yaml") == QuantPlan.load(saved)

    # bits per weight weighted by parameter count: fc1 (512x128, 8 bit) weighs 4x a qkv layer (128x128)
    plan = QuantPlan.load(saved)
    per_layer = []
    for lp in plan.quantized().values():
        out, width = lp.shape[0], lp.shape[1]
        bits = {"int8": 8, "int4": 4}[lp.weight.format] + 16 * out / (out * width)  # per-channel fp16 scale
        per_layer.append((bits, out * width))
    weighted = sum(b * n for b, n in per_layer) / sum(n for _, n in per_layer)
    unweighted = sum(b for b, _ in per_layer) / len(per_layer)
    assert first["bits_per_weight"] == pytest.approx(weighted, rel=1e-9)
    assert abs(weighted - unweighted) > 0.1


# ----------------------------------------------------------------------------- bad plans
def test_unknown_layer_is_named(run_cfg, adapter, tmp_path):
    data = _default_plan()
    data["layers"] = {"transformer_blocks.9.attn1.to_q": {"weight": "int8"}}
    with pytest.raises(PlanError, match=r"unknown layer.*transformer_blocks\.9\.attn1\.to_q"):
        QuantPlan.load(_write(tmp_path / "p.yaml", data), adapter=adapter, run=run_cfg)
    # an expanded plan with an extra layer
    plan = QuantPlan.from_run(run_cfg, adapter)
    extra = QuantPlan({**plan.layers, "blocks.99.fc": plan.layers[Q]}, model=plan.model)
    with pytest.raises(PlanError, match=r"unknown layer.*blocks\.99\.fc"):
        extra.validate(adapter, "tiny_dit_digits")


def test_missing_layer_is_named(run_cfg, adapter, tmp_path):
    data = {"roles": {r: {"weight": "int4", "act": None} for r in ("qkv", "proj", "fc1", "adaln", "embed", "final")}}
    with pytest.raises(PlanError, match=r"6 model layer\(s\) have no settings.*transformer_blocks\.0\.ff\.net\.2"):
        QuantPlan.load(_write(tmp_path / "p.yaml", data), adapter=adapter, run=run_cfg)
    # a saved (expanded) plan with one layer deleted
    saved = QuantPlan.from_run(run_cfg, adapter).to_dict()
    del saved["layers"][FC2]
    with pytest.raises(PlanError, match=r"1 model layer\(s\) have no settings.*" + FC2.replace(".", r"\.")):
        QuantPlan.load(_write(tmp_path / "saved.yaml", saved)).validate(adapter, "tiny_dit_digits")
    # a side no level sets is missing too (null keeps it in full precision)
    with pytest.raises(PlanError, match=r"57 layer\(s\) have no act settings: pos_embed\.proj.*act: null"):
        QuantPlan.load(_write(tmp_path / "side.yaml", {"default": {"weight": "int4"}}), adapter=adapter, run=run_cfg)


def test_plan_from_another_model_is_named(run_cfg, adapter, tmp_path):
    path = QuantPlan.from_run(run_cfg, adapter).save(tmp_path / "plan.yaml")
    arch = {**json.loads((Path(run_cfg.model.path) / "transformer" / "config.json").read_text()),
            "attention_head_dim": 16}  # same layer names, hidden width 64 instead of 128
    arch = {k: v for k, v in arch.items() if not k.startswith("_")}
    narrow = _adapter(run_cfg, name="tiny_dit_narrow", weights="random", path=None, arch=arch)
    with pytest.raises(PlanError) as err:
        QuantPlan.load(path).validate(narrow, "tiny_dit_narrow")
    msg = str(err.value)
    assert f"layer {Q}: the plan has weight shape [128, 128], the model [64, 64]" in msg
    assert "made for model tiny_dit_digits" in msg
    with pytest.raises(PlanError, match=r"weight shape \[128, 128\], the model \[64, 64\]"):  # same via the file path
        QuantPlan.load(path, adapter=narrow, run=run_cfg)


def test_group_size_larger_than_width_fails_before_fp_sampling(compose, tmp_path, monkeypatch):
    import ditq.sampling as sampling
    from ditq.pipeline import run

    def explode(*a, **k):
        raise AssertionError("sampling started before the plan was checked")

    monkeypatch.setattr(sampling.Sampler, "sample", explode)
    paths = [f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results"]
    # through the method settings: per_group 256 on layers 128 wide
    cfg = validate_config(compose(SHRINK + paths + ["method.weight.granularity=per_group", "+method.weight.group_size=256"]))
    with pytest.raises(PlanError, match=rf"layer {Q.replace('.', '[.]')} \(qkv, weight \[128, 128\]\): weight "
                                        r"group_size=256 is larger than the layer's width 128; set group_size <= 128"):
        run(cfg, output_dir=tmp_path / "a", progress=False)
    # through a plan file, for one layer only (fc2 is 512 wide, fc1 128)
    data = _default_plan()
    data["layers"] = {FC2: {"weight": {"granularity": "per_group", "group_size": 512}},
                      FC1: {"weight": {"granularity": "per_group", "group_size": 512}}}
    plan = _write(tmp_path / "p.yaml", data)
    with pytest.raises(PlanError) as err:
        run(validate_config(compose(SHRINK + paths + [f"method.plan={plan}"])), output_dir=tmp_path / "b",
            progress=False)
    assert f"layer {FC1} (fc1, weight [512, 128]): weight group_size=512 is larger than the layer's width 128" in str(err.value)
    assert FC2 + " (" not in str(err.value)  # 512 fits fc2's width of 512
    assert not list((tmp_path / "results").rglob("*.json"))


def test_bad_plan_file_fails_in_config_validation(compose, tmp_path):
    with pytest.raises(ConfigError, match=r"method\.plan=.*nope\.yaml.*does not exist"):
        validate_config(compose(SHRINK + [f"method.plan={tmp_path}/nope.yaml"]))
    data = _default_plan()
    data["roles"]["fc1"] = {"weight": {"format": "fp4_e4m1"}}
    with pytest.raises(ConfigError, match=r"method\.plan=.*: plan roles\.fc1 weight with format 'fp4_e4m1'.*= 6, not 4"):
        validate_config(compose(SHRINK + [f"method.plan={_write(tmp_path / 'f.yaml', data)}"]))
    data = _default_plan()
    data["layers"] = {Q: {"role": "qkv", "weight": {"granularity": "per_token"}}}
    with pytest.raises(ConfigError, match=rf"plan layer {Q.replace('.', '[.]')} weight.*per_token.*is for activations"):
        validate_config(compose(SHRINK + [f"method.plan={_write(tmp_path / 'g.yaml', data)}"]))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['layer'\]"):
        validate_config(compose(SHRINK + [f"method.plan={_write(tmp_path / 'k.yaml', {'layer': {}})}"]))
    ok = validate_config(compose(SHRINK + [f"method.plan={EXAMPLE}"]))
    assert "plan_example_tiny_dit_mixed" in ok.run_name
    # a side or format a higher level supplies is no error at config time (completeness: after load)
    split = {"default": {"weight": {"granularity": "per_channel"}}, "roles": {"fc1": {"weight": "int8"}},
             "layers": {FC1: {"role": "fc1", "act": None}}}
    validate_config(compose(SHRINK + [f"method.plan={_write(tmp_path / 's.yaml', split)}"]))


# ----------------------------------------------------------------------------- plans take effect
def test_per_layer_settings_take_effect(run_cfg, adapter):
    from ditq.methods.wrap import wrap_layers

    plan = QuantPlan.load(EXAMPLE, adapter=adapter, run=run_cfg)
    qlayers, roles = wrap_layers(adapter, run_cfg, plan=plan)
    assert qlayers[FC1].weight_quantizer.cfg.format == "int8"
    assert qlayers[FC2].weight_quantizer.cfg.format == "int4" and qlayers[Q].weight_quantizer.cfg.format == "int4"
    assert qlayers[FC1].act_quantizer.cfg == qlayers[FC2].act_quantizer.cfg  # act settings shared
    assert "pos_embed.proj" not in qlayers and roles[FC1] == "fc1"  # embed stays FP (roles.embed: null)
    for q in qlayers.values():
        q.weight_quantizer.fit(q.weight.data)
        q.refresh()
    err8 = (qlayers[FC1].w_hat - qlayers[FC1].weight).abs().max() / qlayers[FC1].weight.abs().max()
    err4 = (qlayers[FC2].w_hat - qlayers[FC2].weight).abs().max() / qlayers[FC2].weight.abs().max()
    assert err8 < 0.01 < err4

    # `default: run` starts from method + bits (w4a8) and a per-layer entry overrides one layer
    spec = PlanSpec.parse({"default": "run", "layers": {FC2: {"weight": {"format": "int8"}, "act": None}}})
    fresh = _adapter(run_cfg)  # adapter.layers() lists nn.Linear / nn.Conv2d: expand before wrapping
    p2 = QuantPlan.expand(spec, fresh, run_cfg)
    assert p2.layers[FC2].weight.format == "int8" and p2.layers[FC2].act is None
    assert p2.layers[FC2].weight.granularity == "per_channel"  # inherited from method.weight
    assert p2.layers[Q] == QuantPlan.from_run(run_cfg, fresh).layers[Q]


def test_with_layer_and_apply_plan_rebuild_without_reload(run_cfg, adapter):
    from ditq.methods.wrap import apply_plan, wrap_layers

    plan = QuantPlan.from_run(run_cfg, adapter)
    qlayers, _ = wrap_layers(adapter, run_cfg, plan=plan)
    before = {n: q.weight_quantizer for n, q in qlayers.items()}
    grouped = plan.with_layer(FC2, weight={"granularity": "per_group", "group_size": 64})
    assert plan.layers[FC2].weight.granularity == "per_channel"  # the original plan is unchanged
    assert apply_plan(qlayers, grouped) == [FC2]
    assert qlayers[FC2].weight_quantizer.group_size == 64 and qlayers[FC2].weight_quantizer is not before[FC2]
    assert all(qlayers[n].weight_quantizer is before[n] for n in qlayers if n != FC2)
    assert apply_plan(qlayers, grouped) == []  # nothing changed: nothing rebuilt
    fp_act = grouped.with_layer(Q, act=None)
    assert apply_plan(qlayers, fp_act) == [Q] and qlayers[Q].act_quantizer is None
    with pytest.raises(PlanError, match=rf"{Q.replace('.', '[.]')}.*group_size=256 is larger than the layer's width 128"):
        plan.with_layer(Q, weight={"granularity": "per_group", "group_size": 256})
    with pytest.raises(PlanError, match=r"plan has no layer 'nope'"):
        plan.with_layer("nope", weight="int8")
    unwrapped = plan.with_layer("pos_embed.proj", weight={"format": "int8", "granularity": "per_channel"})
    with pytest.raises(PlanError, match=r"pos_embed\.proj is quantized by the plan but was not wrapped"):
        apply_plan(qlayers, unwrapped)


def test_bits_per_weight_is_weighted_by_parameter_count():
    from ditq.methods.wrap import bits_per_weight
    from ditq.quant.modules import QuantLinear
    from ditq.quant.quantizer import build_quantizer
    from ditq.quant.spec import QuantizerConfig

    small = QuantLinear(torch.nn.Linear(16, 8), build_quantizer(QuantizerConfig("int8", "per_tensor"), "weight"))
    big = QuantLinear(torch.nn.Linear(256, 64), build_quantizer(QuantizerConfig("int4", "per_tensor"), "weight"))
    fp = QuantLinear(torch.nn.Linear(512, 512), None, None)  # no weight quantizer: not counted
    b_small, b_big = small.bits_per_weight(), big.bits_per_weight()
    expected = (b_small * 128 + b_big * 16384) / (128 + 16384)
    assert bits_per_weight({"s": small, "b": big, "f": fp}) == pytest.approx(expected)
    assert bits_per_weight({"s": small, "b": big}) < (b_small + b_big) / 2 - 1  # not the unweighted mean
    assert bits_per_weight({"f": fp}) == 32.0


def test_editing_a_plan_file_changes_the_run_identity(compose, tmp_path):
    from ditq.tracking.identity import run_key

    path = _write(tmp_path / "p.yaml", _default_plan())
    cfg = validate_config(compose(SHRINK + [f"method.plan={path}"]))
    before = run_key(cfg, {"model": "m"}, "cpu")
    assert run_key(cfg, {"model": "m"}, "cpu") == before
    data = _default_plan()
    data["roles"]["fc1"] = {"weight": {"format": "int8"}}
    _write(path, data)  # same path, other settings: not the finished run it was before
    assert run_key(cfg, {"model": "m"}, "cpu") != before
