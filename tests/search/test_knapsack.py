"""ditq.search.knapsack: the exact multiple-choice knapsack of group_allocation (ILP / Hessian), both
solvers against brute force, infeasible budgets, deterministic ties (torch-free)."""
import itertools
import random

import pytest

from ditq.search.knapsack import (InfeasibleBudgetError, KnapsackError, KnapsackTooLargeError, milp_available,
                                  solve_mckp)

SOLVERS = ["bnb", pytest.param("milp", marks=pytest.mark.skipif(not milp_available(), reason="no scipy"))]


def brute(values, costs, budget):
    """(best value, lexicographically smallest optimal choice) by enumeration; None if infeasible."""
    best = None
    for choice in itertools.product(*[range(len(v)) for v in values]):  # lexicographic order
        cost = sum(costs[i][j] for i, j in enumerate(choice))
        if budget is not None and cost > budget:
            continue
        val = sum(values[i][j] for i, j in enumerate(choice))
        if best is None or val < best[0]:
            best = (val, choice)
    return best


def instance(rng, ints: bool, ties: bool = False):
    n = rng.randint(1, 6)
    values, costs = [], []
    for _ in range(n):
        k = rng.randint(1, 4)
        if ints:
            values.append([rng.randint(0, 3 if ties else 60) for _ in range(k)])
            costs.append([rng.randint(0, 3 if ties else 20) for _ in range(k)])
        else:
            values.append([rng.random() for _ in range(k)])
            costs.append([rng.random() * 10 for _ in range(k)])
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    budget = lo + rng.random() * (hi - lo)
    return values, costs, (round(budget) if ints else budget)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("ints", [True, False])
def test_exact_against_brute_force(solver, ints):
    rng = random.Random(1234 + ints)
    for _ in range(120):
        values, costs, budget = instance(rng, ints)
        want = brute(values, costs, budget)
        if want is None:
            with pytest.raises(InfeasibleBudgetError):
                solve_mckp(values, costs, budget, solver=solver)
            continue
        got = solve_mckp(values, costs, budget, solver=solver)
        assert got.value == pytest.approx(want[0], rel=1e-9, abs=1e-12), (values, costs, budget)
        assert got.cost <= budget + (0 if ints else 1e-9)
        assert got.solver == solver
        if ints:  # integer values: the optimum's ties are exact, so the chosen vector is defined
            assert got.choice == want[1], (values, costs, budget)


@pytest.mark.parametrize("solver", SOLVERS)
def test_ties_are_lexicographic_and_solver_independent(solver):
    rng = random.Random(7)
    for _ in range(150):  # values and costs in 0..3: ties everywhere
        values, costs, budget = instance(rng, ints=True, ties=True)
        want = brute(values, costs, budget)
        if want is None:
            continue
        got = solve_mckp(values, costs, budget, solver=solver)
        assert got.choice == want[1], (values, costs, budget)
        assert solve_mckp(values, costs, budget, solver=solver).choice == got.choice  # repeatable


@pytest.mark.parametrize("solver", SOLVERS)
def test_identical_groups_tie_keeps_the_first_groups_first_option(solver):
    # identical layers, budget for upgrading only some: the lexicographically smallest choice vector
    # keeps the earlier groups at their first option, so the upgrades go to the last groups
    values = [[5, 1], [5, 1], [5, 1]]
    costs = [[0, 10], [0, 10], [0, 10]]
    assert solve_mckp(values, costs, 10, solver=solver).choice == (0, 0, 1)
    assert solve_mckp(values, costs, 25, solver=solver).choice == (0, 1, 1)
    # equal values in one group: the first option (callers put the cheapest first)
    assert solve_mckp([[2, 2, 2]], [[1, 2, 3]], 3, solver=solver).choice == (0,)


@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_budget_is_named(solver):
    with pytest.raises(InfeasibleBudgetError, match=r"budget 9 is below the cheapest assignment's cost 10.*"
                                                    r"group 1 \(fc1\) 6"):
        solve_mckp([[1, 2], [1, 2]], [[4, 5], [6, 7]], 9, solver=solver, names=["qkv", "fc1"])
    # exactly at the cheapest assignment is feasible
    assert solve_mckp([[1, 2], [1, 2]], [[4, 5], [6, 7]], 10, solver=solver).choice == (0, 0)


def test_integer_costs_are_exact_at_large_magnitudes():
    big = 10 ** 12  # BitOps-sized: one unit over the budget must not pass as round-off
    values, costs = [[3.0, 1.0], [3.0, 1.0]], [[big, big + 1], [big, big + 1]]
    for solver in ["bnb"] + (["milp"] if milp_available() else []):
        assert solve_mckp(values, costs, 2 * big, solver=solver).choice == (0, 0)
        assert solve_mckp(values, costs, 2 * big + 1, solver=solver).choice == (0, 1)


def test_no_budget_picks_each_groups_minimum():
    values = [[3, 1, 2], [0.5, 0.5], [9]]
    got = solve_mckp(values, [[1, 2, 3], [1, 1], [1]], None)
    assert got.choice == (1, 0, 0) and got.value == 10.5 and got.solver == "bnb"


def test_negative_costs_express_a_minimum():
    # "sum of group sizes >= 190" as costs -g <= -190: (64, 128) 11, (128, 64) 8, (128, 128) 12
    sizes = [[32, 64, 128], [32, 64, 128]]
    values = [[1, 2, 3], [1, 5, 9]]
    for solver in ["bnb"] + (["milp"] if milp_available() else []):
        got = solve_mckp(values, [[-g for g in s] for s in sizes], -190, solver=solver)
        assert got.choice == (2, 1) and got.cost == -192 and got.value == 8


def test_bad_input_is_named():
    with pytest.raises(KnapsackError, match=r"group 1 \(b\): 2 values but 1 costs"):
        solve_mckp([[1], [1, 2]], [[1], [1]], 5, names=["a", "b"])
    with pytest.raises(KnapsackError, match="group 0 has no options"):
        solve_mckp([[]], [[]], 5)
    with pytest.raises(KnapsackError, match="finite"):
        solve_mckp([[float("nan")]], [[1]], 5)
    with pytest.raises(KnapsackError, match="no groups"):
        solve_mckp([], [], 5)
    with pytest.raises(KnapsackError, match="solver='x'"):
        solve_mckp([[1]], [[1]], 5, solver="x")
    with pytest.raises(KnapsackError, match="budget must be a finite number"):
        solve_mckp([[1]], [[1]], float("inf"))


def test_bnb_node_limit():
    rng = random.Random(0)
    values = [[rng.random() for _ in range(5)] for _ in range(30)]
    costs = [[rng.random() for _ in range(5)] for _ in range(30)]
    with pytest.raises(KnapsackTooLargeError, match="install scipy"):
        solve_mckp(values, costs, 12.0, solver="bnb", node_limit=50)


@pytest.mark.skipif(not milp_available(), reason="no scipy")
def test_milp_at_layer_scale_agrees_with_bnb():
    # 36 groups x 5 options (the embedded model's search): both solvers, same answer
    rng = random.Random(3)
    values = [sorted((rng.randint(1, 1000) for _ in range(5)), reverse=True) for _ in range(36)]
    costs = [sorted(rng.randint(0, 50) for _ in range(5)) for _ in range(36)]
    budget = sum(c[2] for c in costs)
    a = solve_mckp(values, costs, budget, solver="milp")
    b = solve_mckp(values, costs, budget, solver="bnb", node_limit=5_000_000)
    assert a.choice == b.choice and a.cost <= budget
