"""The multiple-choice knapsack: pick one option per group (a layer) so that the summed value (a
sensitivity) is minimal and the summed cost stays within a budget. Torch-free.

    minimise  sum_l values[l][x_l]   subject to  sum_l costs[l][x_l] <= budget,  x_l in options of l

Solvers (both exact):
  milp   scipy.optimize.milp (HiGHS) on binaries x_lj with one equality per group and the budget row;
         objective and costs are shifted by their per-group minimum and normalised, the answer is
         re-checked with the caller's numbers (a row HiGHS accepts within its feasibility tolerance
         but the exact sum exceeds is re-solved with a tighter budget);
  bnb    depth-first branch and bound (bound: the prefix plus every later group's cheapest value;
         pruned when even the later groups' cheapest costs break the budget); exact but exponential in
         the worst case, so it stops with `KnapsackTooLargeError` after `node_limit` nodes. The
         fallback when scipy is missing; the problem without a budget is always solved by it (greedy).

Ties are broken deterministically and identically by both: among the feasible assignments whose value
is within `tol` of the optimum, the lexicographically smallest vector of option indices (groups in the
given order, options in the given order) wins, so callers order options by preference (e.g. the
cheapest first). `tol` = rtol x sum_l max_j |values[l][j]| (float round-off, not a modelling slack).
Costs are compared exactly when they are all integers (BitOps, storage bits, group sizes), else with
rtol x their magnitude.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["KnapsackError", "InfeasibleBudgetError", "KnapsackTooLargeError", "KnapsackSolution", "solve_mckp",
           "milp_available"]


class KnapsackError(ValueError):
    """A knapsack problem that is malformed or cannot be solved."""


class InfeasibleBudgetError(KnapsackError):
    """Even the cheapest option of every group costs more than the budget."""


class KnapsackTooLargeError(KnapsackError):
    """The exact fallback solver exceeded its node limit."""


@dataclass(frozen=True)
class KnapsackSolution:
    choice: tuple[int, ...]  # the option index of every group
    value: float  # sum of the chosen values
    cost: float  # sum of the chosen costs
    solver: str  # "milp" | "bnb"
    solves: int  # MILP solves or branch-and-bound nodes


def milp_available() -> bool:
    try:
        from scipy.optimize import milp  # noqa: F401
    except ImportError:
        return False
    return True


def _label(names, i: int) -> str:
    return f"group {i}" + (f" ({names[i]})" if names is not None else "")


def _check(values, costs, budget, names) -> tuple[list[list[float]], list[list[float]]]:
    if names is not None and len(names) != len(values):
        raise KnapsackError(f"names has {len(names)} entries for {len(values)} groups")
    if len(values) == 0:
        raise KnapsackError("no groups: the knapsack needs at least one group with at least one option")
    if len(costs) != len(values):
        raise KnapsackError(f"values has {len(values)} groups, costs {len(costs)}; give both per group")
    vals, cs = [], []
    for i, (v, c) in enumerate(zip(values, costs)):
        v, c = [float(a) for a in v], [float(a) for a in c]
        if not v:
            raise KnapsackError(f"{_label(names, i)} has no options")
        if len(v) != len(c):
            raise KnapsackError(f"{_label(names, i)}: {len(v)} values but {len(c)} costs; give one cost per option")
        bad = [j for j, a in enumerate(v + c) if not math.isfinite(a)]
        if bad:
            raise KnapsackError(f"{_label(names, i)}: values and costs must be finite numbers, got values={v} "
                                f"costs={c}")
        vals.append(v)
        cs.append(c)
    if budget is not None and not math.isfinite(float(budget)):
        raise KnapsackError(f"budget must be a finite number or None (no budget), got {budget!r}")
    return vals, cs


class _Problem:
    def __init__(self, values, costs, budget, rtol, names):
        self.values, self.costs, self.names = values, costs, names
        self.n = len(values)
        self.budget = None if budget is None else float(budget)
        self.vtol = rtol * sum(max(abs(a) for a in v) for v in values)
        exact = all(float(a).is_integer() for c in costs for a in c) and (
            budget is None or float(budget).is_integer())
        self.ctol = 0.0 if exact else rtol * max(abs(self.budget or 0.0), sum(max(abs(a) for a in c) for c in costs))
        self.vmin = [min(v) for v in values]
        self.cmin = [min(c) for c in costs]
        # suffix sums: the cheapest completion of groups i.. (value, cost)
        self.vsuf, self.csuf = [0.0] * (self.n + 1), [0.0] * (self.n + 1)
        for i in range(self.n - 1, -1, -1):
            self.vsuf[i] = self.vsuf[i + 1] + self.vmin[i]
            self.csuf[i] = self.csuf[i + 1] + self.cmin[i]

    def fits(self, cost: float) -> bool:
        return self.budget is None or cost <= self.budget + self.ctol

    def value_of(self, choice) -> float:
        return sum(self.values[i][j] for i, j in enumerate(choice))

    def cost_of(self, choice) -> float:
        return sum(self.costs[i][j] for i, j in enumerate(choice))

    def allowed(self, i: int, j: int) -> bool:
        """Option j of group i alone does not break the budget (with every other group at its cheapest)."""
        return self.fits(self.csuf[0] - self.cmin[i] + self.costs[i][j])


# ----------------------------------------------------------------------------- branch and bound
class _BnB:
    """Depth-first search with two lower bounds on a node's best completion: the later groups' cheapest
    values, and the Lagrangian bound sum_{l>=i} min_j (v_lj + lam c_lj) - lam x (budget left), lam the
    multiplier that maximises it at the root (the LP relaxation's bound)."""

    def __init__(self, p: _Problem, node_limit: int):
        self.p, self.node_limit, self.nodes = p, node_limit, 0
        self.lam = self._multiplier() if p.budget is not None else 0.0
        self.lsuf = [0.0] * (p.n + 1)  # suffix sums of min_j (v + lam c)
        for i in range(p.n - 1, -1, -1):
            self.lsuf[i] = self.lsuf[i + 1] + min(v + self.lam * c for v, c in zip(p.values[i], p.costs[i]))

    def _dual(self, lam: float) -> float:
        p = self.p
        return sum(min(v + lam * c for v, c in zip(vs, cs)) for vs, cs in zip(p.values, p.costs)) \
            - lam * (p.budget + p.ctol)

    def _multiplier(self) -> float:
        """argmax over lam >= 0 of the (concave, piecewise-linear) dual: its kinks are where two options
        of a group trade value for cost; binary search over them."""
        p = self.p
        kinks = {0.0}
        for vs, cs in zip(p.values, p.costs):
            for (va, ca), (vb, cb) in itertools.combinations(zip(vs, cs), 2):
                if ca != cb and (vb - va) / (ca - cb) > 0:
                    kinks.add((vb - va) / (ca - cb))
        lams = sorted(kinks)
        lo, hi = 0, len(lams) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self._dual(lams[mid]) < self._dual(lams[mid + 1]):
                lo = mid + 1
            else:
                hi = mid
        return lams[lo]

    def _bound(self, i: int, val: float, cost: float) -> float:
        """A lower bound on the value of any feasible completion of a prefix ending before group i."""
        p = self.p
        simple = val + p.vsuf[i]
        if p.budget is None:
            return simple
        return max(simple, val + self.lsuf[i] - self.lam * (p.budget + p.ctol - cost))

    def _tick(self):
        self.nodes += 1
        if self.nodes > self.node_limit:
            raise KnapsackTooLargeError(
                f"the exact branch-and-bound fallback explored more than {self.node_limit} nodes on {self.p.n} "
                "groups; install scipy (its MILP solver handles this size) or shrink the problem")

    def optimum(self) -> float:
        """The optimal value (up to vtol): DFS, options by ascending Lagrangian cost v + lam c (the LP
        relaxation's preference), so good incumbents come first."""
        p = self.p
        order = [sorted(range(len(vs)), key=lambda j, vs=vs, cs=cs: (vs[j] + self.lam * cs[j], vs[j], j))
                 for vs, cs in zip(p.values, p.costs)]
        best = [math.inf]

        def dfs(i: int, val: float, cost: float):
            self._tick()
            if i == p.n:
                best[0] = min(best[0], val)
                return
            for j in order[i]:
                v, c = val + p.values[i][j], cost + p.costs[i][j]
                if p.fits(c + p.csuf[i + 1]) and self._bound(i + 1, v, c) < best[0] - p.vtol:
                    dfs(i + 1, v, c)

        dfs(0, 0.0, 0.0)
        return best[0]

    def first_within(self, limit: float) -> tuple[int, ...] | None:
        """The lexicographically smallest feasible assignment with value <= limit."""
        p = self.p

        def dfs(i: int, val: float, cost: float, chosen: list[int]):
            self._tick()
            if i == p.n:
                return tuple(chosen) if val <= limit else None
            for j in range(len(p.values[i])):
                v, c = val + p.values[i][j], cost + p.costs[i][j]
                if not p.fits(c + p.csuf[i + 1]) or self._bound(i + 1, v, c) > limit:
                    continue
                chosen.append(j)
                found = dfs(i + 1, v, c, chosen)
                chosen.pop()
                if found is not None:
                    return found
            return None

        return dfs(0, 0.0, 0.0, [])


# ----------------------------------------------------------------------------- MILP
class _MILP:
    SCALE = 1e3  # the objective's total spread after normalising (HiGHS's absolute gap is 1e-6)

    def __init__(self, p: _Problem):
        import numpy as np

        self.np, self.p, self.solves = np, p, 0
        self.offsets = [0]
        for v in p.values:
            self.offsets.append(self.offsets[-1] + len(v))
        m = self.offsets[-1]
        spread = sum(max(v) - min(v) for v in p.values) or 1.0
        self.c = np.array([(a - p.vmin[i]) / spread * self.SCALE for i, v in enumerate(p.values) for a in v])
        dc = [c - p.cmin[i] for i, cs in enumerate(p.costs) for c in cs]
        self.slack = None if p.budget is None else p.budget - p.csuf[0]
        self.cscale = max([abs(a) for a in dc] + [abs(self.slack or 0.0), 1e-300])
        self.dc = np.array(dc) / self.cscale
        self.eq = np.zeros((p.n, m))
        for i in range(p.n):
            self.eq[i, self.offsets[i]:self.offsets[i + 1]] = 1.0
        self.allowed = np.array([1.0 if p.allowed(i, j) else 0.0 for i, v in enumerate(p.values)
                                 for j in range(len(v))])

    def solve(self, fixed: dict[int, set[int]]) -> tuple[int, ...] | None:
        """The optimal assignment with group i restricted to the options fixed[i]; None if infeasible."""
        np, p = self.np, self.p
        from scipy.optimize import Bounds, LinearConstraint, milp

        ub = self.allowed.copy()
        for i, keep in fixed.items():
            for j in range(len(p.values[i])):
                if j not in keep:
                    ub[self.offsets[i] + j] = 0.0
        rhs = None if self.slack is None else (self.slack + p.ctol) / self.cscale
        for _ in range(5):
            cons = [LinearConstraint(self.eq, 1.0, 1.0)]
            if rhs is not None:
                cons.append(LinearConstraint(self.dc[None, :], -np.inf, rhs))
            self.solves += 1
            res = milp(self.c, integrality=np.ones_like(self.c), bounds=Bounds(np.zeros_like(ub), ub),
                       constraints=cons, options={"mip_rel_gap": 0.0, "presolve": True})
            if res.status == 2:  # infeasible
                return None
            if res.x is None:
                raise KnapsackError(f"scipy.optimize.milp failed on the knapsack: {res.message}")
            choice = tuple(int(np.argmax(res.x[self.offsets[i]:self.offsets[i + 1]])) for i in range(p.n))
            cost = p.cost_of(choice)
            if p.fits(cost):
                return choice
            # accepted by HiGHS within its tolerance but over the exact budget: tighten and re-solve
            rhs -= 2 * (cost - p.budget - p.ctol) / self.cscale + 1e-9
        raise KnapsackError("scipy.optimize.milp kept returning assignments over the budget; the costs are badly "
                            "scaled for it (use solver='bnb')")

    def canonical(self, incumbent: tuple[int, ...], limit: float) -> tuple[int, ...]:
        """Sequential fixing: per group, the smallest option index that still completes to a feasible
        assignment of value <= limit (one MILP per group whose incumbent option is not the first)."""
        p, x, fixed = self.p, list(incumbent), {}
        for i in range(p.n):
            while x[i] > 0:
                earlier = {j for j in range(x[i]) if p.allowed(i, j)
                           and p.value_of(x[:i]) + p.values[i][j] + p.vsuf[i + 1] <= limit
                           and p.fits(p.cost_of(x[:i]) + p.costs[i][j] + p.csuf[i + 1])}
                if not earlier:
                    break
                sol = self.solve({**fixed, i: earlier})
                if sol is None or p.value_of(sol) > limit:
                    break
                x = list(sol)
            fixed[i] = {x[i]}
        return tuple(x)


# ----------------------------------------------------------------------------- entry point
def solve_mckp(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float | None, *,
               solver: str = "auto", names: Sequence[str] | None = None, rtol: float = 1e-9,
               node_limit: int = 2_000_000) -> KnapsackSolution:
    """Exact multiple-choice knapsack (see the module doc). `values[l][j]` / `costs[l][j]`: option j of
    group l; `budget` None: no cost constraint. `solver`: auto (milp when scipy imports, else bnb) | milp
    | bnb. `names` label groups in errors. Raises InfeasibleBudgetError when even the cheapest option of
    every group exceeds the budget."""
    if solver not in ("auto", "milp", "bnb"):
        raise KnapsackError(f"solver={solver!r}; choose auto, milp or bnb")
    vals, cs = _check(values, costs, budget, names)
    p = _Problem(vals, cs, budget, rtol, list(names) if names is not None else None)
    if not p.fits(p.csuf[0]):
        worst = sorted(range(p.n), key=lambda i: -p.cmin[i])[:3]
        raise InfeasibleBudgetError(
            f"budget {p.budget:.6g} is below the cheapest assignment's cost {p.csuf[0]:.6g} (every group at its "
            f"cheapest option; the costliest: " + ", ".join(f"{_label(p.names, i)} {p.cmin[i]:.6g}" for i in worst)
            + "); raise the budget or add cheaper options")
    use_milp = solver == "milp" or (solver == "auto" and milp_available() and p.budget is not None)
    if solver == "milp" and not milp_available():
        raise KnapsackError("solver='milp' needs scipy (scipy.optimize.milp); install scipy or use solver='bnb'")
    if use_milp:
        m = _MILP(p)
        incumbent = m.solve({})
        if incumbent is None:  # cannot happen after the cheapest-assignment check, unless tolerances bite
            raise InfeasibleBudgetError(f"scipy.optimize.milp found no assignment within budget {p.budget:.6g}")
        choice = m.canonical(incumbent, p.value_of(incumbent) + p.vtol)
        return KnapsackSolution(choice, p.value_of(choice), p.cost_of(choice), "milp", m.solves)
    b = _BnB(p, node_limit)
    best = b.optimum()
    choice = b.first_within(best + p.vtol)
    if choice is None:  # the optimum exists, so the lexicographic pass finds one; guard anyway
        raise KnapsackError("branch and bound found no assignment within the optimum; report this as a bug")
    return KnapsackSolution(choice, p.value_of(choice), p.cost_of(choice), "bnb", b.nodes)
