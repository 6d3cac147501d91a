"""MSFP's mixup-sign FP quantization as a step (`mixup_sign`, before the fitting steps rtn / gptq):
anomalous-activation layers (AALs) quantize their inputs with unsigned FP and a zero point, the other
layers with signed FP; every layer's ExMy split (and each AAL's zero point) is searched by calibration
MSE. Model-agnostic: it reads only the plan, the wrapped layers and their recorded FP inputs.

Detection (per layer, from `ctx.layer_inputs()`: rows [T, C], the exact channel min / max [C]):
  neg_ratio     |min(x, 0)| / max |x| over the layer's whole calibration input (exact ranges). After
                SiLU the input never goes below -0.278 (GELU: -0.170) while the positive side reaches
                several units, so neg_ratio is small; a symmetric input gives ~1. Default rule:
                AAL iff neg_ratio < threshold (0.3): a squeezed negative side is what wastes half of a
                signed grid (its negative half holds less than a third of the range), and the exact
                extremes make the statistic free of sampling noise.
  neg_mass      sum |x| over x < 0 / sum |x| on the recorded rows (SiLU of N(0, 4): 0.12, GELU: 0.05,
                symmetric: 0.5): rule `neg_mass` (AAL iff neg_mass < mass_threshold) also catches a
                layer whose negative side is small but for a few outliers; rule `both` needs both. Not
                the default: the mass depends on where the pre-activation sits, e.g. the embedded DiT's
                SiLU'd adaLN input has neg_mass 0.50 (most pre-activations negative) at neg_ratio 0.18.
  neg_fraction  share of negative values (logged only: after SiLU about half the values are negative,
                so it does not separate AALs).
  A constant input (max == min) has no sign structure: logged, signed FP (no division by zero).

Formats. n = the bit width of the layer's act format in the plan (bits=w4a4_fp4: 4). Signed candidates:
every fp{n}_e{E}m{n-1-E} split ditq builds (`splits: auto`, the plan's format first; or the listed E),
each with every ratio of `clip_ratios` (the act range rule's range times it, `QuantizerConfig.clip_ratio`,
as format_select scores them: static quantizers fitted on the rows with the exact data range). AALs also
try unsigned ufp{n}_e{E}m{n-E} (all n bits to exponent and mantissa) with a range [lo, hi] searched on the
exact data range, lo = z * min(x_min, 0) for z in `zero_point_ratios` (1: the data minimum at the grid's
dense low end; 0: the negative side clipped to 0, as after a ReLU) and hi = r * x_max for r in
`clip_ratios`; the quantizer turns [lo, hi] into its scale and zero point itself (`compute_params` on the
two ends, minmax: the zero point is the grid value nearest -lo / scale, so x = 0 stays exact). The
signed and the unsigned winners are both recorded; the unsigned one is kept only when its MSE is lower
(`force_unsigned: true` keeps it on every AAL: the paper's rule read literally; the default cannot make a
layer's calibration error worse than the signed-only ablation). Dynamic act configs get the unsigned
formats with the quantizer's own per-sample [min, max] (no zero-point search). A layer whose plan already
gives it a ufp act format is forced unsigned (its split still searched). `allow_unsigned: false` keeps
every layer signed with the same search (conf/method/fp_signed_search.yaml). q, k and v of one attention
read one tensor: one act choice for the three, from the first's record (as format_select). Weights keep
signed FP; with `search_weights` their split (x `weight_clip_ratios`) is searched by weight MSE or the
output error (format_select's `WeightError`).

Results: the choices go into `ctx.plan` (`with_layer`; plan.yaml records format and clip ratio) and the
changed quantizers are rebuilt (`apply_plan`, unfitted); a static unsigned act quantizer gets the
searched (scale, zero point) and is frozen by "mixup_sign" (rtn keeps it). Artifacts:
`<output_dir>/mixup_sign.csv` (per layer: statistics, AAL decision, chosen act format, zero point and
offset, its error, the best signed and unsigned errors, the weight choice) and
`ctx.diagnostics["mixup_sign"]` (counts by role, mean errors).

Refused, naming the layer or key: INT or block formats (`check_plan`, naming `bits`), NaN / Inf in a
layer's recorded inputs, forced unsigned on a layer with neg_ratio above `unsigned_max_neg_ratio`,
quantizers a fitting step already worked on.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ditq.methods.base import QuantContext, Step
from ditq.methods.format_select import (FITTING_STEPS, CandidateConfigs, WeightError, act_error, auto_formats,
                                        check_unfitted, group_shared_acts, spaced_rows)
from ditq.quant.runtime import kernel_threads

log = logging.getLogger(__name__)

CSV_NAME = "mixup_sign.csv"
FROZEN_BY = "mixup_sign"


# ----------------------------------------------------------------------------- detection
@dataclasses.dataclass
class SignStats:
    data_min: float
    data_max: float
    neg_ratio: float | None  # None: constant input
    neg_mass: float
    neg_fraction: float

    @property
    def constant(self) -> bool:
        return self.neg_ratio is None


def sign_stats(name: str, rec: dict[str, torch.Tensor]) -> SignStats:
    """The sign statistics of one layer's recorded input (module doc); NaN / Inf is an error."""
    for key in ("min", "max", "rows"):
        t = rec[key]
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"mixup_sign: the recorded calibration input of layer {name} holds {bad} NaN/Inf "
                             f"value(s) (in its {key!r}); the FP model produces non-finite activations there: "
                             "check the checkpoint and the inference dtype, then record the calibration "
                             "inputs again (delete the layer-inputs cache entry)")
    lo, hi = float(rec["min"].min()), float(rec["max"].max())
    rows = rec["rows"].float()
    total = float(rows.abs().sum())
    neg_mass = float(rows.clamp(max=0).abs().sum()) / total if total > 0 else 0.0
    neg_fraction = float((rows < 0).float().mean()) if rows.numel() else 0.0
    absmax = max(abs(lo), abs(hi))
    ratio = None if hi <= lo or absmax == 0 else max(-lo, 0.0) / absmax
    return SignStats(lo, hi, ratio, neg_mass, neg_fraction)


def is_anomalous(st: SignStats, rule: str, threshold: float, mass_threshold: float) -> bool:
    """The AAL decision of `rule` (a constant input is never an AAL)."""
    if st.constant:
        return False
    by_ratio = st.neg_ratio < threshold
    by_mass = st.neg_mass < mass_threshold
    return {"neg_ratio": by_ratio, "neg_mass": by_mass, "both": by_ratio and by_mass}[rule]


# ----------------------------------------------------------------------------- candidates (torch-free)
def _spec(fmt: str):
    from ditq.quant.spec import parse_format

    return parse_format(fmt)


def _pick(names: list[str], splits) -> list[str]:
    return names if splits == "auto" else [f for f in names if _spec(f).exponent_bits in set(splits)]


def signed_formats(fmt: str, splits) -> list[str]:
    """Signed FP candidates of an act side quantized with `fmt` (its own split first when signed)."""
    s = _spec(fmt)
    n = s.bits
    if s.family == "ufp":
        e = min(s.exponent_bits, n - 1)
        base = f"fp{n}_e{e}m{n - 1 - e}"
    else:
        base = s.name
    return _pick(auto_formats(base), splits)


def unsigned_formats(fmt: str, splits) -> list[str]:
    """Unsigned FP candidates (all n bits to exponent and mantissa) of an act side quantized with `fmt`:
    first the split with the same exponent width (the sign bit becomes a mantissa bit)."""
    s = _spec(fmt)
    n = s.bits
    base = s.name if s.family == "ufp" else f"ufp{n}_e{s.exponent_bits}m{n - s.exponent_bits}"
    return _pick(auto_formats(base), splits)


def weight_formats(fmt: str, splits) -> list[str]:
    return _pick(auto_formats(fmt), splits)


def _is_element_fp(fmt: str) -> bool:
    s = _spec(fmt)
    return s.family in ("fp", "ocp", "ufp") and not s.is_block


# ----------------------------------------------------------------------------- unsigned ranges
def unsigned_range(rec: dict[str, torch.Tensor], granularity: str, zp_ratio: float, clip: float):
    """[lo, hi] of an unsigned candidate from the exact data range: lo = zp_ratio * min(x_min, 0),
    hi = clip * max(x_max, 0); per tensor (scalars) or per channel ([C])."""
    mn, mx = rec["min"].float(), rec["max"].float()
    if granularity == "per_tensor":
        mn, mx = mn.min(), mx.max()
    return mn.clamp(max=0.0) * zp_ratio, mx.clamp(min=0.0) * clip


def range_params(param_q, lo: torch.Tensor, hi: torch.Tensor):
    """The quantizer's (scale, zero point) for the range [lo, hi]: compute_params on a tensor holding
    just the two ends (param_q: the candidate's config with minmax and no clipping)."""
    ends = torch.stack([lo, hi]).reshape(2, -1)
    return param_q.compute_params(ends)


# ----------------------------------------------------------------------------- the step
@dataclasses.dataclass
class ActChoice:
    names: list[str]
    role: str
    stats: SignStats
    aal: bool
    note: str  # "constant", "forced (plan)", "forced (force_unsigned)", "" ...
    format: str
    clip_ratio: float
    zp_ratio: float | None  # None: signed, or dynamic ranges
    zero_point: float | None  # grid units (mean over channels when per channel)
    offset: float | None  # the real value at the grid's 0 (mean over channels)
    error: float
    signed_format: str
    signed_clip: float
    signed_error: float
    unsigned_format: str | None = None
    unsigned_error: float | None = None
    params: object = None  # QParams to freeze (static unsigned)

    @property
    def unsigned(self) -> bool:
        return _spec(self.format).family == "ufp"


@dataclasses.dataclass
class WeightChoice:
    format: str
    clip_ratio: float
    error: float
    own_format: str
    own_error: float


class MixupSign(Step):
    name = "mixup_sign"

    def needs_layer_inputs(self, ctx: QuantContext) -> bool:
        return True

    # -- checks before any work
    def check_plan(self, run, adapter, plan) -> None:
        """Step order, INT / block formats (named by their `bits` key), unsigned act formats with
        allow_unsigned=false, splits with no candidate, weight_error=output on conv layers."""
        if run is not None:
            names = [spec.get("name") for spec in run.method.steps]
            if self.name in names:
                early = [n for n in names[: names.index(self.name)] if n in FITTING_STEPS + ("format_select",)]
                if early:
                    raise ValueError(f"method.steps={names}: mixup_sign must come before {', '.join(early)} (it "
                                     "rebuilds quantizers unfitted and refuses fitted ones); move it earlier")
        if plan is None:
            return
        o = self.options
        configs = CandidateConfigs()
        has_act, conv, checked = False, [], set()
        for name, lp in plan.quantized().items():
            for side in ("weight", "act"):
                cfg = getattr(lp, side)
                if cfg is None or (side == "weight" and not o.search_weights):
                    continue
                has_act |= side == "act"
                if not _is_element_fp(cfg.format):
                    why = "INT" if _spec(cfg.format).family == "int" else "a block format"
                    what = ("mixup-sign chooses signed / unsigned FP element formats" if side == "act" else
                            "search_weights searches the weights' FP splits (search_weights: false leaves them)")
                    raise ValueError(f"mixup_sign: {_bits_key(run, lp.role, side)} gives layer {name} ({lp.role}) "
                                     f"the {side} format {cfg.format}, {why}; {what}: use FP formats, e.g. "
                                     "bits=w4a4_fp4 or bits=w6a6_fp6")
                if side == "act" and not o.allow_unsigned and _spec(cfg.format).family == "ufp":
                    raise ValueError(f"mixup_sign: allow_unsigned=false but {_bits_key(run, lp.role, side)} gives "
                                     f"layer {name} ({lp.role}) the unsigned act format {cfg.format}; use a signed "
                                     "FP act format there or allow_unsigned=true")
                key = (side, repr(cfg))
                if key in checked:
                    continue
                checked.add(key)
                if side == "act":
                    lists = {"signed": signed_formats(cfg.format, o.splits)}
                    if o.allow_unsigned:
                        lists["unsigned"] = unsigned_formats(cfg.format, o.splits)
                    ratios = o.clip_ratios
                else:
                    lists, ratios = {"signed": weight_formats(cfg.format, o.splits)}, o.weight_clip_ratios
                for kind, cands in lists.items():
                    if not cands:
                        raise ValueError(f"mixup_sign: splits={o.splits!r} leaves no {kind} "
                                         f"{_spec(cfg.format).bits}-bit FP format for the {side} side of layer "
                                         f"{name} ({lp.role}); list exponent widths that format has, or splits=auto")
                    for fmt in cands:
                        for r in ratios:
                            try:
                                configs.get(cfg, fmt, r, side)
                            except ValueError as err:
                                raise ValueError(f"mixup_sign: layer {name} ({lp.role}) {side}: candidate {fmt} at "
                                                 f"clip {r:g} cannot work: {err}") from None
            if (o.search_weights and o.weight_error == "output" and lp.weight is not None and lp.shape is not None
                    and len(lp.shape) > 2):
                conv.append(f"{name} ({lp.role})")
        if not has_act:
            raise ValueError("mixup_sign: no layer quantizes its input activations (bits.act is null?); "
                             "mixup-sign chooses activation formats: use bits with FP activations, e.g. w4a4_fp4")
        if conv:
            raise ValueError(f"mixup_sign: weight_error=output needs inputs laid out like the weight's input width, "
                             f"but conv layers record pixels, not patches: {', '.join(conv[:5])}; use weight_error=mse")

    def _act_jobs(self, ctx: QuantContext) -> list[list[str]]:
        """Layer groups sharing one act choice: q/k/v of one attention with equal settings, else one layer."""
        layers = ((name, ctx.plan.layers[name]) for name in ctx.qlayers)
        items = [(name, lp.role, lp.act, None) for name, lp in layers if lp.act is not None]
        return [names for names, _ in group_shared_acts(items)]

    def _check_unfitted(self, ctx: QuantContext) -> None:
        sides = ["weight", "act"] if self.options.search_weights else ["act"]
        check_unfitted(ctx.qlayers, [(n, side) for n in ctx.qlayers for side in sides], self.name)

    @torch.no_grad()
    def apply(self, ctx: QuantContext) -> None:
        from ditq.methods.wrap import apply_plan

        if ctx.plan is None:
            raise ValueError("mixup_sign needs the run's plan (QuantContext.plan) to record its choices")
        t0 = time.perf_counter()
        o = self.options
        self._check_unfitted(ctx)
        inputs = ctx.layer_inputs()
        jobs = self._act_jobs(ctx)

        # 1. statistics and decisions for every layer (cheap): bad input fails before any search
        decided, problems = [], []
        for names in jobs:
            first = names[0]
            if first not in inputs:
                raise KeyError(f"mixup_sign: no calibration inputs recorded for layer {first}")
            st = sign_stats(first, inputs[first])
            role = ctx.plan.layers[first].role
            fmt = ctx.plan.layers[first].act.format
            aal = is_anomalous(st, o.rule, o.threshold, o.mass_threshold)
            note, forced = "", False
            if st.constant:
                note = "constant input: signed (fallback)"
                log.warning("mixup_sign: layer %s (%s): its calibration input is constant (%g): no sign statistic, "
                            "kept signed FP", first, role, st.data_min)
            elif _spec(fmt).family == "ufp":
                note, forced = "forced unsigned (plan / bits)", True
            elif o.force_unsigned and aal:
                note, forced = "forced unsigned (force_unsigned)", True
            if forced and st.neg_ratio > o.unsigned_max_neg_ratio:
                fix = ("give it a signed FP act format (bits / method.plan)" if note.endswith("(plan / bits)") else
                       "set force_unsigned=false (keep unsigned only where it is better), or lower threshold")
                problems.append(f"layer {first} ({role}): neg_ratio={st.neg_ratio:.3f} > unsigned_max_neg_ratio="
                                f"{o.unsigned_max_neg_ratio:g} (min {st.data_min:.4g}, max {st.data_max:.4g}); {fix}, "
                                "or raise unsigned_max_neg_ratio")
            decided.append((names, st, aal, note, forced))
        if problems:
            raise ValueError(f"mixup_sign: unsigned FP forced on {len(problems)} layer(s) with large negative inputs, "
                             f"which an unsigned grid with a zero point represents poorly: {'; '.join(problems[:5])}"
                             f"{' ...' if len(problems) > 5 else ''}")

        # 2. the searches
        configs = CandidateConfigs()
        acts: list[ActChoice] = []
        bar = tqdm(decided, desc="mixup_sign", unit="layer", disable=not ctx.progress)
        for names, st, aal, note, forced in bar:
            acts.append(self._act_choice(ctx, names, inputs[names[0]], st, aal, note, forced, configs))
        weights: dict[str, WeightChoice] = {}
        if o.search_weights:
            for name, layer in ctx.qlayers.items():
                if ctx.plan.layers[name].weight is not None:
                    weights[name] = self._weight_choice(ctx, name, inputs, configs)

        # 3. record in the plan, rebuild, pin the unsigned grids
        plan = ctx.plan
        for c in acts:
            for n in c.names:
                cur = plan.layers[n].act
                if (_spec(cur.format).name, float(cur.clip_ratio)) != (c.format, c.clip_ratio):
                    plan = plan.with_layer(n, act={"format": c.format, "clip_ratio": c.clip_ratio})
        for n, w in weights.items():
            cur = plan.layers[n].weight
            if (_spec(cur.format).name, float(cur.clip_ratio)) != (w.format, w.clip_ratio):
                plan = plan.with_layer(n, weight={"format": w.format, "clip_ratio": w.clip_ratio})
        ctx.plan = plan
        changed = apply_plan(ctx.qlayers, plan)
        for n in changed:
            q = ctx.qlayers[n]
            for attr in ("weight_quantizer", "act_quantizer"):
                qz = getattr(q, attr)
                if qz is not None and not qz.name:
                    qz.name = f"{n}.{attr}"
        for c in acts:
            if c.params is not None:
                for n in c.names:
                    ctx.qlayers[n].act_quantizer.set_params(c.params, freeze=True, frozen_by=FROZEN_BY)
        seconds = time.perf_counter() - t0
        path = self._write_csv(ctx, acts, weights)
        ctx.diagnostics["mixup_sign"] = {**summarize(acts, weights, ctx.plan), "rule": o.rule,
                                         "seconds": round(seconds, 3), "changed_layers": len(changed),
                                         "csv": None if path is None else str(path)}
        info = ctx.diagnostics["mixup_sign"]
        log.info("mixup_sign: %d of %d act layer(s) anomalous, %d unsigned; act MSE %s (signed only: %s); "
                 "%d layer(s) changed, %.1f s", info["aal_layers"], info["act_layers"], info["unsigned_layers"],
                 _g(info["act_mse_mean"]), _g(info["act_mse_signed_mean"]), len(changed), seconds)

    def _act_choice(self, ctx, names, rec, st: SignStats, aal: bool, note: str, forced: bool, configs) -> ActChoice:
        from ditq.methods.wrap import build_side
        from ditq.quant.quantizer import build_quantizer

        o = self.options
        first = names[0]
        cfg = ctx.plan.layers[first].act
        rows = spaced_rows(rec["rows"], o.max_rows)
        ratios = [float(r) for r in o.clip_ratios]
        signed: dict[tuple[str, float], float] = {}
        for fmt in signed_formats(cfg.format, o.splits):
            for r in ratios:
                signed[fmt, r] = act_error(build_side(configs.get(cfg, fmt, r, "act"), "act"), rec, rows)
        (s_fmt, s_r), s_err = min(signed.items(), key=lambda kv: kv[1])  # the first of equal minima
        choice = ActChoice(list(names), ctx.plan.layers[first].role, st, aal, note, s_fmt, s_r, None, None, None,
                           s_err, s_fmt, s_r, s_err)
        if not (o.allow_unsigned and (aal or forced)) or st.constant:
            return choice
        best = None  # (error, fmt, clip, zp_ratio, params)
        for fmt in unsigned_formats(cfg.format, o.splits):
            if cfg.dynamic:
                for r in ratios:
                    err = act_error(build_side(configs.get(cfg, fmt, r, "act"), "act"), rec, rows)
                    if best is None or err < best[0]:
                        best = (err, fmt, r, None, None)
                continue
            q = build_side(configs.get(cfg, fmt, 1.0, "act"), "act")
            param_q = build_quantizer(dataclasses.replace(q.cfg, range="minmax", clip_ratio=1.0), "act")
            with kernel_threads(rows):
                for r in ratios:
                    for z in o.zero_point_ratios:
                        params = range_params(param_q, *unsigned_range(rec, cfg.granularity, float(z), r))
                        err = float((q.quantize_with(rows, params) - rows).pow(2).mean())
                        if best is None or err < best[0]:
                            best = (err, fmt, r, float(z), params)
        u_err, u_fmt, u_r, u_z, params = best
        choice.unsigned_format, choice.unsigned_error = u_fmt, u_err
        if forced or u_err < s_err:  # ties keep the signed grid
            choice.format, choice.clip_ratio, choice.zp_ratio = u_fmt, u_r, u_z
            choice.error, choice.params = u_err, params
            if params is not None:
                zp, scale = params.zero_point.float(), params.scale.float()
                choice.zero_point = float(zp.mean())
                choice.offset = float((-zp * scale).mean())
        return choice

    def _weight_choice(self, ctx, name: str, inputs, configs) -> WeightChoice:
        from ditq.methods.wrap import build_side

        o = self.options
        cfg = ctx.plan.layers[name].weight
        rows = None
        if o.weight_error == "output":
            if name not in inputs:
                raise KeyError(f"mixup_sign: no calibration inputs recorded for layer {name}")
            rows = spaced_rows(inputs[name]["rows"], o.max_rows)
        score = WeightError(ctx.qlayers[name].weight_to_quantize(), o.weight_error, rows)
        errors = {}
        for fmt in weight_formats(cfg.format, o.splits):
            for r in o.weight_clip_ratios:
                errors[fmt, float(r)] = score(build_side(configs.get(cfg, fmt, float(r), "weight"), "weight"))
        (fmt, r), err = min(errors.items(), key=lambda kv: kv[1])
        own = _spec(cfg.format).name
        own_err = errors.get((own, 1.0))
        if own_err is None:
            own_err = score(build_side(configs.get(cfg, own, 1.0, "weight"), "weight"))
        return WeightChoice(fmt, r, err, own, own_err)

    def _write_csv(self, ctx: QuantContext, acts: list[ActChoice], weights: dict[str, WeightChoice]) -> Path | None:
        if not ctx.output_dir:
            return None
        from ditq.utils.atomic import atomic_write_text

        def num(v, fmt=".6e"):
            return "" if v is None else format(v, fmt)

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["layer", "role", "neg_ratio", "neg_mass", "neg_fraction", "data_min", "data_max", "aal", "note",
                    "act_format", "act_clip_ratio", "zero_point_ratio", "zero_point", "offset", "act_error",
                    "signed_format", "signed_clip_ratio", "signed_error", "unsigned_format", "unsigned_error",
                    "error_vs_signed", "weight_format", "weight_clip_ratio", "weight_error", "weight_own_format",
                    "weight_own_error"])
        by_layer = {n: c for c in acts for n in c.names}
        for n in ctx.qlayers:
            c, wc = by_layer.get(n), weights.get(n)
            row = [n, ctx.plan.layers[n].role]
            if c is None:
                row += [""] * 19
            else:
                st = c.stats
                row += [num(st.neg_ratio, ".4f"), f"{st.neg_mass:.4f}", f"{st.neg_fraction:.4f}", f"{st.data_min:.6g}",
                        f"{st.data_max:.6g}", "yes" if c.aal else "no", c.note, c.format, f"{c.clip_ratio:g}",
                        num(c.zp_ratio, "g"), num(c.zero_point, ".6g"), num(c.offset, ".6g"), num(c.error),
                        c.signed_format, f"{c.signed_clip:g}", num(c.signed_error), c.unsigned_format or "",
                        num(c.unsigned_error), num(c.error / c.signed_error if c.signed_error > 0 else None, ".4f")]
            if wc is None:
                row += [""] * 5
            else:
                row += [wc.format, f"{wc.clip_ratio:g}", num(wc.error), wc.own_format, num(wc.own_error)]
            w.writerow(row)
        path = Path(ctx.output_dir) / CSV_NAME
        atomic_write_text(path, buf.getvalue())
        return path


def _bits_key(run, role: str, side: str) -> str:
    """The config key that gave a role's side its format (for error messages)."""
    if run is None:
        return "the plan"
    if run.method.plan:
        return f"method.plan ({run.method.plan})"
    ov = run.bits.overrides.get(role) if run.bits.overrides else None
    if ov is not None and side in ov:
        return f"bits.overrides.{role}.{side} (bits={run.bits.name})"
    if run.method.formats:
        return f"bits.{side} / method.formats (bits={run.bits.name})"
    return f"bits.{side} (bits={run.bits.name})"


def _g(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarize(acts: list[ActChoice], weights: dict[str, WeightChoice], plan) -> dict:
    """Counts by role and mean errors (per layer: q/k/v's shared act choice counts once per layer)."""
    roles: dict[str, dict] = defaultdict(lambda: {"layers": 0, "aal": 0, "unsigned": 0, "act_formats": Counter(),
                                                  "weight_formats": Counter()})
    per_layer = [(n, c) for c in acts for n in c.names]
    for n, c in per_layer:
        r = roles[c.role]
        r["layers"] += 1
        r["aal"] += int(c.aal)
        r["unsigned"] += int(c.unsigned)
        r["act_formats"][c.format] += 1
    for n, wc in weights.items():
        roles[plan.layers[n].role]["weight_formats"][wc.format] += 1
    aal = [c for _, c in per_layer if c.aal]
    return {
        "roles": {k: {**v, "act_formats": dict(v["act_formats"]), "weight_formats": dict(v["weight_formats"])}
                  for k, v in roles.items()},
        "act_layers": len(per_layer),
        "aal_layers": len(aal),
        "unsigned_layers": sum(int(c.unsigned) for _, c in per_layer),
        "constant_layers": sorted(n for n, c in per_layer if c.stats.constant),
        "act_mse_mean": _mean(c.error for _, c in per_layer),
        "act_mse_signed_mean": _mean(c.signed_error for _, c in per_layer),
        "aal_mse_signed_mean": _mean(c.signed_error for c in aal),
        "aal_mse_unsigned_mean": _mean(c.unsigned_error for c in aal),
        "aal_mse_ratio_mean": _mean(c.unsigned_error / c.signed_error for c in aal
                                    if c.unsigned_error is not None and c.signed_error > 0),
        "weight_mse_own_mean": _mean(w.own_error for w in weights.values()),
        "weight_mse_mean": _mean(w.error for w in weights.values()),
    }
