"""Per-layer quantization plans: every layer's weight and activation quantizer, set one by one.

A `QuantPlan` maps every layer of a model (in the adapter's order) to a `LayerPlan`: its role, its
weight shape and a full `ditq.quant.spec.QuantizerConfig` per side (`weight`, `act`; None keeps
that side in full precision). Without a plan file a run's plan is `QuantPlan.from_run`: the
method's settings, the format from `bits` (or `bits.overrides.<role>`) and what that format
dictates (`format_implied`), for the roles in `method.layers` -- exactly the behaviour without
plans. `method.plan=<file.yaml>` replaces it.

Plan file (YAML). Every section is optional; a layer's settings come from the levels below, each
overriding the one before it, side by side (`weight`, `act`):

    ditq_plan: 1
    model: {name: tiny_dit_digits, structure: <sha256>}   # the model it was made for (checked)
    created_by: "..."
    default: run                # "run": the run's method + bits settings (`from_run`), or
                                # {weight: {...} | null, act: {...} | null}
    roles:                      # per role (qkv, proj, fc1, fc2, adaln, embed, final, ...)
      fc1: {weight: {format: int8}}
    layers:                     # per layer name (what `adapter.layers()` calls it)
      transformer_blocks.0.attn1.to_q: {role: qkv, shape: [128, 128], weight: {...}, act: null}

A side is a mapping of QuantizerConfig fields (merged field by field onto the level below it), a
format name (shorthand for {format: <name>}), or null (full precision; also resets what lower
levels set). The format's implied settings (`format_implied`) are applied last, as for methods.
A model layer that no level mentions is *missing*, a side that no level mentions is missing too
(write `act: null` to keep a side in full precision); a `layers:` name the model does not have is
*unknown*; `role`/`shape`, when given, must match the model. All are errors that name the layers,
raised right after the model loads (`plan_for_run`), before any sampling. A group size larger
than a layer's width is an error as well (no silent fallback to one group per row).

The plan a run used is saved fully expanded (one entry per model layer, every field written) as
`<output_dir>/plan.yaml`; `method.plan=<that file>` reproduces the run. This module imports no torch.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from ditq.config.schema import LAYER_ROLES, ConfigError, method_format, quantizer_config

log = logging.getLogger(__name__)

PLAN_VERSION = 1
SIDES = ("weight", "act")
TOP_KEYS = ("ditq_plan", "model", "created_by", "default", "roles", "layers")
ENTRY_KEYS = ("role", "shape", "weight", "act")
_UNSET = object()  # "not mentioned" (differs from None = full precision)
_MAX_NAMED = 12  # layers named per problem before "... and N more"


class PlanError(ConfigError):
    """A plan that does not fit the model or cannot work; the message names the layers and the fix."""


class NoFormatError(PlanError):
    """A side's settings, merged over its levels, name no format."""


class MissingSideError(PlanError):
    """No level of a plan sets one side (weight / act) of a layer."""

    def __init__(self, label: str, side: str):
        self.label, self.side = label, side
        super().__init__(f"{label} has no {side} settings; give {side}: {{format: ...}} (in default, roles or "
                         f"layers) or {side}: null for full precision")


@dataclass(frozen=True)
class LayerPlan:
    role: str
    shape: tuple[int, ...] | None  # weight shape ([out, in] or [out, in, kh, kw]); None if unknown
    weight: Any = None  # QuantizerConfig | None (full precision)
    act: Any = None  # QuantizerConfig | None

    @property
    def quantized(self) -> bool:
        return self.weight is not None or self.act is not None


def weight_width(shape) -> int:
    """Input width of a weight [out, in, *kernel]: the elements one output row reduces over."""
    return int(math.prod(shape[1:])) if len(shape) > 1 else 1


def act_width(shape) -> int:
    """Channels of a layer's input (its last dim; conv inputs are quantized channels-last)."""
    return int(shape[1]) if len(shape) > 1 else 1


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMED])
    return shown + (f" ... and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else "")


def _nondefault(cfg) -> dict[str, Any]:
    """Fields of a QuantizerConfig that differ from the dataclass defaults (format always)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "format" or f.default is dataclasses.MISSING or v != f.default:
            out[f.name] = v
    return out


def _side_dict(cfg) -> dict[str, Any] | None:
    return None if cfg is None else dataclasses.asdict(cfg)


def _resolve_side(levels: list[Any], label: str, side: str):
    """QuantizerConfig | None | _UNSET from the side's levels (lowest first); `label` names the
    entry in errors ("layer <name>" or "roles.<role>")."""
    cur: Any = _UNSET
    for level in levels:
        if level is _UNSET:
            continue
        if level is None:
            cur = None
        else:
            cur = {**(cur if isinstance(cur, dict) else {}), **level}
    if cur is _UNSET or cur is None:
        return cur
    fmt = cur.get("format")
    if fmt is None:
        raise NoFormatError(f"{label}: {side} settings have no format; add format: <name> (e.g. int4) "
                        f"or write {side}: null to keep it in full precision")
    rest = {k: v for k, v in cur.items() if k != "format"}
    return quantizer_config(rest, fmt, side, f"plan {label} {side}")


def _structure(layers: Iterable[tuple[str, str, Any]]) -> str:
    """sha256 of (name, role, shape) of every layer: which model a plan fits."""
    items = [[n, r, list(s) if s is not None else None] for n, r, s in layers]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def model_layers(adapter) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (role, weight shape) of every layer of the adapter, in order."""
    out = {}
    for info in adapter.layers():
        out[info.name] = (info.role, tuple(int(d) for d in adapter.denoiser.get_submodule(info.name).weight.shape))
    return out


def layer_formats(run, role: str) -> tuple[str | None, str | None]:
    """(weight format, act format) of a layer role: `bits` with its per-role overrides."""
    ov = run.bits.overrides.get(role, {}) if run.bits.overrides else {}
    formats = run.method.get("formats")  # the method's per-role rules by bit width (FP4DiT), schema.method_format
    return (method_format(formats, role, "weight", ov.get("weight", run.bits.weight)),
            method_format(formats, role, "act", ov.get("act", run.bits.act)))


def run_layer_sides(run, role: str) -> tuple[Any, Any]:
    """(weight, act) QuantizerConfig | None of a layer role under the run's method + bits: the
    behaviour without a plan (torch-free)."""
    if role not in run.method.layers:
        return None, None
    wfmt, afmt = layer_formats(run, role)
    if wfmt is None and afmt is None:
        return None, None
    w = quantizer_config(run.method.weight, wfmt, "weight", "method.weight") if wfmt else None
    a = quantizer_config(run.method.act, afmt, "act", "method.act") if afmt else None
    return w, a


# ----------------------------------------------------------------------------- the file as written
@dataclass
class PlanSpec:
    """A plan file as written (sections partial), checked for structure; `expand` resolves it."""

    source: str
    model: dict[str, Any] = field(default_factory=dict)
    created_by: str | None = None
    default: Any = _UNSET  # "run" | {weight, act}
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> "PlanSpec":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist; give the path of a plan YAML "
                            "(e.g. conf/plans/example_tiny_dit_mixed.yaml or a run's plan.yaml)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise PlanError(f"plan file {path} is not valid YAML: {err}") from None
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: Any, source: str = "<plan>") -> "PlanSpec":
        where = f"plan {source}"
        if not isinstance(data, dict):
            raise PlanError(f"{where}: expected a mapping with keys {', '.join(TOP_KEYS)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(TOP_KEYS))
        if unknown:
            raise PlanError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(TOP_KEYS)}")
        version = data.get("ditq_plan", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"{where}: ditq_plan={version!r}; this ditq reads version {PLAN_VERSION}")
        model = data.get("model") or {}
        if isinstance(model, str):
            model = {"name": model}
        if not isinstance(model, dict) or set(model) - {"name", "structure"}:
            raise PlanError(f"{where} model: expected {{name: <model name>, structure: <sha256>}}, got {model!r}")
        spec = cls(source=source, model=dict(model), created_by=data.get("created_by"))
        default = data.get("default", _UNSET)
        if default == "run":
            spec.default = "run"
        elif default is not _UNSET:
            spec.default = cls._entry(default, f"{where} default", allowed=SIDES)
        for role, entry in (data.get("roles") or {}).items():
            if role not in LAYER_ROLES:
                raise PlanError(f"{where} roles: {role!r} is not a layer role; choose from {', '.join(LAYER_ROLES)}")
            spec.roles[role] = cls._entry(entry, f"{where} roles.{role}", allowed=SIDES)
        for name, entry in (data.get("layers") or {}).items():
            e = cls._entry(entry, f"{where} layers.{name}", allowed=ENTRY_KEYS)
            if "role" in e and e["role"] not in LAYER_ROLES:
                raise PlanError(f"{where} layers.{name}.role={e['role']!r}; choose from {', '.join(LAYER_ROLES)}")
            if e.get("shape") is None:
                e.pop("shape", None)
            elif isinstance(e["shape"], (list, tuple)) and all(isinstance(d, int) and d > 0 for d in e["shape"]):
                e["shape"] = tuple(e["shape"])
            else:
                raise PlanError(f"{where} layers.{name}.shape={e['shape']!r}: expected the weight shape, e.g. [512, 128]")
            spec.layers[str(name)] = e
        if spec.default is _UNSET and not spec.roles and not spec.layers:
            raise PlanError(f"{where}: no default, roles or layers; the plan sets nothing")
        return spec

    @staticmethod
    def _entry(entry: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        """{side: dict | None, role?, shape?}; null entry = both sides full precision."""
        if entry is None:
            return {"weight": None, "act": None}
        if not isinstance(entry, dict):
            raise PlanError(f"{key}: expected a mapping with {', '.join(allowed)}, got {entry!r}")
        unknown = sorted(set(entry) - set(allowed))
        if unknown:
            raise PlanError(f"{key}: unknown key(s) {unknown}; valid: {', '.join(allowed)}")
        out = dict(entry)
        valid = {f.name for f in _qfields()}
        for side in SIDES:
            v = out.get(side, _UNSET)
            if isinstance(v, str):
                out[side] = {"format": v}
            elif isinstance(v, dict):
                bad = sorted(set(v) - valid)
                if bad:
                    raise PlanError(f"{key}.{side}: unknown quantizer option(s) {bad}; valid: {', '.join(sorted(valid))}")
                out[side] = dict(v)
            elif v is not _UNSET and v is not None:
                raise PlanError(f"{key}.{side}: expected quantizer settings, a format name or null, got {v!r}")
        return out

    def levels(self, name: str, role: str | None, run=None) -> list[dict[str, Any]] | None:
        """The entries that set layer `name` (lowest first); None when none does (missing)."""
        out = []
        if self.default == "run":
            if run is None:
                raise PlanError(f"plan {self.source}: default: run needs the run config (method + bits)")
            w, a = run_layer_sides(run, role)
            out.append({"weight": _side_dict(w), "act": _side_dict(a)})
        elif self.default is not _UNSET:
            out.append(self.default)
        if role in self.roles:
            out.append(self.roles[role])
        if name in self.layers:
            out.append(self.layers[name])
        return out or None

    def resolve(self, name: str, role: str, shape, run=None, label: str | None = None) -> LayerPlan | None:
        levels = self.levels(name, role, run)
        if levels is None:
            return None
        label = label or f"layer {name}"
        sides = {}
        for side in SIDES:
            value = _resolve_side([lv.get(side, _UNSET) for lv in levels], label, side)
            if value is _UNSET:
                raise MissingSideError(label, side)
            sides[side] = value
        return LayerPlan(role=role, shape=shape, **sides)

    def check(self, run=None) -> None:
        """Torch-free check of everything that does not need the model: the default and each role
        entry (a side or a format that a higher level may still supply is not an error here), and
        each layer entry that names its role, resolved with the levels below it."""
        problems = []
        if isinstance(self.default, dict):
            for side in SIDES:
                try:
                    _resolve_side([self.default.get(side, _UNSET)], "default", side)
                except (NoFormatError, MissingSideError):
                    pass
                except ConfigError as err:
                    problems.append(str(err))
        for role in self.roles:
            try:
                self.resolve(f"<a {role} layer>", role, None, run, label=f"roles.{role}")
            except (NoFormatError, MissingSideError):
                pass
            except ConfigError as err:
                problems.append(str(err))
        for name, e in self.layers.items():
            if "role" not in e:
                continue
            try:
                self.resolve(name, e["role"], e.get("shape"), run)
            except ConfigError as err:
                problems.append(str(err))
        if problems:
            raise PlanError("\n  ".join(problems))

    def is_expanded(self) -> bool:
        return (self.default is _UNSET and not self.roles and all(
            "role" in e and all(isinstance(e.get(s, _UNSET), dict) and "format" in e[s] or e.get(s, _UNSET) is None
                                for s in SIDES) for e in self.layers.values()))


def _qfields():
    from ditq.quant.spec import QuantizerConfig

    return dataclasses.fields(QuantizerConfig)


# ----------------------------------------------------------------------------- the expanded plan
@dataclass
class QuantPlan:
    """Every layer's quantizers, fully expanded (see the module doc)."""

    layers: dict[str, LayerPlan]
    model: str | None = None  # model config name the plan was made for
    structure: str | None = None  # sha256 of (name, role, shape) of the model's layers
    created_by: str = ""

    # -- building
    @classmethod
    def from_run(cls, run, adapter) -> "QuantPlan":
        """Today's behaviour: method settings + bits formats (+ per-role overrides) + format_implied."""
        found = model_layers(adapter)
        layers = {}
        for name, (role, shape) in found.items():
            w, a = run_layer_sides(run, role)
            layers[name] = LayerPlan(role, shape, w, a)
        return cls(layers, model=run.model.name, structure=_structure((n, r, s) for n, (r, s) in found.items()),
                   created_by=f"method={run.method.name} bits={run.bits.name}")

    @classmethod
    def load(cls, path: str | Path, adapter=None, run=None) -> "QuantPlan":
        """Read a plan file. A fully expanded one (a run's plan.yaml) loads on its own; one with
        `default`/`roles` sections or partial entries is expanded against `adapter` (and `run` for
        `default: run`)."""
        spec = PlanSpec.read(path)
        if adapter is not None:
            return cls.expand(spec, adapter, run)
        if not spec.is_expanded():
            raise PlanError(f"plan {path} has default/roles sections or partial layer entries: "
                            "expand it against the model with QuantPlan.load(path, adapter=..., run=...)")
        layers = {n: spec.resolve(n, e["role"], e.get("shape"), run) for n, e in spec.layers.items()}
        return cls(layers, model=spec.model.get("name"), structure=spec.model.get("structure"),
                   created_by=spec.created_by or f"file {path}")

    @classmethod
    def expand(cls, spec: PlanSpec, adapter, run=None) -> "QuantPlan":
        """One LayerPlan per model layer from a plan file; every problem found is reported at once."""
        found = model_layers(adapter)
        problems, layers, missing = [], {}, []
        no_side: dict[str, list[str]] = {}
        unknown = [n for n in spec.layers if n not in found]
        if unknown:
            problems.append(_unknown_msg(unknown, found))
        for name, (role, shape) in found.items():
            e = spec.layers.get(name, {})
            if "role" in e and e["role"] != role:
                problems.append(f"layer {name}: the plan says role {e['role']}, the model has {role}")
                continue
            if "shape" in e and tuple(e["shape"]) != shape:
                problems.append(_shape_msg(name, e["shape"], shape, spec.model.get("name")))
                continue
            try:
                lp = spec.resolve(name, role, shape, run)
            except MissingSideError as err:
                no_side.setdefault(err.side, []).append(name)
                continue
            except ConfigError as err:
                problems.append(str(err))
                continue
            if lp is None:
                missing.append(name)
            else:
                layers[name] = lp
        if missing:
            problems.append(_missing_msg(missing))
        for side, names in no_side.items():
            problems.append(f"{len(names)} layer(s) have no {side} settings: {_names(names)}; give {side}: "
                            f"{{format: ...}} (in default, roles or layers) or {side}: null for full precision")
        model_name = run.model.name if run is not None else spec.model.get("name")
        if problems:
            made_for = f" (made for model {spec.model['name']})" if spec.model.get("name") else ""
            raise PlanError(f"plan {spec.source}{made_for} does not fit model {model_name or '?'}:\n  "
                            + "\n  ".join(_capped(problems)))
        structure = _structure((n, r, s) for n, (r, s) in found.items())
        if spec.model.get("structure") not in (None, structure):
            log.warning("plan %s was made for a model of another layer structure (%s); every layer it names "
                        "exists here with the same role and shape, so it is used", spec.source,
                        spec.model.get("name") or "unnamed")
        return cls(layers, model=model_name, structure=structure,
                   created_by=spec.created_by or f"file {spec.source}")

    # -- checking
    def validate(self, adapter, model_name: str | None = None) -> "QuantPlan":
        """Raise PlanError naming every unknown, missing or mis-shaped layer and every group size
        larger than a layer's width; warn when a plan made for another model name fits anyway."""
        found = model_layers(adapter)
        problems = []
        unknown = [n for n in self.layers if n not in found]
        if unknown:
            problems.append(_unknown_msg(unknown, found))
        missing = [n for n in found if n not in self.layers]
        if missing:
            problems.append(_missing_msg(missing))
        for name, lp in self.layers.items():
            if name not in found:
                continue
            role, shape = found[name]
            if lp.role != role:
                problems.append(f"layer {name}: the plan says role {lp.role}, the model has {role}")
            if lp.shape is not None and tuple(lp.shape) != shape:
                problems.append(_shape_msg(name, lp.shape, shape, self.model))
                continue
            problems.extend(group_problems(name, lp, shape))
        if problems:
            made_for = f", made for model {self.model}" if self.model else ""
            raise PlanError(f"quantization plan ({self.created_by}{made_for}) cannot be used on model "
                            f"{model_name or '?'}:\n  "
                            + "\n  ".join(_capped(problems)))
        if model_name and self.model and self.model != model_name:
            log.warning("quantization plan made for model %s is used on model %s: its %d layers match "
                        "by name, role and shape", self.model, model_name, len(self.layers))
        return self

    # -- changing (search steps)
    def with_layer(self, name: str, weight: Any = _UNSET, act: Any = _UNSET) -> "QuantPlan":
        """A new plan with layer `name` changed: a side given as a dict (or a format name, meaning
        {"format": name}) is merged field by field onto the current settings (e.g.
        weight={"group_size": 64}), a QuantizerConfig replaces them, None makes it full precision;
        format_implied, the config checks and the group-size check apply. The plan is not mutated."""
        if name not in self.layers:
            raise PlanError(f"plan has no layer {name!r}; layers: {_names(list(self.layers))}")
        lp = self.layers[name]
        sides = {}
        for side, new in (("weight", weight), ("act", act)):
            cur = getattr(lp, side)
            if new is _UNSET:
                sides[side] = cur
                continue
            if dataclasses.is_dataclass(new):
                new, cur = dataclasses.asdict(new), None
            elif isinstance(new, str):
                new = {"format": new}
            levels = [_side_dict(cur), new] if isinstance(new, dict) else [None]
            sides[side] = _resolve_side(levels, f"layer {name}", side)
        changed = dict(self.layers)
        changed[name] = LayerPlan(lp.role, lp.shape, **sides)
        if lp.shape is not None:
            problems = group_problems(name, changed[name], lp.shape)
            if problems:
                raise PlanError("; ".join(problems))
        return dataclasses.replace(self, layers=changed, created_by=self.created_by)

    def with_group_sizes(self, sizes: dict[str, int]) -> "QuantPlan":
        """A new plan where each layer in `sizes` uses that group size on BOTH quantized sides, as
        Q-DiT ties them: weight granularity per_group, activation per_token_group (the activation
        must be dynamic already). A full-precision side stays so; the group-size check applies."""
        layers = dict(self.layers)
        memo: dict[tuple, LayerPlan] = {}  # layers with equal settings and shape resolve once (searches call this a lot)
        for name, g in sizes.items():
            if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
                raise PlanError(f"with_group_sizes: layer {name}: group size must be a positive int, got {g!r}")
            lp = self.layers.get(name)
            if lp is None:
                raise PlanError(f"plan has no layer {name!r}; layers: {_names(list(self.layers))}")
            key = (lp.role, repr(lp.weight), repr(lp.act), lp.shape, g)
            if key not in memo:
                try:
                    memo[key] = self.with_layer(
                        name,
                        weight=_UNSET if lp.weight is None else {"granularity": "per_group", "group_size": g},
                        act=_UNSET if lp.act is None else {"granularity": "per_token_group", "group_size": g},
                    ).layers[name]
                except PlanError:
                    raise
                except ConfigError as err:  # e.g. a static activation: groups per token need dynamic ranges
                    raise PlanError(f"with_group_sizes: {err}") from None
            new = memo[key]
            layers[name] = LayerPlan(lp.role, lp.shape, copy_config(new.weight), copy_config(new.act))
        return dataclasses.replace(self, layers=layers, created_by=self.created_by)

    # -- reading
    def quantized(self) -> dict[str, LayerPlan]:
        return {n: lp for n, lp in self.layers.items() if lp.quantized}

    def element_bits(self, side: str) -> int | str:
        """The element bits of `side` over the quantized layers: one number, or "mixed"."""
        from ditq.quant.spec import parse_format

        bits = {parse_format(getattr(lp, side).format).bits for lp in self.layers.values()
                if getattr(lp, side) is not None}
        if not bits:
            return 32
        return bits.pop() if len(bits) == 1 else "mixed"

    def to_dict(self) -> dict[str, Any]:
        """The expanded plan as plain data (what `save` writes, every field of every side)."""
        return {
            "ditq_plan": PLAN_VERSION,
            "model": {"name": self.model, "structure": self.structure},
            "created_by": self.created_by,
            "layers": {n: {"role": lp.role, "shape": None if lp.shape is None else list(lp.shape),
                           "weight": _side_dict(lp.weight), "act": _side_dict(lp.act)}
                       for n, lp in self.layers.items()},
        }

    def digest(self) -> str:
        """sha256 of the layers' settings (what the quantizers are built from)."""
        data = {n: [lp.role, _side_dict(lp.weight), _side_dict(lp.act)] for n, lp in self.layers.items()}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def compact(self) -> dict[str, Any]:
        """A short record for the result row: layers grouped by identical settings (fields that
        differ from the QuantizerConfig defaults), plus the model and a digest."""
        groups: dict[str, dict[str, Any]] = {}
        for n, lp in self.layers.items():
            if not lp.quantized:
                continue
            w = None if lp.weight is None else _nondefault(lp.weight)
            a = None if lp.act is None else _nondefault(lp.act)
            key = json.dumps([w, a], sort_keys=True)
            g = groups.setdefault(key, {"weight": w, "act": a, "roles": [], "layers": []})
            if lp.role not in g["roles"]:
                g["roles"].append(lp.role)
            g["layers"].append(n)
        return {"model": self.model, "structure": self.structure, "created_by": self.created_by,
                "sha256": self.digest(), "quantized_layers": sum(len(g["layers"]) for g in groups.values()),
                "groups": list(groups.values())}

    def save(self, path: str | Path) -> Path:
        """Write the expanded plan as YAML, atomically; `method.plan=<path>` reproduces the run."""
        from ditq.utils.atomic import atomic_write_text

        path = Path(path)
        header = ("# ditq quantization plan, expanded: one entry per model layer, every quantizer field.\n"
                  f"# Reproduce the run that wrote it: ditq method.plan={path} (plus the run's other settings).\n"
                  "# null: that side stays in full precision. Fields: ditq.quant.spec.QuantizerConfig.\n")
        body = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=1 << 16)
        atomic_write_text(path, header + body)
        return path

    def __eq__(self, other) -> bool:
        return isinstance(other, QuantPlan) and self.layers == other.layers


def group_problems(name: str, lp: LayerPlan, shape) -> list[str]:
    """Group sizes larger than the layer's width (weight: input width; act: input channels), and the
    convolutions' rule: a weight group runs along the flattened (input channel, kernel tap) columns of
    [out, in * kh * kw], so its size must be a multiple of kh * kw (whole input channels with all their
    taps, the conv counterpart of a linear's input-channel groups; activation groups are over channels)."""
    out = []
    taps = int(math.prod(shape[2:])) if len(shape) > 2 else 1
    wcfg = lp.weight
    if (taps > 1 and wcfg is not None and wcfg.group_size is not None and wcfg.granularity == "per_group"
            and int(wcfg.group_size) % taps):
        g = int(wcfg.group_size)
        near = sorted({max(taps, g // taps * taps), (g // taps + 1) * taps})
        out.append(f"layer {name} ({lp.role}, conv weight {list(shape)}): weight group_size={g} splits input channels "
                   f"across groups (a conv weight's columns are input channel x {taps} kernel taps); use a multiple of "
                   f"{taps}, e.g. {' or '.join(map(str, near))} (= {near[0] // taps} or {near[-1] // taps} whole channels), "
                   "per layer in a plan file (layers.<name>.weight.group_size) or per_channel for this role")
    for side, width in (("weight", weight_width(shape)), ("act", act_width(shape))):
        cfg = getattr(lp, side)
        if cfg is None or cfg.group_size is None or cfg.granularity not in ("per_group", "per_token_group"):
            continue
        if int(cfg.group_size) > width:
            out.append(f"layer {name} ({lp.role}, weight {list(shape)}): {side} group_size={cfg.group_size} is "
                       f"larger than the layer's width {width}; set group_size <= {width} (method.{side}.group_size, "
                       f"or per layer in a plan file: layers.{name}.{side}.group_size) or use granularity "
                       f"{'per_channel' if side == 'weight' else 'per_token'} for one range per row")
    return out


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= _MAX_NAMED:
        return problems
    return problems[:_MAX_NAMED] + [f"... and {len(problems) - _MAX_NAMED} more problem(s) of the same kinds"]


def _unknown_msg(unknown: list[str], found) -> str:
    return (f"{len(unknown)} unknown layer(s) the model does not have: {_names(unknown)} "
            f"(the model's layers are e.g. {_names(list(found)[:3])}); remove them or use the plan of this model")


def _missing_msg(missing: list[str]) -> str:
    return (f"{len(missing)} model layer(s) have no settings in the plan: {_names(missing)}; add them under "
            "layers:, a roles: entry or a default: section (null keeps a layer in full precision)")


def _shape_msg(name: str, plan_shape, shape, made_for) -> str:
    src = f" (the plan was made for model {made_for})" if made_for else ""
    return (f"layer {name}: the plan has weight shape {list(plan_shape)}, the model {list(shape)}{src}; "
            "a plan from another model does not fit: make one for this model (run without method.plan, "
            "then edit its plan.yaml)")


def check_plan_file(path: str, run) -> None:
    """Torch-free check for validate_config: the file exists, parses, and every entry whose layer
    role is known resolves to valid quantizer settings. Errors name `method.plan`."""
    try:
        PlanSpec.read(path).check(run)
    except ConfigError as err:
        raise PlanError(f"method.plan={path}: {err}") from None


def plan_for_run(run, adapter) -> QuantPlan:
    """The plan a run uses, validated against the loaded model (call before any sampling):
    `method.plan` when set (its `default: run` = the run's method + bits), else `from_run`."""
    path = run.method.get("plan")
    if path:
        try:
            plan = QuantPlan.load(path, adapter=adapter, run=run)
        except PlanError as err:
            raise PlanError(f"method.plan={path}: {err}") from None
        if not plan.created_by.startswith("file"):
            plan.created_by = f"{plan.created_by}; loaded from {path}"
    else:
        plan = QuantPlan.from_run(run, adapter)
    return plan.validate(adapter, model_name=run.model.name)


def copy_config(cfg):
    """A private copy of a QuantizerConfig (quantizers never share a config object with a plan)."""
    return None if cfg is None else copy.deepcopy(cfg)
