"""Batched generation with one RNG per sample (image i depends only on seed i)."""
from ditq.sampling.sampler import Sampler  # noqa: F401
from ditq.sampling.seeds import labels_for_seeds, noise_for_seeds  # noqa: F401
