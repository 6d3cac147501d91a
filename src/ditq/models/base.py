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


def is_layer(mod: nn.Module) -> bool:
    """nn.Linear / nn.Conv2d, or a ditq quantized layer standing in for one."""
    return isinstance(mod, (nn.Linear, nn.Conv2d)) or getattr(type(mod), "wraps", None) in (nn.Linear, nn.Conv2d)


def assign_roles(module: nn.Module, patterns, where: str) -> list["LayerInfo"]:
    """LayerInfo of every layer of `module` by the first matching (regex, role) of `patterns`; a
    pattern's first group, when it is a number, is the block index. A layer no pattern matches is an
    error naming `where` (the patterns to extend), so a new architecture cannot skip layers silently."""
    found = []
    for name, mod in module.named_modules():
        if not is_layer(mod):
            continue
        for pattern, role in patterns:
            m = pattern.match(name)
            if m:
                first = m.group(1) if m.groups() else None
                found.append(LayerInfo(name=name, role=role, block=int(first) if first and first.isdigit() else None))
                break
        else:
            raise RuntimeError(f"layer {name} ({type(mod).__name__}) has no role; extend {where}")
    return found


def decode_uint8(x: torch.Tensor, vae, dtype: torch.dtype, vae_scale: float) -> torch.Tensor:
    """Sampled variable -> uint8 images: through the VAE (latent models) or as pixels in [-1, 1]."""
    if vae is not None:
        x = vae.decode(x.to(dtype) / vae_scale).sample.float()
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def read_scheduler_config(root, default: dict, places=("scheduler",)) -> dict:
    """The first `<root>/<place>/scheduler_config.json` that exists ("" = the root itself, as single-model
    hub repos keep it), without diffusers' private keys; else `default`."""
    import json
    from pathlib import Path

    for place in places if root is not None else ():
        path = Path(root) / place / "scheduler_config.json"
        if path.is_file():
            conf = json.loads(path.read_text())
            return {k: v for k, v in conf.items() if not k.startswith("_")}
    return dict(default)


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
    conditioning: str = "class"  # what `denoise`'s y indexes: "class" labels | "text" prompts | "none"
    num_classes: int
    null_class: int  # label index of the unconditional (cfg) embedding (class models)
    cfg_channels: int | None  # guidance on the first k output channels (None: all)

    @property
    def null_index(self) -> int | None:
        """The condition index of the unconditional branch (None: the model has none)."""
        if self.conditioning == "text":
            return -1
        return getattr(self, "null_class", None) if self.conditioning == "class" else None

    @property
    def conditions(self):
        """The run's `ditq.conditioning.Conditions` (seed -> condition index, index -> prompt/label).
        Class and unconditional models have a default; a text model's prompt set comes from the
        dataset (`set_conditions`, done by the pipeline)."""
        c = getattr(self, "_conditions", None)
        if c is not None:
            return c
        from ditq.conditioning import ClassConditions, NoConditions

        if self.conditioning == "class":
            return ClassConditions(self.num_classes, self.null_index)
        if self.conditioning == "none":
            return NoConditions()
        raise RuntimeError(f"{type(self).__name__} is text-conditional and has no prompt set yet: "
                           "adapter.set_conditions(ditq.data.prompts.build_conditions(dataset_cfg, adapter)) first")

    def set_conditions(self, conditions) -> None:
        if conditions.kind != self.conditioning:
            raise ValueError(f"{type(self).__name__} takes {self.conditioning} conditions, not {conditions.kind} ones "
                             "(the dataset's prompts/labels do not fit this model)")
        self._conditions = conditions

    # -- text-conditional models (conditioning == "text") ----------------------------------------
    def text_encoder(self):
        """The model's `ditq.conditioning.encoder.TextEncoder` (loaded on call; released by the caller)."""
        raise NotImplementedError(f"{type(self).__name__} is not a text-conditional model")

    def set_text_bank(self, bank) -> None:
        """The `TextBank` that `denoise` looks prompt indices up in."""
        raise NotImplementedError(f"{type(self).__name__} is not a text-conditional model")

    @abstractmethod
    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Noise prediction eps(x_t, t, y) with the shape of x (learned-variance channels dropped);
        y: condition indices [B] (`ditq.conditioning`: class labels, prompt indices, or zeros)."""

    @abstractmethod
    def layers(self) -> list[LayerInfo]:
        """Every quantizable layer (nn.Linear / nn.Conv2d) of the denoiser, with its role."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled variable -> images, uint8 NCHW: through the adapter's `vae` (scaled by `cfg.vae_scale`,
        run in `dtype`) for a latent model, as pixels in [-1, 1] when `vae` is None."""
        return decode_uint8(x, self.vae, self.dtype, self.cfg.vae_scale)

    @abstractmethod
    def fingerprint(self) -> dict:
        """A JSON-able identity of the weights (for cache keys)."""

    @abstractmethod
    def scheduler_config(self) -> dict:
        """The noise schedule the model was trained with (diffusers scheduler config)."""

    def blocks(self) -> list[nn.Module]:
        """The denoiser's transformer blocks in order (for block-wise calibration)."""
        return []

    def block_runner(self):
        """The segment-by-segment runner of the block-wise engine and AdaRound: `BlockRunner` for a
        chain of blocks; a model that is not a chain (U-Net skip stacks) returns its own."""
        from ditq.calibration.blocks import BlockRunner

        return BlockRunner(self)

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
