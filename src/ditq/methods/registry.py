"""Step name -> (options dataclass, implementation). Torch-free until a step is built.

Adding an algorithm: write `ditq/methods/<name>.py` with a `Step` subclass taking its options
dataclass, add the options to `options.py`, and one line to `STEPS` below.
"""
from __future__ import annotations

import importlib
from dataclasses import fields

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ditq.methods import options as opt

# name -> (options class, "module:Class")
STEPS: dict[str, tuple[type, str]] = {
    "rtn": (opt.RTNOptions, "ditq.methods.rtn:RTN"),
    "gptq": (opt.GPTQOptions, "ditq.methods.gptq:GPTQ"),
    "adaround": (opt.AdaRoundOptions, "ditq.methods.adaround:AdaRound"),
    "smoothquant": (opt.SmoothQuantOptions, "ditq.methods.smoothquant:SmoothQuant"),
    "rotate": (opt.RotateOptions, "ditq.methods.rotate:Rotate"),
    "repq": (opt.RepQOptions, "ditq.methods.repq:RepQ"),
    "group_search": (opt.GroupSearchOptions, "ditq.methods.group_search:GroupSearch"),
    "group_allocation": (opt.GroupAllocationOptions, "ditq.methods.allocation:GroupAllocation"),
    "format_select": (opt.FormatSelectOptions, "ditq.methods.format_select:FormatSelect"),
    "talora": (opt.TALoRAOptions, "ditq.methods.talora:TALoRA"),
    "mixup_sign": (opt.MixupSignOptions, "ditq.methods.mixup_sign:MixupSign"),
}


def parse_step(spec: dict):
    """(name, options instance) of one step spec {name: ..., **options}; errors name the bad key."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; choose one of: {', '.join(sorted(STEPS))}")
    options_cls = STEPS[name][0]
    valid = {f.name for f in fields(options_cls)}
    unknown = set(spec) - valid
    if unknown:
        raise ValueError(
            f"step {name!r} has no option(s) {sorted(unknown)}; valid: {', '.join(sorted(valid)) or '(none)'}"
        )
    try:
        options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(options_cls), spec))
    except OmegaConfBaseException as err:
        raise ValueError(f"step {name!r}: {err}") from None
    if hasattr(options, "check"):
        try:
            options.check()
        except ValueError as err:
            raise ValueError(f"step {name!r}: {err}") from None
    return name, options


def check_steps(steps: list[dict]) -> None:
    for spec in steps:
        parse_step(spec)


def build_steps(steps: list[dict]) -> list:
    built = []
    for spec in steps:
        name, options = parse_step(spec)
        module, cls = STEPS[name][1].split(":")
        built.append(getattr(importlib.import_module(module), cls)(options))
    return built
