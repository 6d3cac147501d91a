"""Replace the layers of a model with quantized ones, each quantizer built from its `QuantPlan` entry
(`ditq.methods.plan`), and rebuild them when a search changes the plan."""
from __future__ import annotations

import torch.nn as nn

from ditq.calibration.engine import full_precision  # noqa: F401  (re-exported: methods and the pipeline use it)

from ditq.methods.plan import PlanError, QuantPlan, copy_config, group_problems, layer_formats  # noqa: F401


def build_side(cfg, side: str):
    """A fresh quantizer for one side ("weight" / "act") of a plan entry; None for a full-precision side."""
    from ditq.quant.quantizer import build_quantizer

    return None if cfg is None else build_quantizer(copy_config(cfg), side)


def wrap_layers(adapter, run, plan: QuantPlan | None = None) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Swap every layer the plan quantizes for a QuantLinear/QuantConv2d with the plan's quantizers.

    `plan` defaults to `QuantPlan.from_run(run, adapter)` (method settings + bits formats, the roles in
    `method.layers`); it is validated against the model first. Returns ({name: quantized module},
    {name: role}). Layers whose sides are both null stay as they are.
    """
    from ditq.quant.modules import QuantConv2d, QuantLinear

    if plan is None:
        plan = QuantPlan.from_run(run, adapter)
    plan.validate(adapter, model_name=run.model.name if run is not None else None)
    qlayers, roles = {}, {}
    for name, lp in plan.quantized().items():
        module = adapter.denoiser.get_submodule(name)
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        qmod = cls(module, build_side(lp.weight, "weight"), build_side(lp.act, "act"), name=name)
        adapter.denoiser.set_submodule(name, qmod)
        qlayers[name] = qmod
        roles[name] = lp.role
    if run is not None and run.method.get("attn"):
        from ditq.quant.qkv import install_for_run  # method.attn: Q/K/V (and softmax) quantizers (FP4DiT); off: no-op

        install_for_run(adapter, run, qlayers)
    return qlayers, roles


def apply_plan(qlayers: dict[str, nn.Module], plan: QuantPlan, rebuild: bool = False) -> list[str]:
    """Rebuild the quantizers of already wrapped layers whose settings differ in `plan` (no model
    reload; for searches that change per-layer settings many times). Returns the changed layer
    names; their new quantizers are unfitted, so run the method's steps (e.g. RTN) again. A layer
    the plan quantizes must already be wrapped; a side set to null becomes full precision.
    `rebuild=True` gives EVERY layer fresh, unfitted quantizers (and drops algorithm-rounded weight
    values), e.g. before GPTQ quantizes a whole new plan."""
    problems = [f"layer {n} is quantized by the plan but was not wrapped (wrap_layers with a plan that "
                "quantizes it)" for n, lp in plan.quantized().items() if n not in qlayers]
    problems += [f"layer {n} is wrapped but the plan has no entry for it" for n in qlayers if n not in plan.layers]
    for name, q in qlayers.items():
        if name in plan.layers:
            problems += group_problems(name, plan.layers[name], tuple(q.weight.shape))
    if problems:
        raise PlanError("apply_plan: " + "; ".join(problems))
    changed = []
    for name, q in qlayers.items():
        lp = plan.layers[name]
        same = True
        for side, attr in (("weight", "weight_quantizer"), ("act", "act_quantizer")):
            current, wanted = getattr(q, attr), getattr(lp, side)
            if rebuild or (current.cfg if current is not None else None) != wanted:
                setattr(q, attr, build_side(wanted, side))
                if side == "weight":  # values an algorithm rounded for the old grid no longer apply
                    q.weight_source = None
                same = False
        if not same:
            q.refresh()
            changed.append(name)
    return changed


def bits_per_weight(qlayers: dict[str, nn.Module]) -> float:
    """Mean bits per weight over the layers with a weight quantizer, weighted by parameter count:
    sum(bits_i * numel_i) / sum(numel_i); 32.0 when no layer has one."""
    pairs = [(q.bits_per_weight(), q.weight.numel()) for q in qlayers.values() if q.weight_quantizer is not None]
    total = sum(n for _, n in pairs)
    return sum(b * n for b, n in pairs) / total if total else 32.0


