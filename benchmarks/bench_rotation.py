"""Time HQ-DiT's online rotations at DiT-XL/2 widths against the float linear layers they feed.

Each online rotation of a DiT-XL/2 block (x -> x R before the layer, W -> W R folded into its weight):
  qkv    width 1152, one rotation shared by the q, k, v linears (3 x 1152->1152)
  fc1    width 1152, feeding 1152->4608
  fc2    width 4608, feeding 4608->1152
  adaLN  width 1152 per sample (not per token), feeding 1152->6912
timed as the fast rotation (`ditq.quant.hadamard.Rotation`: signs, H_{2^k} as one small matmul,
dense H_m), the same with H_{2^k} by the butterfly `fwht` instead (column fwht), a dense x @ R
matmul, and the float linear(s) fed, on x = [rows, width] float32 with rows = batch x tokens
(adaLN: rows = batch). All cases are timed round-robin in the same run (warm-up, then REPS rounds,
median per case), so the ratios share the machine's load.

    python benchmarks/bench_rotation.py [--reps N] [--warmup N] [--tokens T] [--batch B] [--threads K]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ditq.quant.hadamard import Rotation
from ditq.utils.timing import time_round_robin

# input -> (rotation width, [(d_in, d_out) of each linear fed], per token?)
SITES = {
    "qkv": (1152, [(1152, 1152)] * 3, True),
    "fc1": (1152, [(1152, 4608)], True),
    "fc2": (4608, [(4608, 1152)], True),
    "adaLN": (1152, [(1152, 6912)], False),
}


def build_cases(batch: int, tokens: int) -> tuple[dict, dict]:
    """{(site, kind): fn} with kind in fast / fwht / dense / linear, and {site: rows}."""
    cases, rows_of = {}, {}
    for site, (n, linears, per_token) in SITES.items():
        rows = batch * tokens if per_token else batch
        rows_of[site] = rows
        rot = Rotation(n, seed=0)
        x = torch.randn(rows, n)
        by_fwht = Rotation(n, seed=0)
        by_fwht.h_inner = by_fwht.h_outer = None  # H_{2^k} by fwht's butterflies
        r32 = rot.matrix(torch.float32)
        torch.testing.assert_close(rot(x), x @ r32, rtol=1e-4, atol=1e-4)  # same transform
        torch.testing.assert_close(by_fwht(x), x @ r32, rtol=1e-4, atol=1e-4)
        layers = [(torch.randn(d_out, d_in) / d_in**0.5, torch.zeros(d_out)) for d_in, d_out in linears]
        cases[(site, "fast")] = (lambda r, x: lambda: r(x))(rot, x)
        cases[(site, "fwht")] = (lambda r, x: lambda: r(x))(by_fwht, x)
        cases[(site, "dense")] = (lambda r, x: lambda: x @ r)(r32, x)
        cases[(site, "linear")] = (lambda ls, x: lambda: [F.linear(x, w, b) for w, b in ls])(layers, x)
    return cases, rows_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: machine default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch} x "
          f"{args.tokens} tokens, median of {args.reps} round-robin reps")
    with torch.no_grad():
        cases, rows_of = build_cases(args.batch, args.tokens)
        ms = time_round_robin(cases, args.reps, args.warmup)
    header = (f"{'input':<6} | {'width':>5} | {'rows':>5} | {'rotation':<20} | {'fast ms':>8} | "
              f"{'fwht ms':>8} | {'dense ms':>8} | {'linear(s) ms':>12} | {'fast/lin':>8} | {'dense/lin':>9}")
    print(header)
    print("-" * len(header))
    tot = {"fast": 0.0, "fwht": 0.0, "dense": 0.0, "linear": 0.0}
    for site, (n, linears, _) in SITES.items():
        f, w, d, lin = (ms[(site, k)] for k in ("fast", "fwht", "dense", "linear"))
        for k, v in (("fast", f), ("fwht", w), ("dense", d), ("linear", lin)):
            tot[k] += v
        desc = Rotation(n).describe().split(",")[0]
        print(f"{site:<6} | {n:>5} | {rows_of[site]:>5} | {desc:<20} | {f:8.2f} | {w:8.2f} | {d:8.2f} | "
              f"{lin:12.2f} | {f / lin:8.3f} | {d / lin:9.3f}")
    print("-" * len(header))
    print(f"{'block':<6} | {'':>5} | {'':>5} | {'sum of 4 rotations':<20} | {tot['fast']:8.2f} | "
          f"{tot['fwht']:8.2f} | {tot['dense']:8.2f} | {tot['linear']:12.2f} | "
          f"{tot['fast'] / tot['linear']:8.3f} | {tot['dense'] / tot['linear']:9.3f}")


if __name__ == "__main__":
    main()
