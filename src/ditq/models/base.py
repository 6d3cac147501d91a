"""The interface every model adapter implements.

An adapter owns the denoiser (the network that is quantized), the conditioning convention,
and the decoder from the model's space to images. It names the quantizable layers by role
(qkv, proj, fc1, fc2, adaln, embed, final, ...) so that methods select layers by config.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn as nn


class MissingCheckpointError(FileNotFoundError):
    """Weights that are neither on disk nor reachable; the message says what to download and where."""


@dataclass(frozen=True)
class LayerInfo:
    name: str  # dotted module path inside `adapter.denoiser`
    role: str  # one of ditq.config.schema.LAYER_ROLES
    block: int | None  # transformer block index, None outside the blocks


class ModelAdapter(ABC):
    denoiser: nn.Module
    latent_shape: tuple[int, int, int]  # (C, H, W) of the sampled variable
    num_classes: int
    null_class: int  # label index of the unconditional (cfg) embedding
    cfg_channels: int | None  # guidance on the first k output channels (None: all)

    @abstractmethod
    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Noise prediction eps(x_t, t, y) with the shape of x (learned-variance channels dropped)."""

    @abstractmethod
    def layers(self) -> list[LayerInfo]:
        """Every quantizable layer (nn.Linear / nn.Conv2d) of the denoiser, with its role."""

    @abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled variable -> images, uint8 NCHW."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """A JSON-able identity of the weights (for cache keys)."""

    @abstractmethod
    def scheduler_config(self) -> dict:
        """The noise schedule the model was trained with (diffusers scheduler config)."""

    def blocks(self) -> list[nn.Module]:
        """The denoiser's transformer blocks in order (for block-wise calibration)."""
        return []

    # -- block-wise calibration (ditq.calibration.blocks); a chain-structured model implements these
    def pre_block_layers(self) -> list[str]:
        """Layers outside the blocks that run before the first block (e.g. the patch embedding)."""
        return []

    def block_tail(self, hidden: torch.Tensor, call) -> torch.Tensor:
        """The denoiser's output (as `denoise` returns it) from the last block's hidden states and
        the captured `BlockCall`."""
        raise NotImplementedError(f"{type(self).__name__} does not support block-wise calibration")

    def conditioning_layers(self) -> dict[str, object]:
        """Layers whose input depends only on the condition (t, y), mapped to their segment (a
        block index or "tail"): their statistics come from the grid of all conditions."""
        return {}

    def conditioning_inputs(self, segment, t: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inputs ([B, C]) of the conditioning-only layers of `segment` for conditions (t, y)."""
        raise NotImplementedError(f"{type(self).__name__} has no conditioning-only layers")

    def parameter_bits(self, bits_of: dict[str, float]) -> float:
        """Total weight storage in bits; `bits_of` maps layer names to bits per weight
        (quantized layers); every other parameter counts at 32 bits. Shared copies count once."""
        modules = dict(self.denoiser.named_modules())
        bpw = {id(modules[name].weight): b for name, b in bits_of.items()}
        return float(sum(p.numel() * bpw.get(id(p), 32.0) for p in self.unique_parameters()))

    def unique_parameters(self) -> list[nn.Parameter]:
        """Parameters with copies holding identical values counted once."""
        return list(self.denoiser.parameters())
