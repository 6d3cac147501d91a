"""HQ-DiT's format selection as a step: per layer and side (weight, input activation), the FP ExMy
split and the clipping ratio with the least quantization error on calibration data.

Candidates of one side: every format in `formats` times every ratio in `clip_ratios`
(`QuantizerConfig.clip_ratio`: the range rule's range times the ratio). "auto" is the side's own
format first, then every other ExMy split of its bit width that ditq builds (fp4 -> fp4_e2m1,
fp4_e1m2, fp4_e3m0; an unsigned-FP side gets the ufp splits); an INT side keeps its format, so only
its clipping is selected. An explicit list, of one bit width, is tried as given on every side it is
used on (so an INT side may become FP); a width that differs from a side's is an error in
`check_plan`. A side with a block format (mx*, nvfp4) fixes its own scales and is left alone.
Each candidate's quantizer is the side's current `QuantizerConfig` with the format (and what the
format dictates, `format_implied`) and `clip_ratio` replaced, and is scored by

  weight  mse: mean (Q(W) - W)^2 over the weight `layer.weight_to_quantize()`, or output:
          tr(dW H dW^T) / out with H = X^T X / N from the layer's recorded calibration rows
          (= the mean squared layer-output error caused by the weight's rounding);
  act     mean (Q(X) - X)^2 over the layer's recorded calibration rows X (at most `max_rows`, evenly
          spaced), static quantizers fitted with fit(rows, data_range=(min, max)). Dynamic
          per_tensor ranges are one per sample at inference; the rows do not say which sample they
          came from, so they are scored as one sample (a slightly wider range than any sample's).

The argmin over (format, ratio) wins; ties go to the first candidate in list order (the side's own
format and ratio clip_ratios[0]). q, k and v of one attention read one tensor, so their activation
side gets one choice, computed once. The choices go into `ctx.plan` (`with_layer`, so the run's
plan.yaml records them) and the changed quantizers are rebuilt (`apply_plan`; activation ranges
unfitted, weight grids refitted at refresh): the step must come before the steps that fit quantizers
(rtn, gptq, repq; checked in `check_plan`), and a quantizer such a step worked on (frozen, a weight
source, fitted activation ranges) is refused. Artifacts: `<output_dir>/format_select.csv` (one row
per layer and side: choice, its error, the error of the side's own format at ratio 1.0) and
`ctx.diagnostics["format_select"]`.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ditq.methods.base import QuantContext, Step
from ditq.quant.runtime import kernel_threads

log = logging.getLogger(__name__)

FITTING_STEPS = ("rtn", "gptq", "repq")  # steps that fit (and may freeze) quantizers
CSV_NAME = "format_select.csv"


def group_shared_acts(items) -> list[tuple[list[str], object]]:
    """Jobs of a step that chooses formats per layer: `items` are (layer name, role, activation config or
    None, payload) in layer order. The q/k/v projections of one attention with equal activation settings
    (the config given) share their input, so they join one job: the first one's, with its payload. Every
    other item is a job of its own. Returns [(layer names, payload)] in order of first appearance."""
    jobs, shared = [], {}
    for name, role, act, payload in items:
        key = (name.rsplit(".", 1)[0], repr(act)) if role == "qkv" and act is not None else None
        if key in shared:
            shared[key][0].append(name)
            continue
        job = ([name], payload)
        jobs.append(job)
        if key is not None:
            shared[key] = job
    return jobs


def check_unfitted(qlayers, sides, step: str) -> None:
    """Refuse, for a step that replaces quantizers (format_select, mixup_sign), the (layer, side) pairs in
    `sides` a fitting step has worked on: frozen quantizers, weights with algorithm-rounded values (a
    weight source), fitted activation ranges. A weight grid without a weight source is what `refresh()`
    fits at first use (e.g. after `apply_plan`) and is refitted the same way."""
    bad = []
    for n, side in sides:
        layer = qlayers[n]
        qz = layer.weight_quantizer if side == "weight" else layer.act_quantizer
        if qz is None:
            continue
        if qz.frozen:
            bad.append(f"{n} {side} (frozen by {qz.frozen_by})")
        elif side == "weight" and layer.weight_source is not None:
            bad.append(f"{n} weight (rounded values from an algorithm)")
        elif side == "act" and qz.is_fitted:
            bad.append(f"{n} act (ranges fitted)")
    if bad:
        raise ValueError(f"{step}: {len(bad)} quantizer(s) it would replace were already fitted: "
                         f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; {step} must come "
                         f"before {'/'.join(FITTING_STEPS)} in method.steps")


# ----------------------------------------------------------------------------- candidates (torch-free)
def _spec(fmt: str):
    from ditq.quant.spec import parse_format

    return parse_format(fmt)


def _builds(name: str) -> bool:
    """parse_format accepts `name` and get_format builds its grid (exact float32 emulation)."""
    from ditq.quant.formats import get_format
    from ditq.quant.spec import FormatError

    try:
        get_format(name)
    except (FormatError, AssertionError):
        return False
    return True


def auto_formats(fmt: str) -> list[str]:
    """The "auto" candidates of a side quantized with `fmt`: `fmt` first, then every other ExMy split of
    its bit width (signed FP / OCP -> fp{n}_e{E}m{M}; unsigned FP -> ufp{n}_e{E}m{M}) that ditq
    builds; an INT format only itself; a block format nothing (it fixes its own scales)."""
    spec = _spec(fmt)
    if spec.is_block:
        return []
    if spec.family not in ("fp", "ocp", "ufp"):
        return [spec.name]
    n = spec.bits
    if spec.family == "ufp":
        names = [f"ufp{n}_e{e}m{n - e}" for e in range(1, n + 1)]
    else:
        names = [f"fp{n}_e{e}m{n - 1 - e}" for e in range(1, n)]
    out = [spec.name]
    own = (spec.exponent_bits, spec.mantissa_bits)
    for name in names:
        try:
            s = _spec(name)
        except ValueError:
            continue  # e.g. more exponent bits than float32 emulates exactly
        if s.name == spec.name or not _builds(name):
            continue
        if spec.family == "ocp" and (s.exponent_bits, s.mantissa_bits) == own and _same_grid(name, spec.name):
            continue  # ocp_e2m1 and fp4_e2m1 are one grid
        out.append(s.name)
    return out


def _same_grid(a: str, b: str) -> bool:
    from ditq.quant.formats import get_format

    return get_format(a).max_value == get_format(b).max_value


def side_candidates(fmt: str, formats: list[str]) -> list[str]:
    """Formats tried on a side quantized with `fmt` (empty: the side is left alone)."""
    if _spec(fmt).is_block:
        return []
    if list(formats) == ["auto"]:
        return auto_formats(fmt)
    return [_spec(f).name for f in formats]


def width_problem(formats: list[str], fmt: str, side: str, where: str) -> str | None:
    """The message for an explicit formats list whose width differs from the side's (None if fine)."""
    if list(formats) == ["auto"] or _spec(fmt).is_block:
        return None
    bits = _spec(fmt).bits
    for f in formats:
        b = _spec(f).bits
        if b != bits:
            return (f"format_select: {f} has {b} bits but the {side} format of {where} has {bits} ({fmt}); "
                    f"list formats of {bits} bits (or formats: [auto], or leave {side} out of sides)")
    return None


class _Configs:
    """Candidate QuantizerConfigs, memoised: the side's settings with format and clip_ratio replaced
    and the format's implied settings applied, validated (as `QuantPlan.with_layer` resolves them)."""

    def __init__(self):
        self._memo: dict[tuple, object] = {}

    def get(self, cfg, fmt: str, ratio: float, side: str):
        from ditq.config.schema import quantizer_config

        key = (side, repr(cfg), fmt, float(ratio))
        if key not in self._memo:
            rest = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "format"}
            rest["clip_ratio"] = float(ratio)
            self._memo[key] = quantizer_config(rest, fmt, side, f"format_select candidate {fmt} clip {ratio:g}")
        return self._memo[key]


CandidateConfigs = _Configs  # the public name other candidate searches use (ditq.methods.mixup_sign)


# ----------------------------------------------------------------------------- errors
def spaced_rows(rows: torch.Tensor, max_rows: int | None) -> torch.Tensor:
    """At most `max_rows` evenly spaced rows of `rows` (all when None or fewer), float32."""
    rows = rows.float()
    if max_rows is None or rows.shape[0] <= max_rows:
        return rows
    idx = torch.linspace(0, rows.shape[0] - 1, int(max_rows)).round().long()
    return rows[idx]


class WeightError:
    """Error of a weight quantizer on one layer's weight: mse, or the output error on rows X."""

    def __init__(self, weight: torch.Tensor, kind: str, rows: torch.Tensor | None = None):
        self.w = weight.detach().float()
        self.kind = kind
        self.h = self.x = None
        if kind == "output":
            w2 = self.w.reshape(self.w.shape[0], -1)
            if rows is None or rows.shape[1] != w2.shape[1]:
                raise ValueError(f"weight_error=output needs calibration rows of width {w2.shape[1]}, got "
                                 f"{None if rows is None else tuple(rows.shape)}")
            rows = rows.to(device=self.w.device, dtype=torch.float32)  # records live on the CPU
            n, width = rows.shape
            if n > width:  # tr(dW H dW^T) with H = X^T X / N is cheaper than || X dW^T ||^2 / N
                self.h = (rows.t() @ rows) / n
            else:
                self.x = rows

    def __call__(self, q) -> float:
        with kernel_threads(self.w):  # many small elementwise ops: no OpenMP barriers on a busy CPU
            q.fit(self.w)
            dw = (q(self.w) - self.w).reshape(self.w.shape[0], -1)
            if self.kind == "mse":
                return float(dw.pow(2).mean())
        if self.h is not None:  # the matmuls keep torch's thread count
            return float(((dw @ self.h) * dw).sum() / dw.shape[0])
        return float((self.x @ dw.t()).pow(2).sum() / (self.x.shape[0] * dw.shape[0]))


def act_error(q, rec: dict[str, torch.Tensor], rows: torch.Tensor) -> float:
    """Mean squared error of activation quantizer `q` on calibration `rows` (static: fitted on them
    with the record's exact channel range)."""
    with kernel_threads(rows):  # many small elementwise ops: no OpenMP barriers on a busy CPU
        if not q.cfg.dynamic:
            q.fit(rows, data_range=(rec["min"], rec["max"]))
            x = rows
        elif q.cfg.granularity == "per_tensor":
            x = rows.unsqueeze(0)  # one dynamic range per sample: the rows scored as one sample
        else:
            x = rows
        return float((q(x) - x).pow(2).mean())


# ----------------------------------------------------------------------------- the step
@dataclasses.dataclass
class Choice:
    names: list[str]  # layers that take it (q, k, v share an activation choice)
    role: str
    side: str
    format: str
    clip_ratio: float
    error: float
    own_format: str
    own_error: float  # the side's own format at ratio 1.0


class FormatSelect(Step):
    name = "format_select"

    def needs_layer_inputs(self, ctx: QuantContext) -> bool:
        o = self.options
        return "act" in o.sides or ("weight" in o.sides and o.weight_error == "output")

    # -- checks before any work
    def check_plan(self, run, adapter, plan) -> None:
        """Step order, explicit formats of the wrong width, candidate settings that cannot work and
        weight_error=output on conv layers: errors before any sampling."""
        names = [spec.get("name") for spec in run.method.steps]
        if self.name in names:
            mine = names.index(self.name)
            early = [n for n in names[:mine] if n in FITTING_STEPS]
            if early:
                raise ValueError(f"method.steps={names}: format_select must come before {', '.join(early)} "
                                 "(it rebuilds quantizers unfitted and refuses fitted ones); move it earlier")
        if plan is None:
            return
        configs = _Configs()
        o = self.options
        conv = []
        for name, lp in plan.quantized().items():
            for side in o.sides:
                cfg = getattr(lp, side)
                if cfg is None:
                    continue
                problem = width_problem(o.formats, cfg.format, side, f"layer {name} ({lp.role})")
                if problem:
                    raise ValueError(problem)
                for fmt in side_candidates(cfg.format, o.formats):
                    for r in o.clip_ratios:
                        try:
                            configs.get(cfg, fmt, r, side)
                        except ValueError as err:
                            raise ValueError(f"format_select: layer {name} ({lp.role}) {side}: candidate {fmt} "
                                             f"at clip {r:g} cannot work: {err}") from None
                if side == "weight" and o.weight_error == "output" and lp.shape is not None and len(lp.shape) > 2:
                    conv.append(f"{name} ({lp.role})")
        if conv:
            raise ValueError(f"format_select: weight_error=output needs inputs laid out like the weight's input "
                             f"width, but conv layers record pixels, not patches: {', '.join(conv[:5])}; use "
                             "weight_error=mse or leave their roles out of method.layers")

    def _check_unfitted(self, ctx: QuantContext, jobs) -> None:
        check_unfitted(ctx.qlayers, [(n, side) for names, side, _ in jobs for n in names], self.name)

    def _jobs(self, ctx: QuantContext):
        """[(layer names, side, candidate formats)]; q/k/v of one attention with equal activation
        settings form one activation job."""
        items, skipped = [], defaultdict(set)
        for name in ctx.qlayers:
            lp = ctx.plan.layers[name]
            for side in self.options.sides:
                cfg = getattr(lp, side)
                if cfg is None:
                    continue
                cands = side_candidates(cfg.format, self.options.formats)
                if not cands:
                    skipped["block format (fixes its own scales)"].add(f"{side} {cfg.format}")
                    continue
                if list(self.options.formats) == ["auto"] and len(cands) == 1:
                    skipped["INT format: clipping only"].add(f"{side} {cfg.format}")
                items.append((name, lp.role, cfg if side == "act" else None, (side, cands)))
        for why, what in skipped.items():
            log.info("format_select: %s: %s", why, ", ".join(sorted(what)))
        return [(names, side, cands) for names, (side, cands) in group_shared_acts(items)]

    @torch.no_grad()
    def apply(self, ctx: QuantContext) -> None:
        from ditq.methods.wrap import apply_plan

        if ctx.plan is None:
            raise ValueError("format_select needs the run's plan (QuantContext.plan) to record its choices")
        t0 = time.perf_counter()
        o = self.options
        jobs = self._jobs(ctx)
        self._check_unfitted(ctx, jobs)
        sides = {side for _, side, _ in jobs}
        inputs = ctx.layer_inputs() if "act" in sides or ("weight" in sides and o.weight_error == "output") else {}
        configs = _Configs()
        by_layer = defaultdict(list)
        for job in jobs:
            by_layer[job[0][0]].append(job)
        choices: list[Choice] = []
        bar = tqdm(by_layer.items(), desc="format_select", unit="layer", disable=not ctx.progress)
        for first, layer_jobs in bar:
            choices += self._score_layer(ctx, first, layer_jobs, inputs, configs)

        # record the choices in the plan; rebuild the changed quantizers (unfitted)
        plan = ctx.plan
        for c in choices:
            for n in c.names:
                cur = getattr(plan.layers[n], c.side)
                if (_spec(cur.format).name, float(cur.clip_ratio)) != (c.format, c.clip_ratio):
                    plan = plan.with_layer(n, **{c.side: {"format": c.format, "clip_ratio": c.clip_ratio}})
        ctx.plan = plan
        changed = apply_plan(ctx.qlayers, plan)
        for n in changed:
            q = ctx.qlayers[n]
            for attr in ("weight_quantizer", "act_quantizer"):
                qz = getattr(q, attr)
                if qz is not None and not qz.name:
                    qz.name = f"{n}.{attr}"  # named in errors, as wrap_layers names them
        seconds = time.perf_counter() - t0
        path = self._write_csv(ctx, choices)
        ctx.diagnostics["format_select"] = {**summarize(choices), "seconds": round(seconds, 3),
                                            "changed_layers": len(changed), "csv": None if path is None else str(path)}
        for line in summary_lines(choices):
            log.info("format_select: %s", line)
        log.info("format_select: %d layer side(s) scored, %d layer(s) changed, %.1f s", len(choices), len(changed),
                 seconds)

    def _score_layer(self, ctx: QuantContext, first: str, layer_jobs, inputs, configs) -> list[Choice]:
        """The best candidate of each job led by layer `first` (its weight side; an act side it leads)."""
        from ditq.methods.wrap import build_side

        o = self.options
        ratios = [float(r) for r in o.clip_ratios]
        rows = spaced_rows(inputs[first]["rows"], o.max_rows) if first in inputs else None
        choices = []
        for names, side, cands in layer_jobs:
            cfg = getattr(ctx.plan.layers[first], side)
            if rows is None and (side == "act" or o.weight_error == "output"):
                raise KeyError(f"format_select: no calibration inputs recorded for {first}")
            if side == "weight":
                score = WeightError(ctx.qlayers[first].weight_to_quantize(), o.weight_error, rows)
            else:
                rec = inputs[first]
                score = lambda q, rec=rec: act_error(q, rec, rows)  # noqa: E731
            errors: dict[tuple[str, float], float] = {}
            for fmt in cands:
                for r in ratios:
                    errors[fmt, r] = score(build_side(configs.get(cfg, fmt, r, side), side))
            (fmt, r), err = min(errors.items(), key=lambda kv: kv[1])  # the first of equal minima
            own = _spec(cfg.format).name
            own_err = errors.get((own, 1.0))
            if own_err is None:
                own_err = score(build_side(configs.get(cfg, own, 1.0, side), side))
            choices.append(Choice(list(names), ctx.plan.layers[first].role, side, fmt, r, err, own, own_err))
        return choices

    def _write_csv(self, ctx: QuantContext, choices: list[Choice]) -> Path | None:
        if not ctx.output_dir:
            return None
        from ditq.utils.atomic import atomic_write_text

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["layer", "role", "side", "error_kind", "format", "clip_ratio", "error", "own_format", "own_error"])
        for c in choices:
            kind = self.options.weight_error if c.side == "weight" else "mse"
            for n in c.names:
                w.writerow([n, c.role, c.side, kind, c.format, f"{c.clip_ratio:g}", f"{c.error:.6e}", c.own_format,
                            f"{c.own_error:.6e}"])
        path = Path(ctx.output_dir) / CSV_NAME
        atomic_write_text(path, buf.getvalue())
        return path


def summarize(choices: list[Choice]) -> dict:
    """{role: {side: {"layers", "formats": {format: count}, "ratio_mean", "ratio_min", "ratio_max"}}}
    (q/k/v's shared activation choice counts once per layer)."""
    acc: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for c in choices:
        acc[c.role][c.side].extend([(c.format, c.clip_ratio)] * len(c.names))
    out: dict[str, dict] = {}
    for role, sides in acc.items():
        out[role] = {}
        for side, picks in sides.items():
            ratios = [r for _, r in picks]
            out[role][side] = {"layers": len(picks), "formats": dict(Counter(f for f, _ in picks)),
                               "ratio_mean": round(sum(ratios) / len(ratios), 4), "ratio_min": min(ratios),
                               "ratio_max": max(ratios)}
    return {"roles": out}


def summary_lines(choices: list[Choice]) -> list[str]:
    lines = []
    for role, sides in summarize(choices)["roles"].items():
        parts = []
        for side, s in sides.items():
            fmts = ", ".join(f"{f} x{n}" for f, n in sorted(s["formats"].items(), key=lambda kv: -kv[1]))
            parts.append(f"{side} {fmts}, clip {s['ratio_min']:g}..{s['ratio_max']:g} (mean {s['ratio_mean']:.3g})")
        lines.append(f"{role}: " + "; ".join(parts))
    return lines
