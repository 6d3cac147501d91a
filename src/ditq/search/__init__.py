"""Search over discrete per-layer choices, torch-free: `evolve` is the evolutionary engine of Q-DiT's
Algorithm 1 (memoised, checkpointed, resumable); `ditq.search.knapsack` solves the multiple-choice
knapsack. Wiring them to models (group sizes per layer, FID objective, BitOps constraint) lives in
the method steps that call them."""
from .evolution import (EvolutionConfig, EvolutionResult, GenerationStats, SearchCheckpointError, SearchError,
                        evolve, format_history)

__all__ = ["EvolutionConfig", "EvolutionResult", "GenerationStats", "SearchCheckpointError", "SearchError",
           "evolve", "format_history"]
