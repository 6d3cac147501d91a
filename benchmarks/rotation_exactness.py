"""How exact HQ-DiT's rotations are: the rotated full-precision model against the original.

For the embedded digits DiT (every online rotation of `conf/method/hqdit.yaml` plus adaLN, and the
per-head V/proj rotations) and for one DiT-XL/2 block with random weights (hidden 1152 = 36 x 32,
heads of 72, MLP 4608 = 36 x 128: the non-power-of-two Hadamard orders), it prints the max |difference|
relative to max |output| between the rotated and the original model, in float32 and in float64, next
to the float32 rounding level of the original itself (its float32 output against its float64 output).
"Exact to float32 rounding" means the first column is of the order of the last.

    python benchmarks/rotation_exactness.py
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ditq.methods.options import RotateOptions
from ditq.methods.rotate import Rotate, rotate_heads, rotate_input
from ditq.quant import QuantLinear
from ditq.quant.hadamard import Rotation

XL_LAYERS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def xl_block() -> nn.Module:
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(1152, 16, 72, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
                                  activation_fn="gelu-approximate").eval()
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    return block


def rotate_xl(block: nn.Module, dtype) -> None:
    for n in XL_LAYERS:
        block.set_submodule(n, QuantLinear(block.get_submodule(n), name=n))
    qkv = Rotation(1152, seed=1).to(dtype)
    for n in XL_LAYERS[:3]:
        rotate_input(block.get_submodule(n), qkv, n)
    rotate_input(block.get_submodule("ff.net.0.proj"), Rotation(1152, seed=2).to(dtype))
    rotate_input(block.get_submodule("ff.net.2"), Rotation(4608, seed=3).to(dtype))
    rotate_input(block.get_submodule("norm1.linear"), Rotation(1152, seed=4).to(dtype))
    rotate_heads(block.attn1, Rotation(72, seed=5).to(dtype), "attn1")


@torch.no_grad()
def xl_row() -> tuple[float, float, float]:
    base = xl_block()
    x = torch.randn(2, 256, 1152, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([10, 700]), torch.tensor([3, 999])
    out = {}
    for dtype in (torch.float32, torch.float64):
        ref = copy.deepcopy(base).to(dtype)
        rot = copy.deepcopy(base).to(dtype)
        rotate_xl(rot, dtype)
        out[dtype] = (ref(x.to(dtype), timestep=t, class_labels=y), rot(x.to(dtype), timestep=t, class_labels=y))
    r32 = rel(out[torch.float32][1], out[torch.float32][0])
    r64 = rel(out[torch.float64][1], out[torch.float64][0])
    rounding = rel(out[torch.float32][0], out[torch.float64][0])
    return r32, r64, rounding


@torch.no_grad()
def embedded_row() -> tuple[float, float, float]:
    from omegaconf import OmegaConf

    from ditq.calibration.lazy import Lazy
    from ditq.methods.base import QuantContext
    from ditq.methods.wrap import full_precision
    from ditq.models import load_adapter
    from ditq.config.schema import ModelConfig
    from ditq.paths import ASSETS_DIR

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 8, 8, generator=g)
    t = torch.tensor([999, 900, 700, 500, 300, 100, 20, 1])
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 10])
    out = {}
    for dtype in ("float32", "float64"):
        cfg = OmegaConf.structured(ModelConfig(name="tiny_dit_digits", path=str(ASSETS_DIR / "tiny_dit_digits")))
        adapter = load_adapter(cfg)
        if dtype == "float64":
            adapter.denoiser.to(torch.float64)
            adapter.dtype = torch.float64
        xx = x.to(adapter.dtype)
        ref = adapter.denoise(xx, t, y)
        qlayers, roles = _wrap_fp(adapter)
        ctx = QuantContext(adapter=adapter, run=None, qlayers=qlayers, roles=roles, layer_inputs=Lazy(dict, "unused"),
                           progress=False)
        Rotate(RotateOptions(roles=["qkv", "fc1", "fc2", "adaln"])).apply(ctx)
        with full_precision(qlayers):
            out[dtype] = (ref, adapter.denoise(xx, t, y))
    return (rel(out["float32"][1], out["float32"][0]), rel(out["float64"][1], out["float64"][0]),
            rel(out["float32"][0], out["float64"][0]))


def _wrap_fp(adapter):
    """Every qkv / proj / fc1 / fc2 / adaLN linear as a QuantLinear without quantizers (the FP model)."""
    qlayers, roles = {}, {}
    for info in adapter.layers():
        if info.role in ("qkv", "proj", "fc1", "fc2", "adaln"):
            q = QuantLinear(adapter.denoiser.get_submodule(info.name), name=info.name)
            adapter.denoiser.set_submodule(info.name, q)
            qlayers[info.name], roles[info.name] = q, info.role
    return qlayers, roles


def main() -> None:
    rows = [("embedded digits DiT (6 blocks)", embedded_row()), ("DiT-XL/2 block, random weights", xl_row())]
    print("| model | rotated vs original, float32 | rotated vs original, float64 | float32 vs float64 (original) |")
    print("|---|---|---|---|")
    for name, (r32, r64, rounding) in rows:
        print(f"| {name} | {r32:.2e} | {r64:.2e} | {rounding:.2e} |")


if __name__ == "__main__":
    main()
