"""Shared fixtures: offline environment, composed configs shrunk to seconds."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs property tests with a fixed derandomized seed (reproducible); locally they explore.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Overrides that shrink any run on the embedded model to a few seconds (the notebooks' QUICK).
from ditq.analysis.embedded import QUICK  # noqa: E402

SHRINK = list(QUICK)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    on busy shared cores it avoids OpenMP spin contention (~20x) and keeps timings steady."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def paths(tmp_path):
    """Overrides sending the cache and the results store to a temporary directory."""
    return [f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results"]


@pytest.fixture
def tmp_paths(tmp_path):
    """Overrides sending cache, results and outputs to a temporary directory."""
    return [
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.results_dir={tmp_path}/results",
        f"hydra.run.dir={tmp_path}/run",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]


@pytest.fixture
def compose():
    """compose(overrides) -> the composed (unvalidated) Hydra config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import ditq.config  # noqa: F401  (registers resolvers)
    from ditq.paths import config_dir

    def _compose(overrides=(), return_hydra_config=False):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)

    return _compose
