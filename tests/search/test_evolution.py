"""ditq.search.evolve: the evolutionary engine of Q-DiT's Algorithm 1 on toy objectives (no torch).

The toy problem is a separable quadratic over 10 genes with 5 choices each (5^10 ~ 1e7 genomes):
its optimum TARGET is unique, so "found the optimum" is a sharp check. Resume tests kill the search
with a private exception raised inside the objective, the cost or the constraint, rerun it with the
same arguments until it finishes, and compare with one uninterrupted run.
"""
import json
import math
import os
from dataclasses import asdict, replace

import pytest

from ditq.search import (EvolutionConfig, SearchCheckpointError, SearchError, evolve, format_history)

CHOICES = [list(range(5))] * 10
TARGET = tuple(i % 5 for i in range(10))
CFG = EvolutionConfig(population=20, top_k=5, mutations=10, crossovers=10, generations=20,
                      mutation_prob=0.1, seed=0, max_tries=200)
SMALL = replace(CFG, population=8, top_k=3, mutations=4, crossovers=4, generations=4)


def quad(g):
    return float(sum((a - b) ** 2 for a, b in zip(g, TARGET)))


class Killed(Exception):
    """Stands for the process being killed."""


class Counting:
    """quad with a call log; raises Killed on call number `kill_at` (1-based) if given."""

    def __init__(self, kill_at=None):
        self.calls, self.kill_at = [], kill_at

    def __call__(self, g):
        if self.kill_at is not None and len(self.calls) + 1 == self.kill_at:
            raise Killed
        self.calls.append(g)
        return quad(g)


def run(cfg=SMALL, objective=quad, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda s: None)
    return evolve(CHOICES, objective, cfg, **kw)


def strip(history):
    return [{k: v for k, v in asdict(h).items() if k != "seconds"} for h in history]


def test_finds_optimum_and_initial_genomes_come_first():
    init = [(0,) * 10, (4,) * 10]
    obj = Counting()
    r = run(CFG, obj, initial=init)
    assert r.best == TARGET and r.best_score == 0.0
    assert obj.calls[:2] == init                       # generation 0 starts with the initial genomes
    assert [h.generation for h in r.history] == list(range(CFG.generations))
    assert all(b >= a for a, b in zip([h.best for h in r.history][1:], [h.best for h in r.history]))


def test_memo_objective_called_once_per_distinct_genome():
    # 2^3 = 8 genomes, population 4, 6 generations: repeats are forced (fallback to visited children).
    cfg = EvolutionConfig(population=4, top_k=2, mutations=2, crossovers=2, generations=6, mutation_prob=0.5,
                          seed=3, max_tries=20)
    calls = []
    r = evolve([[0, 1]] * 3, lambda g: calls.append(g) or float(sum(g)), cfg, progress=False, log=lambda s: None)
    assert len(calls) == len(set(calls)) == len(r.scores) == r.evaluations <= 8
    assert sum(h.evaluated for h in r.history) == len(calls)
    assert sum(h.memo_hits for h in r.history) > 0
    assert r.best == (0, 0, 0)


def test_every_evaluated_genome_is_feasible():
    feasible = lambda g: None if sum(g) >= 25 else f"sum {sum(g)} < 25"   # excludes TARGET (sum 20)
    r = run(CFG, feasible=feasible)
    assert r.scores and all(feasible(g) is None for g in r.scores)
    assert sum(r.best) >= 25


def test_unsatisfiable_constraint_raises_before_any_objective_call():
    def objective(g):
        raise AssertionError("objective called")
    msg = r"no feasible genome in 1600 random draws \(last reason: never\).*unsatisfiable"
    with pytest.raises(SearchError, match=msg):
        run(objective=objective, feasible=lambda g: "never")


def test_no_feasible_child_raises_a_clear_error():
    # only the two (initial) parents are feasible; a crossover child is one of them with p = 2 * 2^-10
    pair = [(0,) * 10, (4,) * 10]
    cfg = replace(SMALL, population=2, top_k=2, max_tries=5)
    with pytest.raises(SearchError, match="generation 0: no feasible crossover child of the top-2 genomes in 5 "
                                          "draws: the constraint leaves no feasible candidate"):
        run(cfg, initial=pair, feasible=lambda g: None if g in pair else "no")


def test_initial_genomes_are_checked():
    with pytest.raises(ValueError, match="gene 3: 7 is not one of"):
        run(initial=[(0, 0, 0, 7, 0, 0, 0, 0, 0, 0)])
    with pytest.raises(ValueError, match="infeasible: too big"):
        run(initial=[(4,) * 10], feasible=lambda g: "too big" if sum(g) > 30 else None)
    with pytest.raises(ValueError, match="has 3 genes"):
        run(initial=[(0, 0, 0)])
    with pytest.raises(ValueError, match="repeats #0"):
        run(initial=[(0,) * 10, (0,) * 10])


def resume_until_done(path, make_objective, **kw):
    """Rerun until finished; returns (result, every objective call over all runs, number of kills)."""
    calls, kills = [], 0
    while True:
        obj = make_objective()
        try:
            r = run(CFG, obj, state_path=path, **kw)
            return r, calls + obj.calls, kills
        except Killed:
            calls += obj.calls
            kills += 1
            assert kills < 1000


@pytest.mark.parametrize("k", [1, 7, CFG.population, CFG.population + 1, 53])
def test_resume_after_kills_replays_the_uninterrupted_run(tmp_path, k):
    ref = run(CFG)
    path = tmp_path / "search.json"
    r, calls, kills = resume_until_done(path, lambda: Counting(kill_at=k + 1))
    assert kills > 0 and r.resumed
    assert (r.best, r.best_score) == (ref.best, ref.best_score)
    assert strip(r.history) == strip(ref.history)
    assert r.scores == ref.scores and list(r.scores) == list(ref.scores)
    assert len(calls) == len(set(calls)) == len(ref.scores)    # no memoised genome evaluated again


@pytest.mark.parametrize("where", ["cost", "feasible"])
def test_resume_after_kill_at_generation_boundary(tmp_path, where):
    """Killed after a generation's last evaluation but before its record (cost), or while breeding."""
    cost = lambda g: sum(g) / 10
    feasible = lambda g: None
    ref = run(CFG, cost=cost, feasible=feasible)
    n = {"calls": 0}

    def killer(f, at):
        def wrapped(g):
            n["calls"] += 1                        # counts over all reruns: each kill point fires once
            if n["calls"] in at:
                raise Killed
            return f(g)
        return wrapped
    kw = {"cost": killer(cost, range(30, 10**6, 97)), "feasible": feasible} if where == "cost" else \
         {"cost": cost, "feasible": killer(feasible, {30, 120, 400, 1000, 2500})}
    r, calls, kills = resume_until_done(tmp_path / "s.json", Counting, **kw)
    assert kills > 0
    assert (r.best, r.best_score) == (ref.best, ref.best_score)
    assert strip(r.history) == strip(ref.history)
    assert len(calls) == len(set(calls)) == len(ref.scores)


def test_state_is_saved_after_every_evaluation_and_finished_state_returns_at_once(tmp_path):
    path = tmp_path / "s.json"
    with pytest.raises(Killed):
        run(objective=Counting(kill_at=6), state_path=path)
    st = json.loads(path.read_text())
    assert len(st["memo"]) == 5 and st["generation"] == 0 and not st["done"]
    first = run(state_path=path)
    assert first.resumed and first.evaluations == len(first.scores) - 5

    def objective(g):
        raise AssertionError("objective called on a finished search")
    again = run(objective=objective, state_path=path)
    assert again.resumed and again.evaluations == 0
    assert (again.best, again.best_score, again.scores) == (first.best, first.best_score, first.scores)
    assert strip(again.history) == strip(first.history) == strip(run().history)


@pytest.mark.parametrize("change, named", [
    (dict(identity={"model": "DiT-S"}), "identity.model"),
    (dict(identity={"model": "DiT-XL", "bits": 4}), "identity.bits"),
    (dict(cfg=replace(SMALL, seed=1)), "config.seed"),
    (dict(choices=[list(range(5))] * 9 + [[0, 1, 2, 3, 5]]), r"choices \(gene 9"),
    (dict(choices=[list(range(5))] * 11), r"choices \(10 genes saved, 11 now\)"),
    (dict(initial=[(1,) * 10]), "initial"),
])
def test_state_of_another_search_is_refused(tmp_path, change, named):
    path = tmp_path / "s.json"
    run(state_path=path, identity={"model": "DiT-XL"})
    before = path.read_bytes()
    kw = dict(cfg=SMALL, identity={"model": "DiT-XL"}, choices=CHOICES, initial=()) | change
    with pytest.raises(SearchCheckpointError, match=named + ".*delete"):
        evolve(kw["choices"], quad, kw["cfg"], state_path=path, identity=kw["identity"], initial=kw["initial"],
               progress=False)
    assert path.read_bytes() == before


@pytest.mark.parametrize("text", ["{not json", '{"format": 1}', "", '{"format": 99}'])
def test_corrupt_state_is_refused_not_restarted(tmp_path, text):
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(SearchCheckpointError, match="s.json is unreadable or corrupt.*delete"):
        run(state_path=path)
    assert path.read_text() == text


def test_failed_write_leaves_the_old_state_intact(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    with pytest.raises(Killed):
        run(objective=Counting(kill_at=4), state_path=path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        run(state_path=path)                      # the first save (after one evaluation) fails midway
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["s.json"]     # no temporary file left behind
    r = run(state_path=path)
    assert strip(r.history) == strip(run().history)


@pytest.mark.parametrize("field, value, match", [
    ("population", 0, "search budget of zero"),
    ("generations", 0, "search budget of zero"),
    ("top_k", 9, r"top_k=9.*\[1, population=8\]"),
    ("top_k", 0, "top_k=0"),
    ("mutation_prob", 1.5, r"mutation_prob=1.5.*\[0, 1\]"),
    ("mutation_prob", math.nan, "mutation_prob=nan"),
    ("mutations", -1, "mutations=-1"),
    ("max_tries", 0, "max_tries=0"),
    ("seed", -1, "seed=-1"),
    ("population", 2.5, "population=2.5.*integer"),
])
def test_config_checks(field, value, match):
    cfg = replace(SMALL, **{field: value})
    with pytest.raises(ValueError, match=match):
        cfg.check()
    with pytest.raises(ValueError, match=match):
        run(cfg, objective=lambda g: pytest.fail("objective called"))


def test_nothing_to_breed_is_a_config_error():
    with pytest.raises(ValueError, match="mutations=crossovers=0"):
        replace(SMALL, mutations=0, crossovers=0).check()
    replace(SMALL, mutations=0, crossovers=0, generations=1).check()


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="gene 1"):
        evolve([[1, 2], [1, 1]], quad, SMALL)
    with pytest.raises(ValueError, match="gene 0.*bad"):
        evolve([[(1, 2)]], quad, SMALL)
    with pytest.raises(ValueError, match="choices is empty"):
        evolve([], quad, SMALL)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_objective_names_the_genome(tmp_path, bad):
    seen = []

    def objective(g):
        seen.append(g)
        return bad if len(seen) == 3 else quad(g)
    with pytest.raises(SearchError, match=r"objective returned (nan|inf) for genome \(.*non-finite") as e:
        run(objective=objective, state_path=tmp_path / "s.json")
    assert f"for genome {seen[2]}" in str(e.value)
    st = json.loads((tmp_path / "s.json").read_text())
    assert len(st["memo"]) == 2                   # the broken candidate is not ranked


def test_non_number_objective_is_refused():
    with pytest.raises(SearchError, match="not a number"):
        run(objective=lambda g: "oops")


def test_determinism_and_seed_dependence():
    a, b, c = run(CFG), run(CFG), run(replace(CFG, seed=1))
    assert strip(a.history) == strip(b.history) and list(a.scores) == list(b.scores)
    assert strip(a.history) != strip(c.history)


def test_log_table_progress_and_callback(capsys):
    lines, seen = [], []
    r = evolve(CHOICES, quad, SMALL, cost=lambda g: sum(g) / 10, log=lines.append, on_generation=seen.append,
               progress=True)
    assert seen == r.history
    table = [s for s in lines if not s.startswith("search:")]
    assert len(table) == 1 + SMALL.generations and table[0].split()[:2] == ["generation", "evaluated"]
    assert table[1].split()[0] == "0" and float(table[1].split()[5]) == r.history[0].best_cost
    assert "search generation" in capsys.readouterr().err    # the tqdm bar
    md = format_history(r.history).splitlines()
    assert md[0].startswith("| generation | evaluated | memo hits | best | mean | best cost | mean cost |")
    assert len(md) == 2 + SMALL.generations
    assert all(h.evaluated + h.memo_hits == SMALL.population for h in r.history)
