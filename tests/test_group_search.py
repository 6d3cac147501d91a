"""Q-DiT's group-size search as a pipeline step (ditq.methods.group_search): the cost budget, the
search inside a run, its plan file, resume after a kill, and bad input."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ditq.config import validate_config
from ditq.config.schema import ConfigError
from ditq.methods.cost import layer_tokens, plan_cost, shared_copies
from ditq.methods.group_search import Budget, Candidates, SearchError, check_choices, gene_groups, search_layers
from ditq.methods.plan import QuantPlan
from tests.helpers import run_pipeline

# a search that runs in seconds: 2 generations of 4 candidates, 20 images each
SMALL = ["method=qdit_search", "search=embedded", "bits=w4a8", "search.population=4", "search.top_k=2",
         "search.mutations=2", "search.crossovers=2", "search.generations=2", "search.num_samples=20",
         "search.holdout_samples=20", "diagnostics.enabled=false"]


@pytest.fixture(scope="module")
def make_cfg():
    from hydra import compose, initialize_config_dir

    from ditq.paths import config_dir
    from tests.conftest import SHRINK

    def make(*overrides, shrink=True):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return validate_config(compose("config", overrides=(SHRINK if shrink else []) + list(overrides)))

    return make


@pytest.fixture(scope="module")
def adapter(make_cfg):
    from ditq.models import load_adapter

    return load_adapter(make_cfg("method=qdit").model)


def test_budget_costs_add_up_to_the_plan_cost(make_cfg, adapter):
    run = make_cfg(*SMALL)
    base = QuantPlan.from_run(run, adapter)
    names = search_layers(base)
    assert len(names) == 6 * 6  # q, k, v, proj, fc1, fc2 of 6 blocks
    genes = gene_groups(base, names)  # q, k and v share one group size (one fused qkv in DiT)
    assert len(genes) == 6 * 4 and genes[0] == [f"transformer_blocks.0.attn1.to_{c}" for c in "qkv"]
    candidates = Candidates(base, genes, [8, 16, 32, 64, 128])
    budget = Budget(candidates, [8, 16, 32, 64, 128], adapter, run.search)
    tokens, copies = layer_tokens(adapter, base.layers), shared_copies(adapter, base.layers)
    rng = random.Random(0)
    target = tuple([32] * len(genes))

    def sizes(g):
        return {n: s for gene, s in zip(genes, g) for n in gene}

    for g in [(8,) * len(genes), (16, 128) * (len(genes) // 2)]:  # a candidate's plan = with_group_sizes
        assert candidates.plan(g, "t") == base.with_group_sizes(sizes(g))
    full = {g: plan_cost(base.with_group_sizes(sizes(g)), tokens, copies)["bitops"]
            for g in [target] + [tuple(rng.choice([8, 16, 32, 64, 128]) for _ in genes) for _ in range(3)]}
    for g, bitops in full.items():  # the genes' costs differ from the whole plan's by a constant
        assert budget.cost(g) - budget.cost(target) == pytest.approx(bitops - full[target], rel=1e-12)
    assert budget.limit == budget.cost(target)
    assert budget.violation(target) is None
    assert budget.violation(tuple([8] * len(genes))) is not None  # finer groups cost more BitOps
    assert budget.violation(tuple([128] * len(genes))) is None
    mean = Budget(candidates, [8, 16, 32, 64, 128], adapter, make_cfg(*SMALL, "search.constraint=mean_group_size").search)
    assert mean.violation(target) is None and "mean group size" in mean.violation(tuple([16] * len(genes)))
    # the public code's mean is over layers: q, k and v count three times
    mixed = tuple([16] + [32] * (len(genes) - 1))
    assert mean.cost(mixed) == pytest.approx((3 * 16 + 33 * 32) / 36)


def test_choices_wider_than_a_layer_are_refused(make_cfg, adapter):
    base = QuantPlan.from_run(make_cfg(*SMALL), adapter)
    with pytest.raises(SearchError, match=r"group size 288 does not fit layer .*input width 128"):
        check_choices(base, search_layers(base), [32, 64, 128, 192, 288])


@pytest.mark.parametrize("override, match", [
    ("search.generations=0", "search budget of zero"),
    ("search.population=0", "search budget of zero"),
    ("search.num_samples=0", "search budget of zero"),
    ("search.choices=[]", "distinct positive group sizes"),
    ("search.constraint=flops", "search.constraint='flops' is not valid"),
    ("search.objective=lpips", "search.objective='lpips' is not valid"),
    ("search.seed_start=0", "search seeds .* overlap eval seeds"),
    ("search.top_k=9", "search.top_k=9 > search.population=4"),
])
def test_bad_search_settings_fail_before_any_work(make_cfg, override, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(*SMALL, override)


def _search_run(compose, paths, tmp, *extra):
    return run_pipeline(compose, SMALL + paths + list(extra), tmp)


def test_search_in_a_run_writes_a_plan_that_rebuilds_the_model(compose, paths, tmp_path):
    row = _search_run(compose, paths, tmp_path / "a")
    gs = row["diagnostics"]["group_search"]
    assert gs["evaluations"] >= 4 and len(gs["history"]) == 2 and not gs["resumed"]
    assert gs["best"]["cost"] <= gs["limit"] and gs["best"]["score"] <= gs["target"]["score"]  # target is a candidate
    assert set(gs["holdout"]) == {"searched", "target"} and all(v["fid_to_fp"] >= 0 for v in gs["holdout"].values())
    plan_file = Path(gs["plan_file"])
    sizes = gs["best"]["group_sizes"]
    text = plan_file.read_text()
    assert "group_search" in text
    # the row records the searched plan, with per-layer group sizes on both sides
    searched = QuantPlan.load(plan_file)
    assert row["plan"]["sha256"] == searched.digest()
    for name, g in sizes.items():
        assert searched.layers[name].weight.group_size == g == searched.layers[name].act.group_size
    # a later run builds the final model from the plan file, without searching
    again = run_pipeline(compose, ["method=qdit", "bits=w4a8", f"method.plan={plan_file}",
                                   "diagnostics.enabled=false"] + paths, tmp_path / "b")
    assert again["plan"]["sha256"] == searched.digest() and "group_search" not in again["diagnostics"]


def test_killed_search_resumes_to_the_same_plan(compose, paths, tmp_path, monkeypatch):
    from ditq.methods.services import RunServices

    whole = _search_run(compose, paths, tmp_path / "whole", "search.state_file=" + str(tmp_path / "whole.json"))
    calls = {"n": 0}
    generate = RunServices.generate

    class Killed(Exception):
        pass

    def dying(self, seeds, sampler=None, desc="candidate"):
        calls["n"] += 1
        if calls["n"] == 6:  # mid second generation
            raise Killed
        return generate(self, seeds, sampler, desc)

    state = tmp_path / "killed.json"
    monkeypatch.setattr(RunServices, "generate", dying)
    with pytest.raises(Killed):
        _search_run(compose, paths, tmp_path / "k1", f"search.state_file={state}")
    monkeypatch.setattr(RunServices, "generate", generate)
    assert json.loads(state.read_text())  # a complete state file was left behind
    resumed = _search_run(compose, paths, tmp_path / "k2", f"search.state_file={state}")
    a, b = whole["diagnostics"]["group_search"], resumed["diagnostics"]["group_search"]
    assert b["resumed"] and b["best"] == a["best"]
    assert [h["best"] for h in b["history"]] == [h["best"] for h in a["history"]]
    assert resumed["plan"]["sha256"] == whole["plan"]["sha256"]


def test_state_file_of_another_config_is_refused(compose, paths, tmp_path):
    from ditq.search.evolution import SearchCheckpointError

    state = tmp_path / "state.json"
    _search_run(compose, paths, tmp_path / "a", f"search.state_file={state}")
    with pytest.raises(SearchCheckpointError, match="state"):
        _search_run(compose, paths, tmp_path / "b", f"search.state_file={state}", "search.seed=7")
