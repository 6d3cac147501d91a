"""Time fake-quantized linear layers at DiT-XL/2 widths against the plain float linear.

Weights are quantized once and cached (QuantLinear.refresh); what is timed is a forward: activation
fake quantization plus the float matmul. Every case of a width is timed round-robin in the same run
(warm-up, then REPS rounds, median per case), so the ratios share the machine's load.

    python benchmarks/bench_quant_linear.py [--reps N] [--tokens T] [--batch B] [--threads K]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from ditq.quant import QuantizerConfig as Q
from ditq.quant import QuantLinear, build_quantizer
from ditq.quant.runtime import get_kernel_threads, set_kernel_threads
from ditq.utils.timing import time_round_robin

WIDTHS = [(1152, 1152), (1152, 4608), (4608, 1152)]  # attention proj / fc1 / fc2 of DiT-XL/2
CASES = {  # name -> (weight config, activation config)
    "W8A8 int static": (Q("int8", "per_channel"), Q("int8", "per_tensor")),
    "W8A8 int per-token dyn": (Q("int8", "per_channel"), Q("int8", "per_token", dynamic=True)),
    "W4A8 int g128 dyn": (
        Q("int4", "per_group", group_size=128, symmetric=False),
        Q("int8", "per_token_group", group_size=128, symmetric=False, dynamic=True),
    ),
    "W4A4 fp e2m1 per-token dyn": (
        Q("fp4_e2m1", "per_group", group_size=128),
        Q("fp4_e2m1", "per_token", dynamic=True),
    ),
    "MXFP4": (Q("mxfp4", "per_block"), Q("mxfp4", "per_block", dynamic=True)),
    "NVFP4": (Q("nvfp4", "per_block"), Q("nvfp4", "per_block", dynamic=True)),
}
TARGET = 1.5


def build_layers(d_in: int, d_out: int, x: torch.Tensor) -> dict:
    lin = nn.Linear(d_in, d_out)
    layers = {"float": lambda: F.linear(x, lin.weight, lin.bias)}
    for name, (wc, ac) in CASES.items():
        act = build_quantizer(ac, "act")
        act.fit(x)  # static ranges (no-op for dynamic ones)
        layer = QuantLinear(lin, build_quantizer(wc, "weight"), act, name=name)
        layers[name] = (lambda m: (lambda: m(x)))(layer)
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: machine default)")
    ap.add_argument("--kernel-threads", default="default",
                    help="threads of the fake-quant kernels: 'default' (ditq's policy), 'torch' (follow torch), or N")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernel_threads != "default":
        set_kernel_threads(None if args.kernel_threads == "torch" else int(args.kernel_threads))
    torch.manual_seed(0)
    kt = get_kernel_threads()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (fake-quant kernels: "
          f"{'torch setting' if kt is None else kt}), x = [{args.batch}, {args.tokens}, d_in] float32, "
          f"median of {args.reps} round-robin reps")
    header = f"{'d_in->d_out':>12} | {'case':<28} | {'ms/call':>8} | {'x float':>7}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    with torch.no_grad():
        for d_in, d_out in WIDTHS:
            x = torch.randn(args.batch, args.tokens, d_in)
            ms = time_round_robin(build_layers(d_in, d_out, x), args.reps, args.warmup)
            base = ms["float"]
            for name, t in ms.items():
                ratio = t / base
                if name != "float":
                    worst = max(worst, ratio)
                flag = "" if ratio <= TARGET or name == "float" else "  > target"
                print(f"{f'{d_in}->{d_out}':>12} | {name:<28} | {t:8.2f} | {ratio:7.2f}{flag}")
    print(f"worst ratio {worst:.2f} (target <= {TARGET})")


if __name__ == "__main__":
    main()
