"""Q-DiT's group-size search (Alg. 1) as a step: one group size per quantized layer, the same on its
weights and its activations, chosen by an evolutionary search (`ditq.search.evolution`) that scores
each candidate by generating images and measuring their FID, under a cost constraint.

Settings come from the run's `search` group (conf/search/*.yaml, `SearchConfig`):
  genes        the plan's quantized layers with per-group weights (Q-DiT: qkv, proj, fc1, fc2)
  choices      search.choices; a choice wider than a layer is an error before any work
  constraint   bitops (default; BitOps incl. the per-group rescale work, ditq.methods.cost) or
               storage no more than the uniform plan at search.target_group_size (or search.max_bitops);
               mean_group_size >= target (the public code's); none
  candidate    the plan with those group sizes; weights rounded to nearest per group (search.weights=rtn,
               what the public search does) or by the method's other steps, e.g. GPTQ (weights=method)
  objective    FID of search.num_samples images of the search seeds against the FP model's images of
               the same seeds (fid_to_fp, paired) or against the dataset reference (fid, the paper's);
               the search seeds are disjoint from calibration, evaluation and held-out seeds
  result       the best plan replaces ctx.plan (later steps, e.g. GPTQ, quantize it), is written to
               <run dir>/searched_plan.yaml (`method.plan=<it>` builds the final model in a later run),
               and it and the uniform target plan are re-scored on held-out seeds
The search state (population, scores, RNG) is saved after every evaluation and generation under
search.state_file (default: <cache_dir>/search/<key>.json, keyed by everything the result depends on),
so a killed run resumes where it stopped and returns the same plan.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ditq.methods.base import QuantContext, Step
from ditq.methods.plan import PlanError, QuantPlan, weight_width

log = logging.getLogger(__name__)

SEARCH_VERSION = 1


class SearchError(PlanError):
    """Search settings that cannot work with this model or method."""


def search_layers(plan: QuantPlan) -> list[str]:
    """Quantized layers whose weights are quantized per group (Q-DiT's group layers)."""
    return [n for n, lp in plan.quantized().items()
            if lp.weight is not None and lp.weight.granularity == "per_group"]


def gene_groups(plan: QuantPlan, names: list[str]) -> list[list[str]]:
    """One gene per searched layer, except q, k and v of one attention (role qkv, same parent module):
    they read the same input and are one fused qkv linear in DiT, so they share one group size
    (Q-DiT's 4 layers per block: 112 genes for DiT-XL/2)."""
    genes: list[list[str]] = []
    qkv: dict[str, list[str]] = {}
    for n in names:
        if plan.layers[n].role == "qkv":
            parent = n.rsplit(".", 1)[0]
            if parent not in qkv:
                qkv[parent] = []
                genes.append(qkv[parent])
            qkv[parent].append(n)
        else:
            genes.append([n])
    return genes


def check_choices(plan: QuantPlan, names: list[str], choices: list[int]) -> None:
    if not names:
        raise SearchError("group_search: the plan has no layer with per-group weights to search over; use a "
                          "method with method.weight.granularity=per_group (e.g. method=qdit_search)")
    too_wide = [(n, weight_width(plan.layers[n].shape)) for n in names
                if max(choices) > weight_width(plan.layers[n].shape)]
    if too_wide:
        n, w = too_wide[0]
        raise SearchError(f"search.choices={list(choices)}: group size {max(choices)} does not fit layer {n} "
                          f"(input width {w}) and {len(too_wide) - 1} other layer(s); use choices <= the "
                          "narrowest searched layer's width (conf/search/embedded.yaml for the embedded models)")


class Candidates:
    """Plans and quantized layers of genomes (one group size per gene). The uniform plan of each
    group size is built once; a candidate's plan takes each layer's entry from the uniform plan of
    its size, and its layers get quantizers built and fitted once per (layer, size) and reused."""

    def __init__(self, base: QuantPlan, genes: list[list[str]], sizes: list[int]):
        self.base, self.genes = base, genes
        self.names = [n for gene in genes for n in gene]
        self.uniform: dict[int, QuantPlan] = {}
        for g in sizes:
            self.uniform_plan(g)
        self._quantizers: dict[tuple[str, int], tuple] = {}

    def uniform_plan(self, g: int) -> QuantPlan:
        if g not in self.uniform:
            self.uniform[g] = self.base.with_group_sizes({n: g for n in self.names})
        return self.uniform[g]

    def sizes(self, genome: tuple) -> dict[str, int]:
        return {n: g for gene, g in zip(self.genes, genome) for n in gene}

    def plan(self, genome: tuple, created_by: str) -> QuantPlan:
        layers = dict(self.base.layers)
        for n, g in self.sizes(genome).items():
            layers[n] = self.uniform_plan(g).layers[n]
        return dataclasses.replace(self.base, layers=layers, created_by=created_by)

    @torch.no_grad()
    def install(self, qlayers: dict, genome: tuple) -> None:
        """Quantize the searched layers as `genome` says: weights rounded to nearest per group,
        activations dynamic per token and group (nothing to fit)."""
        from ditq.methods.wrap import build_side

        for n, g in self.sizes(genome).items():
            q = qlayers[n]
            if (n, g) not in self._quantizers:
                lp = self.uniform_plan(g).layers[n]
                wq, aq = build_side(lp.weight, "weight"), build_side(lp.act, "act")
                if wq is not None:
                    wq.fit(q.weight.data)
                self._quantizers[n, g] = (wq, aq)
            q.weight_quantizer, q.act_quantizer = self._quantizers[n, g]
            q.weight_source = None
            q.refresh()


class Budget:
    """Per-gene costs of every choice (costs add over genes), the constraint, and its limit."""

    def __init__(self, candidates: Candidates, choices: list[int], adapter, search):
        from ditq.methods.cost import layer_costs, layer_tokens, shared_copies

        plan, genes = candidates.base, candidates.genes
        tokens = layer_tokens(adapter, plan.layers)
        copies = shared_copies(adapter, plan.layers)
        self.kind = search.constraint
        self.genes, self.choices = genes, list(choices)
        names = candidates.names
        key = {"bitops": "bitops", "storage": "storage_bits"}.get(self.kind)

        def per_gene(g: int) -> list[float]:
            rows = {r.name: r for r in layer_costs(candidates.uniform_plan(g), tokens, copies)}
            if key is None:  # mean group size over layers (the public code's), each layer counts once
                return [float(g * len(gene)) for gene in genes]
            return [float(sum(getattr(rows[n], key) for n in gene)) for gene in genes]

        self.table = {g: per_gene(g) for g in self.choices}  # choice -> per-gene cost
        target = search.target_group_size
        at_target = sum(per_gene(target)) if target not in self.table else sum(self.table[target])
        self.layers = len(names)
        if self.kind == "bitops":
            self.limit = float(search.max_bitops) if search.max_bitops is not None else at_target
        elif self.kind == "storage":
            self.limit = at_target
        elif self.kind == "mean_group_size":
            self.limit = float(target)
        else:
            self.limit = None

    def cost(self, genome: tuple) -> float:
        total = sum(self.table[g][i] for i, g in enumerate(genome))
        return total / self.layers if self.kind == "mean_group_size" else total

    def violation(self, genome: tuple) -> str | None:
        if self.limit is None:
            return None
        c = self.cost(genome)
        if self.kind == "mean_group_size":
            return None if c >= self.limit else f"mean group size {c:.4g} < {self.limit:.4g}"
        return None if c <= self.limit * (1 + 1e-12) else f"{self.kind} {c:.6g} > {self.limit:.6g}"


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class GroupSearch(Step):
    name = "group_search"

    def check_plan(self, run, adapter, plan) -> None:
        names = search_layers(plan)
        check_choices(plan, names, [int(c) for c in run.search.choices] + [int(run.search.target_group_size)])

    def apply(self, ctx: QuantContext) -> None:
        from ditq.methods.wrap import apply_plan
        from ditq.search.evolution import EvolutionConfig, evolve, format_history

        s, run = ctx.run.search, ctx.run
        if ctx.services is None or ctx.plan is None:
            raise SearchError("group_search needs the pipeline's services and plan (QuantContext.services / .plan)")
        base: QuantPlan = ctx.plan
        names = search_layers(base)
        choices = [int(c) for c in s.choices]
        check_choices(base, names, choices)
        genes = gene_groups(base, names)
        candidates = Candidates(base, genes, choices + [s.target_group_size])
        budget = Budget(candidates, choices, ctx.adapter, s)
        evo = EvolutionConfig(population=s.population, top_k=s.top_k, mutations=s.mutations,
                              mutation_prob=s.mutation_prob, crossovers=s.crossovers, generations=s.generations,
                              seed=s.seed)
        evo.check()
        target = tuple(s.target_group_size for _ in genes)
        initial = [target] if s.include_target and s.target_group_size in choices else []

        sv = ctx.services
        sampler = sv.sampler(s.cfg_scale, s.num_steps)
        seeds = list(range(s.seed_start, s.seed_start + s.num_samples))
        metric = s.objective
        fp = sv.fp_images(seeds, sampler) if metric == "fid_to_fp" else None
        method_steps = self._candidate_steps(ctx)

        def build(genome: tuple) -> QuantPlan:
            return candidates.plan(genome, f"group_search ({metric}, {s.constraint})")

        def quantize(genome: tuple) -> None:
            if method_steps:  # the method's own steps (e.g. GPTQ) on fresh quantizers of this plan
                apply_plan(ctx.qlayers, build(genome), rebuild=True)
                for step in method_steps:
                    step.apply(ctx)
            else:
                candidates.install(ctx.qlayers, genome)

        def objective(genome: tuple) -> float:
            quantize(genome)
            images = sv.generate(seeds, sampler, desc="search candidate")
            return float(sv.score(images, seeds, (metric,), fp=fp)[metric])

        identity = self._identity(ctx, base, genes, sampler, seeds)
        state = Path(s.state_file) if s.get("state_file") else \
            Path(run.paths.cache_dir) / "search" / f"{_digest(identity)[:24]}.json"
        t0 = time.perf_counter()
        result = evolve([choices] * len(genes), objective, evo, feasible=budget.violation, cost=budget.cost,
                        initial=initial, state_path=state, identity=identity, progress=ctx.progress,
                        log=log.info)
        seconds = time.perf_counter() - t0
        best = build(result.best)
        out_dir = Path(ctx.output_dir or ".")
        best.save(out_dir / "searched_plan.yaml")

        # re-score the chosen and the uniform target plan on held-out seeds (not used by the search)
        held = list(range(s.holdout_seed_start, s.holdout_seed_start + s.holdout_samples))
        held_fp = sv.fp_images(held, sampler)
        holdout = {}
        for label, genome in (("searched", result.best), ("target", target)):
            quantize(genome)
            images = sv.generate(held, sampler, desc=f"held-out {label}")
            holdout[label] = {**sv.score(images, held, (metric, "psnr") if metric == "fid_to_fp" else (metric,),
                                         fp=held_fp),
                              "cost": budget.cost(genome)}
        ctx.diagnostics["group_search"] = {
            "objective": metric, "constraint": s.constraint, "limit": budget.limit,
            "layers": len(names), "genes": len(genes), "choices": choices, "evaluations": result.evaluations,
            "resumed": result.resumed, "seconds": round(seconds, 1), "state_file": str(state),
            "plan_file": str((out_dir / "searched_plan.yaml").resolve()),
            "best": {"score": result.best_score, "cost": budget.cost(result.best),
                     "group_sizes": candidates.sizes(result.best)},
            "target": {"score": result.scores.get(target), "cost": budget.cost(target)},
            "holdout": holdout,
            "history": [{k: v for k, v in vars(h).items() if k != "best_genome"} for h in result.history],
        }
        log.info("group_search: %d evaluations in %.0f s\n%s", result.evaluations, seconds,
                 format_history(result.history))
        # the final model: fresh quantizers for the chosen plan; the method's later steps fit them
        ctx.plan = best
        apply_plan(ctx.qlayers, best, rebuild=True)

    @staticmethod
    def _candidate_steps(ctx: QuantContext) -> list:
        """The method's own steps after group_search, run per candidate when search.weights=method."""
        from ditq.methods.registry import build_steps

        if ctx.run.search.weights != "method":
            return []
        specs = [dict(spec) for spec in ctx.run.method.steps]
        later = [spec for spec in specs[[sp["name"] for sp in specs].index("group_search") + 1:]]
        return build_steps(later)

    @staticmethod
    def _identity(ctx: QuantContext, base: QuantPlan, genes: list[list[str]], sampler, seeds: list[int]) -> dict:
        """Everything a search result depends on; a state file made under another identity is refused."""
        s = OmegaConf.to_container(ctx.run.search, resolve=True)
        s.pop("state_file", None)
        s.pop("holdout_samples", None)
        s.pop("holdout_seed_start", None)
        ident = {"v": SEARCH_VERSION, "model": ctx.services.model_fp, "plan": base.digest(), "genes": genes,
                 "search": s, "sampler": OmegaConf.to_container(sampler.cfg, resolve=True),
                 "seeds": [seeds[0], len(seeds)], "labels": ctx.run.eval.labels,
                 "dtype": ctx.run.dtype_inference, "feature_net": ctx.run.eval.feature_net}
        if ctx.run.search.weights == "method":  # candidates depend on the method's steps and calibration
            ident["steps"] = OmegaConf.to_container(ctx.run.method.steps, resolve=True)
            ident["calib"] = OmegaConf.to_container(ctx.run.calib, resolve=True)
        return ident
