"""Evolutionary search over discrete genomes: the engine of Q-DiT's Algorithm 1, generic and torch-free.

Algorithm (Q-DiT Sec. 3.4, Alg. 1; the loop is the SPOS-style search its public code derives from):
  * a genome is a tuple with one value per gene, each from that gene's `choices` (Q-DiT: a group size
    per layer). Lower objective is better (Q-DiT: FID of a few hundred samples, eq. 2); `feasible`
    is the constraint (Q-DiT: B(g) <= N_bitops, eq. 3) and returns None or the reason it fails;
  * initial population: the caller's `initial` genomes (e.g. the uniform plan), then random,
    distinct, feasible genomes up to `population` (N_p);
  * for each of `generations` (N_iter) populations: evaluate every genome (memoised: the objective
    is called once per distinct genome over the whole search), take the top-k over ALL genomes
    evaluated so far (ties by gene-choice indices), then breed the next population as in Alg. 1:
    `crossovers` children (two distinct top-k parents, each gene from either with probability 1/2),
    then `mutations` children (one top-k parent, each gene redrawn uniformly from its choices with
    probability `mutation_prob`). A child is kept only if feasible and not visited (evaluated, or
    already in the next population); after `max_tries` failed draws a feasible visited child is
    kept (logged), and if none is feasible the search stops with SearchError. When crossovers +
    mutations < population the rest is random, as in SPOS's `get_random`;
  * result: the best genome ever evaluated. All randomness comes from one numpy PCG64 Generator
    seeded by `cfg.seed`.
What the public code (Juanerx/Q-DiT) got wrong: its loop calls `update_top_k`, which is defined
nowhere, so the search dies after the first population and never breeds; it also does mutation
before crossover (SPOS order) where Alg. 1 does crossover first (followed here).

Checkpoints: with `state_path`, a JSON state (caller's `identity`, the config, the choices, `initial`,
the current population, the memo with each genome's generation of first evaluation, the history and
the RNG state) is written atomically after the initial population is drawn, after every objective
call and after every generation. Evaluation uses no randomness, so a search killed anywhere and rerun
with the same arguments replays exactly: same best, scores and history (`seconds` aside), and no
memoised genome is evaluated again. A state of another search, or a corrupt one, raises
SearchCheckpointError; a finished state returns its result at once. `feasible`, `objective` and
`cost` cannot be compared: put what defines them (model, constraint, FID setup) into `identity`.
Gene values must be JSON scalars (int, float, str, bool, None) so that genomes survive the round trip.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ditq.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)
_FORMAT = 1
COLUMNS = ("generation", "evaluated", "memo hits", "best", "mean", "best cost", "mean cost", "seconds")


class SearchError(ValueError):
    """The search cannot go on: unsatisfiable constraint, non-finite objective value, bad input."""


class SearchCheckpointError(SearchError):
    """The file at state_path is unreadable, corrupt, or the state of another search."""


@dataclass
class EvolutionConfig:
    population: int = 50      # N_p: genomes in the initial population (and the random fill-up)
    top_k: int = 10           # parents are drawn from the best top_k genomes evaluated so far
    mutations: int = 25       # children by mutation per generation
    mutation_prob: float = 0.1
    crossovers: int = 25      # children by crossover per generation
    generations: int = 10     # N_iter: populations evaluated
    seed: int = 0
    max_tries: int = 2000     # draws for one feasible, unvisited genome before giving up on novelty

    def check(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            ok = isinstance(v, (int, float)) if f.name == "mutation_prob" else isinstance(v, int)
            if not ok or isinstance(v, bool):
                raise ValueError(f"EvolutionConfig.{f.name}={v!r}: must be a number" +
                                 ("" if f.name == "mutation_prob" else " (an integer)"))
        if self.population <= 0 or self.generations <= 0:
            raise ValueError(f"EvolutionConfig: search budget of zero (population={self.population}, "
                             f"generations={self.generations}); set both to at least 1")
        if not 1 <= self.top_k <= self.population:
            raise ValueError(f"EvolutionConfig.top_k={self.top_k}: must be in [1, population={self.population}]")
        for name in ("mutations", "crossovers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvolutionConfig.{name}={getattr(self, name)}: must be >= 0")
        if self.generations > 1 and self.mutations + self.crossovers == 0:
            raise ValueError(f"EvolutionConfig: mutations=crossovers=0 breed nothing for generations="
                             f"{self.generations}; set mutations or crossovers >= 1, or generations=1")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise ValueError(f"EvolutionConfig.mutation_prob={self.mutation_prob}: must be in [0, 1]")
        if self.max_tries < 1:
            raise ValueError(f"EvolutionConfig.max_tries={self.max_tries}: must be >= 1")


@dataclass
class GenerationStats:
    generation: int
    evaluated: int            # genomes of this population evaluated for the first time (objective calls)
    memo_hits: int            # genomes of this population already in the memo
    best: float               # best score over ALL genomes evaluated so far
    mean: float               # mean score over this population
    best_genome: tuple
    best_cost: float | None   # cost(best_genome), None without `cost`
    mean_cost: float | None   # mean cost over this population
    seconds: float


@dataclass
class EvolutionResult:
    best: tuple
    best_score: float
    history: list[GenerationStats]
    scores: dict[tuple, float]  # every genome evaluated (the memo), in order of first evaluation
    evaluations: int            # objective calls made by THIS call (0 when a finished state is rerun)
    resumed: bool               # a state file was loaded


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def _row(s: GenerationStats) -> list[str]:
    return [_fmt(v) for v in (s.generation, s.evaluated, s.memo_hits, s.best, s.mean, s.best_cost,
                              s.mean_cost)] + [f"{s.seconds:.1f}"]


def format_history(history: Sequence[GenerationStats]) -> str:
    """The per-generation table as Markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(_row(s)) + " |" for s in history])


def _check_choices(choices: Sequence[Sequence]) -> tuple[tuple, ...]:
    out = []
    if len(choices) == 0:
        raise ValueError("evolve: choices is empty; give one list of allowed values per gene")
    for i, c in enumerate(choices):
        c = tuple(v.item() if isinstance(v, np.generic) else v for v in c)
        bad = [v for v in c if not (v is None or isinstance(v, (int, str)) or
                                   (isinstance(v, float) and math.isfinite(v)))]
        if not c or bad or len(set(c)) != len(c):
            raise ValueError(f"evolve: choices of gene {i} = {list(c)!r} must be a non-empty list of distinct "
                             f"JSON scalars (int, finite float, str, bool, None)" + (f"; bad: {bad!r}" if bad else ""))
        out.append(c)
    return tuple(out)


def _jsonable(x: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(x, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"evolve: {what} must be JSON-serialisable ({e})") from e


def _load(path: Path, meta: dict) -> dict:
    fix = f"delete {path} to start the search over, or point state_path elsewhere"
    try:
        st = json.loads(path.read_text())
        if st.get("format") != _FORMAT:
            raise ValueError(f"format {st.get('format')!r}, expected {_FORMAT}")
        saved = {k: st[k] for k in meta}
        if not (isinstance(saved["identity"], dict) and isinstance(saved["config"], dict)):
            raise ValueError("identity and config must be JSON objects")
        st["population"] = [tuple(g) for g in st["population"]]
        st["memo"] = [(tuple(g), float(s), int(b)) for g, s, b in st["memo"]]
        st["history"] = [GenerationStats(**{**h, "best_genome": tuple(h["best_genome"])}) for h in st["history"]]
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = st["rng"]
        st["rng"], gen, done, secs = rng, int(st["generation"]), bool(st["done"]), float(st["partial_seconds"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise SearchCheckpointError(f"search state {path} is unreadable or corrupt ({e}); {fix}") from e
    diff = [f"identity.{k}" for k in sorted(set(saved["identity"]) | set(meta["identity"]), key=str)
            if saved["identity"].get(k, ...) != meta["identity"].get(k, ...)]
    diff += [f"config.{k}" for k in meta["config"] if saved["config"].get(k) != meta["config"][k]]
    diff += ["initial"] * (saved["initial"] != meta["initial"])
    if saved["choices"] != meta["choices"]:
        a, b = saved["choices"], meta["choices"]
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        diff.append(f"choices ({len(a)} genes saved, {len(b)} now)" if i is None else
                    f"choices (gene {i}: {a[i]} saved, {b[i]} now)")
    if diff:
        raise SearchCheckpointError(f"search state {path} belongs to another search: {', '.join(diff)} "
                                    f"differ(s); {fix}")
    return st


def evolve(choices: Sequence[Sequence], objective: Callable[[tuple], float], cfg: EvolutionConfig, *,
           feasible: Callable[[tuple], str | None] | None = None,
           cost: Callable[[tuple], float] | None = None,
           initial: Sequence[tuple] = (),
           state_path: str | Path | None = None, identity: dict | None = None,
           on_generation: Callable[[GenerationStats], None] | None = None,
           progress: bool = True, log: Callable[[str], None] | None = None) -> EvolutionResult:
    """Minimise `objective` over genomes; see the module docstring. `log` defaults to this module's
    logger (info); `on_generation` is called after each generation's state is saved."""
    cfg.check()
    choices = _check_choices(choices)
    log = log or logger.info
    feasible = feasible or (lambda g: None)
    n, sizes = len(choices), np.array([len(c) for c in choices])
    index = [{v: j for j, v in enumerate(c)} for c in choices]
    meta = {"identity": _jsonable(identity or {}, "identity"), "config": _jsonable(asdict(cfg), "config"),
            "choices": _jsonable([list(c) for c in choices], "choices")}
    init: list[tuple] = []
    for k, g in enumerate(initial):
        if len(g) != n:
            raise ValueError(f"evolve: initial genome #{k} has {len(g)} genes, choices has {n}")
        for i, v in enumerate(g):
            if v not in index[i]:
                raise ValueError(f"evolve: initial genome #{k}, gene {i}: {v!r} is not one of {list(choices[i])}")
        g = tuple(choices[i][index[i][v]] for i, v in enumerate(g))
        if (why := feasible(g)) is not None:
            raise ValueError(f"evolve: initial genome #{k} is infeasible: {why}")
        if g in init:
            raise ValueError(f"evolve: initial genome #{k} repeats #{init.index(g)}; pass each genome once")
        init.append(g)
    if len(init) > cfg.population:
        raise ValueError(f"evolve: {len(init)} initial genomes > population={cfg.population}; raise population")

    meta["initial"] = [list(g) for g in init]
    path = Path(state_path) if state_path is not None else None
    st = _load(path, meta) if path is not None and path.exists() else None
    if st is not None:
        pop, rng, gen, done, partial = st["population"], st["rng"], st["generation"], st["done"], st["partial_seconds"]
        scores = {g: s for g, s, _ in st["memo"]}
        born = {g: b for g, _, b in st["memo"]}
        history = st["history"]
    else:
        rng, gen, done, partial = np.random.Generator(np.random.PCG64(cfg.seed)), 0, False, 0.0
        scores, born, history = {}, {}, []

    def save() -> None:
        if path is not None:
            atomic_write_text(path, json.dumps({
                "format": _FORMAT, **meta, "generation": gen, "done": done, "partial_seconds": partial,
                "population": [list(g) for g in pop], "memo": [[list(g), scores[g], born[g]] for g in scores],
                "history": [{**asdict(h), "best_genome": list(h.best_genome)} for h in history],
                "rng": rng.bit_generator.state}))

    def fill(out: list[tuple], visited: set) -> str | None:
        """Append random feasible unvisited genomes up to `population`; returns the last rejection reason."""
        reason, tries = None, cfg.max_tries * (cfg.population - len(out))
        while len(out) < cfg.population and tries > 0:
            tries -= 1
            g = tuple(choices[i][j] for i, j in enumerate(rng.integers(0, sizes)))
            if (why := feasible(g)) is not None:
                reason = why
            elif g not in visited:
                out.append(g)
                visited.add(g)
        return reason

    def order(g: tuple) -> tuple:
        return scores[g], tuple(index[i][v] for i, v in enumerate(g))

    def breed(top: list[tuple]) -> list[tuple]:
        out, visited, repeats = [], set(scores), 0

        def cross() -> tuple:
            a, b = rng.choice(len(top), 2, replace=False) if len(top) > 1 else (0, 0)
            pick = rng.random(n) < 0.5
            return tuple(top[b][i] if pick[i] else top[a][i] for i in range(n))

        def mutate() -> tuple:
            p, m, new = top[rng.integers(len(top))], rng.random(n) < cfg.mutation_prob, rng.integers(0, sizes)
            return tuple(choices[i][new[i]] if m[i] else p[i] for i in range(n))

        for kind, make, count in (("crossover", cross, cfg.crossovers), ("mutation", mutate, cfg.mutations)):
            for _ in range(count):
                child, fallback = None, None
                for _ in range(cfg.max_tries):
                    g = make()
                    if feasible(g) is None:
                        if g not in visited:
                            child = g
                            break
                        fallback = fallback or g
                if child is None and fallback is None:
                    raise SearchError(f"generation {gen}: no feasible {kind} child of the top-{len(top)} genomes in "
                                      f"{cfg.max_tries} draws: the constraint leaves no feasible candidate; "
                                      f"loosen it or raise max_tries")
                repeats += child is None
                out.append(child or fallback)
                visited.add(out[-1])
        if repeats:
            log(f"search: generation {gen + 1} repeats {repeats} visited genome(s): no novel feasible child "
                f"in max_tries={cfg.max_tries} draws")
        fill(out, visited)
        return out

    if st is None:
        pop = list(init)
        reason = fill(pop, set(pop))
        if not pop:
            raise SearchError(f"evolve: no feasible genome in {cfg.max_tries * cfg.population} random draws "
                              f"(last reason: {reason}): the constraint looks unsatisfiable; loosen it, or pass "
                              f"a feasible genome in `initial`")
        if len(pop) < cfg.population:
            log(f"search: only {len(pop)} distinct feasible genomes found for a population of {cfg.population}")
        save()

    calls, header, widths = 0, False, [max(len(c), 10) for c in COLUMNS]
    while not done:
        t0 = time.perf_counter() - partial
        with tqdm(pop, desc=f"search generation {gen}", unit="genome", disable=not progress, leave=False) as bar:
            for g in bar:
                if g in scores:
                    continue
                value = objective(g)
                try:
                    s = float(value)
                except (TypeError, ValueError) as e:
                    raise SearchError(f"objective returned {value!r}, not a number, for genome {g}") from e
                calls += 1
                if not math.isfinite(s):
                    raise SearchError(f"objective returned {s} for genome {g}: a non-finite score means a "
                                      f"broken candidate; fix the objective (it is not ranked)")
                scores[g], born[g], partial = s, gen, time.perf_counter() - t0
                save()
        top = sorted(scores, key=order)[:cfg.top_k]
        new = len({g for g in pop if born[g] == gen})
        stats = GenerationStats(gen, new, len(pop) - new, scores[top[0]], float(np.mean([scores[g] for g in pop])),
                                top[0], None if cost is None else float(cost(top[0])),
                                None if cost is None else float(np.mean([cost(g) for g in pop])),
                                time.perf_counter() - t0)
        history.append(stats)
        if gen + 1 < cfg.generations:
            pop, gen = breed(top), gen + 1
        else:
            done = True
        partial = 0.0
        save()
        if not header:
            header = True
            log("  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths)))
        log("  ".join(v.rjust(w) for v, w in zip(_row(stats), widths)))
        if on_generation is not None:
            on_generation(stats)
    best = min(scores, key=order)
    log(f"search: best {scores[best]:.6g} over {len(scores)} genomes ({calls} objective calls in this run)")
    return EvolutionResult(best, scores[best], list(history), dict(scores), calls, st is not None)
