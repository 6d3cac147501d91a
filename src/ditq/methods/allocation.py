"""Q-DiT Table 5's alternatives to its evolutionary search, as one step: per-layer group sizes from
per-layer sensitivities and an exact multiple-choice knapsack (`ditq.search.knapsack`) under the same
cost constraint as `group_search` (the run's `search` group).

Per layer l (the plan's layers with per-group weights, `group_search.search_layers`) and group size g
in search.choices, weights AND activations quantized at g (Q-DiT ties them, `QuantPlan.with_group_sizes`;
activations dynamic per token and group, weights round-to-nearest with the plan's format and range
rule), on the layer's FP calibration inputs X [T, C] (`ctx.layer_inputs()[l]["rows"]`, a token sample)
and its FP weight W [out, C]:

  ilp      (the MSE indicator of the mixed-precision work Q-DiT cites, Moon et al. 2024) the measured
           output error when that layer alone is quantized:
               S_l(g) = || X W^T - Q_a(X) Q_w(W)^T ||_F^2 / (T out)
  hessian  (Li et al. 2021, HAWQ-style) a second-order proxy of the same error without the product:
               S_l(g) = [ sum_i H_ii ||dW_{:,i}||^2  +  sum_i ||W_{:,i}||^2 E[dx_i^2] ] / out
           H = X^T X / T (the layer-output Hessian of ||X W^T||^2 / (T out) w.r.t. a weight row, up to 2;
           ditq.calibration.stats.HessianAccumulator's H / 2), dW = Q_w(W) - W, dx = Q_a(x) - x.
           The first term is the diagonal of tr(dW H dW^T) (weight perturbation, the cross-channel
           terms dropped); the second is the same for the input perturbation: the output error
           dX W^T has E||dx W^T||^2 = tr(W^T W E[dx dx^T]), whose diagonal is ||W_{:,i}||^2 E[dx_i^2].
           The cross term 2 <X dW^T, dX W^T> and the product dX dW^T are dropped (independent
           rounding errors: mean ~0 and higher order). `act_term: false` keeps the weight term only.
           So S estimates the ilp MSE from diagonals: no [T, out] products.

Sensitivities use the FP weights (run the step before GPTQ: steps [group_allocation, gptq]).

The knapsack: one option per layer and choice; values S_l(g); costs per layer from `layer_costs` rows of
the plan with every allocated layer at g (so the chosen plan's `plan_cost` is the sum), by
search.constraint:
  bitops           BitOps (incl. the per-group rescale work) <= search.max_bitops, or the BitOps of the
                   uniform plan at search.target_group_size
  storage          weight storage bits (scales included) <= the uniform target plan's
  mean_group_size  sum of weight group sizes >= target_group_size x (weight-quantized layers), as the
                   linear constraint sum(-g) <= -target x n
  none             each layer's smallest sensitivity
Ties (equal summed sensitivity) go to the lexicographically smallest choice vector with each layer's
options ordered largest group first: earlier layers keep the larger (cheaper) groups.

The chosen plan replaces ctx.plan, the wrapped layers get fresh quantizers for it (`apply_plan`,
rebuild), it is written to <run dir>/allocated_plan.yaml (`method.plan=<it>` reproduces the model
without allocating), and ctx.diagnostics["group_allocation"] records the strategy, budget, chosen and
target cost, and per layer the group size and the sensitivity of every choice. Bad settings (a choice
or target wider than a layer, static activations, a budget below the cheapest plan, a k x k conv) are
errors naming the layer and the search key, raised before calibration.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ditq.methods.base import QuantContext, Step
from ditq.methods.plan import PlanError, QuantPlan, weight_width

log = logging.getLogger(__name__)

PLAN_FILE = "allocated_plan.yaml"


class AllocationError(PlanError):
    """Allocation settings that cannot work with this model, plan or budget."""


@dataclass
class AllocationProblem:
    """What the knapsack needs, built (and checked) before any work: the layers, the choices (largest
    first), the base plan, per-layer costs of every choice, and the budget."""

    names: list[str]
    choices: list[int]  # descending: ties go to larger (cheaper) groups
    base: QuantPlan
    constraint: str
    costs: dict[str, list[float]]  # layer -> cost of each choice (constraint units)
    fixed: float  # the summed cost of the plan's other layers (the same in every plan)
    budget: float | None  # on the plan's total (None: constraint none)
    budget_source: str | None
    target: QuantPlan
    target_cost: float | None
    plans: dict[int, QuantPlan] = field(default_factory=dict)  # choice -> every allocated layer at it
    tokens: dict[str, int] = field(default_factory=dict)
    copies: list[str] = field(default_factory=list)

    @property
    def knapsack_budget(self) -> float | None:
        return None if self.budget is None else self.budget - self.fixed

    def total(self, plan: QuantPlan) -> float:
        """The plan's cost in constraint units, from `layer_costs` rows (what the knapsack sums)."""
        from ditq.methods.cost import layer_costs

        return sum(row_metric(r, self.constraint) for r in layer_costs(plan, self.tokens, self.copies))

    def plan(self, sizes: dict[str, int], created_by: str) -> QuantPlan:
        return dataclasses.replace(self.base.with_group_sizes(sizes), created_by=created_by)


def row_metric(row, constraint: str) -> float:
    """One `layer_costs` row in constraint units. Storage bits are whole numbers (elements x bits +
    scales x scale bits) that `layer_costs` computes through a float bits-per-weight: rounded back so
    sums compare exactly. mean_group_size: minus the weight group size (a linear >= constraint)."""
    if constraint == "bitops":
        return int(row.bitops)
    if constraint == "storage":
        return int(round(row.storage_bits))
    if constraint == "mean_group_size":
        return -int(row.group_size) if row.group_size is not None else 0
    return 0


def _is_conv(module) -> bool:
    import torch.nn as nn

    wrapped = getattr(type(module), "wraps", None)
    return isinstance(module, nn.Conv2d) or type(module).__name__ == "QuantConv2d" or (
        isinstance(wrapped, type) and issubclass(wrapped, nn.Conv2d))


def allocation_problem(base: QuantPlan, adapter, search) -> AllocationProblem:
    """Check the settings against the plan and model and tabulate the costs (cheap: no data, no
    quantizers; usable right after the plan is made, before any sampling)."""
    from ditq.methods.cost import layer_costs, layer_tokens, shared_copies
    from ditq.methods.group_search import check_choices, search_layers

    names = search_layers(base)
    choices = sorted({int(c) for c in search.choices}, reverse=True)
    try:
        check_choices(base, names, choices)
    except PlanError as err:
        raise AllocationError(f"group_allocation: {err}".replace("group_search", "group_allocation")) from None
    for n in names:
        m = adapter.denoiser.get_submodule(n)  # the layer or its quantized wrapper (same conv attributes)
        if _is_conv(m) and (tuple(m.kernel_size) != (1, 1) or tuple(m.stride) != (1, 1) or m.groups != 1):
            raise AllocationError(
                f"group_allocation: layer {n} ({base.layers[n].role}) is a {tuple(m.kernel_size)} convolution; "
                "its recorded inputs are pixels, not the patches its weight multiplies, so its output error "
                "cannot be measured from them; leave its role out of method.layers")
    target_g = int(search.target_group_size)
    narrow = [(n, weight_width(base.layers[n].shape)) for n in names if target_g > weight_width(base.layers[n].shape)]
    if narrow and search.constraint != "none":
        n, w = narrow[0]
        raise AllocationError(f"search.target_group_size={target_g} is wider than layer {n} (input width {w}) and "
                              f"{len(narrow) - 1} other layer(s); the uniform target plan does not exist: use a target "
                              "<= the narrowest allocated layer's width (search=embedded for the embedded models)")
    try:
        plans = {g: base.with_group_sizes({n: g for n in names}) for g in choices}
        target = base.with_group_sizes({n: target_g for n in names}) if not narrow else base
    except PlanError as err:  # e.g. static activations: groups per token need dynamic ranges
        raise AllocationError(f"group_allocation ties each layer's weight and activation group sizes (Q-DiT): {err}; "
                              "use a method with dynamic per-token-group activations (method=qdit_ilp / qdit_hessian)"
                              ) from None
    tokens = layer_tokens(adapter, base.layers)
    copies = shared_copies(adapter, base.layers)
    kind = str(search.constraint)
    name_set = set(names)
    costs: dict[str, list[float]] = {n: [] for n in names}
    for g in choices:
        for r in layer_costs(plans[g], tokens, copies):
            if r.name in name_set:
                costs[r.name].append(row_metric(r, kind))
    fixed = sum(row_metric(r, kind) for r in layer_costs(base, tokens, copies) if r.name not in name_set)
    problem = AllocationProblem(names=names, choices=choices, base=base, constraint=kind, costs=costs, fixed=fixed,
                                budget=None, budget_source=None, target=target, target_cost=None, plans=plans,
                                tokens=tokens, copies=copies)
    if kind == "none":
        return problem
    problem.target_cost = problem.total(target)
    if kind == "bitops" and search.max_bitops is not None:
        problem.budget, problem.budget_source = math.floor(float(search.max_bitops)), "search.max_bitops"
    elif kind == "mean_group_size":
        counted = sum(1 for r in layer_costs(target, tokens, copies) if r.group_size is not None)
        problem.budget = -target_g * counted
        problem.budget_source = f"search.target_group_size={target_g} x {counted} weight-quantized layers"
    else:
        problem.budget = problem.target_cost
        problem.budget_source = f"the uniform plan at search.target_group_size={target_g}"
    cheapest = problem.fixed + sum(min(c) for c in costs.values())
    if cheapest > problem.budget:
        fix = {"bitops": "raise search.max_bitops or search.target_group_size, or add larger search.choices",
               "storage": "raise search.target_group_size or add larger search.choices",
               "mean_group_size": "lower search.target_group_size or add larger search.choices"}[kind]
        shown = -cheapest if kind == "mean_group_size" else cheapest
        limit = -problem.budget if kind == "mean_group_size" else problem.budget
        rel = ">= needed" if kind == "mean_group_size" else "<= allowed"
        raise AllocationError(
            f"group_allocation: search.constraint={kind}: even the largest group size of search.choices={choices} on "
            f"all {len(names)} layers gives {'summed group size' if kind == 'mean_group_size' else kind} "
            f"{shown:.6g}, but {limit:.6g} is {rel} ({problem.budget_source}); {fix}")
    return problem


def _rows(rec: dict, max_rows: int | None):
    import torch

    rows = rec["rows"]
    if max_rows is not None and rows.shape[0] > max_rows:
        idx = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows]
        rows = rows[idx.sort().values]
    return rows


def layer_sensitivities(strategy: str, weight, rows, plans: list, act_term: bool = True) -> list[float]:
    """S(g) of one layer for each LayerPlan in `plans` (the module doc): `weight` [out, ...] FP,
    `rows` [T, C] FP inputs."""
    import torch

    from ditq.quant.quantizer import build_quantizer

    with torch.no_grad():
        w = weight.detach().float().reshape(weight.shape[0], -1)
        x = rows.detach().to(w.device, torch.float32)
        out = w.shape[0]
        if strategy == "ilp":
            y = x @ w.t()
        else:
            h = x.pow(2).mean(0)  # diag of X^T X / T
            wn = w.pow(2).sum(0)  # ||W_{:,i}||^2
        values = []
        for lp in plans:
            if lp.weight is not None:
                wq = build_quantizer(lp.weight, "weight")  # no .to(): parameters follow the data
                wq.fit(w)
                w_hat = wq(w)
            else:
                w_hat = w
            x_hat = build_quantizer(lp.act, "act")(x) if lp.act is not None else x
            if strategy == "ilp":
                s = (y - x_hat @ w_hat.t()).pow(2).mean()
            else:
                s = (h * (w_hat - w).pow(2).sum(0)).sum() / out
                if act_term:
                    s = s + (wn * (x_hat - x).pow(2).mean(0)).sum() / out
            values.append(float(s))
    return values


class GroupAllocation(Step):
    name = "group_allocation"

    _cache: tuple | None = None  # (ctx, plan, problem) of the last check: apply reuses it

    def _problem(self, ctx: QuantContext) -> AllocationProblem:
        if ctx.plan is None:
            raise AllocationError("group_allocation needs the run's plan (QuantContext.plan)")
        if self._cache is not None and self._cache[0] is ctx and self._cache[1] is ctx.plan:
            return self._cache[2]
        problem = allocation_problem(ctx.plan, ctx.adapter, ctx.run.search)
        self._cache = (ctx, ctx.plan, problem)
        return problem

    def check_plan(self, run, adapter, plan) -> None:
        allocation_problem(plan, adapter, run.search)  # every settings error before any sampling

    def needs_layer_inputs(self, ctx: QuantContext) -> bool:
        self._problem(ctx)  # every settings error before the calibration work
        return True

    def apply(self, ctx: QuantContext) -> None:
        from ditq.methods.cost import plan_cost
        from ditq.methods.wrap import apply_plan
        from ditq.search.knapsack import InfeasibleBudgetError, solve_mckp

        o, s = self.options, ctx.run.search
        p = self._problem(ctx)
        inputs = ctx.layer_inputs()
        missing = [n for n in p.names if n not in inputs]
        if missing:
            raise AllocationError(f"group_allocation: no calibration inputs for layers {missing[:5]}")
        per_choice = p.plans
        t0 = time.perf_counter()
        sens: dict[str, list[float]] = {}
        rows_used = 0
        for n in p.names:
            rows = _rows(inputs[n], o.max_rows)
            rows_used = max(rows_used, int(rows.shape[0]))
            sens[n] = layer_sensitivities(o.strategy, ctx.qlayers[n].weight, rows,
                                          [per_choice[g].layers[n] for g in p.choices], act_term=o.act_term)
            bad = [g for g, v in zip(p.choices, sens[n]) if not math.isfinite(v)]
            if bad:
                raise AllocationError(f"group_allocation: layer {n}: sensitivity at group sizes {bad} is not finite")
        measure_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            sol = solve_mckp([sens[n] for n in p.names], [p.costs[n] for n in p.names], p.knapsack_budget,
                             solver=o.solver, names=p.names)
        except InfeasibleBudgetError as err:  # allocation_problem checks this first; kept for safety
            raise AllocationError(f"group_allocation: search.constraint={p.constraint}: {err}") from None
        solve_s = time.perf_counter() - t0
        sizes = {n: p.choices[j] for n, j in zip(p.names, sol.choice)}
        chosen = p.plan(sizes, f"group_allocation ({o.strategy}, {p.constraint})")
        total = p.total(chosen)
        if total != p.fixed + sol.cost:  # the knapsack's per-layer costs must add up to the plan's
            raise RuntimeError(f"group_allocation: the chosen plan costs {total} but the knapsack summed "
                               f"{p.fixed + sol.cost}; the cost table and layer_costs disagree (a bug)")
        if p.budget is not None and total > p.budget:
            raise RuntimeError(f"group_allocation: the chosen plan's {p.constraint} {total} exceeds the budget "
                               f"{p.budget} (a bug in the knapsack)")

        out_dir = Path(ctx.output_dir or ctx.run.paths.output_dir)
        plan_file = chosen.save(out_dir / PLAN_FILE)
        keep = ("bitops", "storage_bits", "mean_group_size")
        chosen_cost = plan_cost(chosen, p.tokens, p.copies)
        target_cost = plan_cost(p.target, p.tokens, p.copies) if p.target is not p.base else None
        ctx.diagnostics["group_allocation"] = {
            "strategy": o.strategy, "act_term": o.act_term if o.strategy == "hessian" else None,
            "constraint": p.constraint, "choices": p.choices, "target_group_size": int(s.target_group_size),
            "budget": p.budget, "budget_source": p.budget_source, "cost": total, "target_cost": p.target_cost,
            "chosen": {k: chosen_cost[k] for k in keep},
            "target": None if target_cost is None else {k: target_cost[k] for k in keep},
            "solver": sol.solver, "solver_work": sol.solves, "objective": sol.value,
            "layers": len(p.names), "rows_per_layer": rows_used,
            "sensitivity_s": round(measure_s, 3), "solve_s": round(solve_s, 3),
            "group_sizes": {str(g): c for g, c in sorted(Counter(sizes.values()).items())},
            "plan_file": str(plan_file.resolve()),
            "per_layer": {n: {"group_size": sizes[n], "sensitivity": {str(g): v for g, v in zip(p.choices, sens[n])}}
                          for n in p.names},
        }
        log.info("group_allocation (%s, %s): %d layers, sensitivities %.1f s, %s solve %.2f s; group sizes %s; "
                 "%s %s (budget %s)", o.strategy, p.constraint, len(p.names), measure_s, sol.solver, solve_s,
                 dict(Counter(sizes.values())), p.constraint, total, p.budget)
        ctx.plan = chosen
        self._cache = None
        apply_plan(ctx.qlayers, chosen, rebuild=True)  # fresh quantizers; the later steps (GPTQ) fit them
