"""GPTQ on DiT-XL/2 (random weights): ditq's block-wise engine against the whole-model-per-block
schedule of Q-DiT's public code, measured in the same run.

Every linear (and the patch-embedding conv) gets INT4 asymmetric weights in groups of 128, GPTQ
with the conditioning grid for adaLN / embedders. Calibration: `--records` records (random latents
at the DDIM-50 timesteps, random labels), both guidance branches, `--batch` rows per forward.

* ours: `BlockwiseEngine` (capture once, then per block one stats pass + one output pass).
* whole-model-per-block: for each block, one forward of the WHOLE model over all records with
  hooks on that block's layers, then GPTQ on them (what Q-DiT's public code does).

Both run on a model of `--blocks` blocks (DiT-XL/2 widths; 28 is the real depth). Everything is
extrapolated linearly to 28 blocks: ours = fixed cost (capture, condition grid, tail) + 28 x the
mean per-block time; the reference = 28 x (one 28-block forward + the block's statistics + its
GPTQ), with the 28-block forward = a plain forward of the `--blocks`-block model x 28 / blocks. Peak RSS is measured for ours only (its own
process when --only ours).

    python benchmarks/bench_gptq.py [--blocks 4] [--records 32] [--batch 16] [--skip-reference]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from omegaconf import OmegaConf

from ditq.utils.timing import peak_rss_gib

DEPTH = 28


def build(blocks: int, device: str = "cpu"):
    from ditq.config.schema import ModelConfig, quantizer_config
    from ditq.models import load_adapter
    from ditq.quant.modules import QuantConv2d, QuantLinear
    from ditq.quant.quantizer import build_quantizer

    arch = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=blocks,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    cfg = OmegaConf.structured(ModelConfig(name="dit_xl_256", weights="random", arch=arch, resolution=256,
                                           num_classes=1000))
    adapter = load_adapter(cfg, device=device)
    wcfg = {"granularity": "per_group", "group_size": 128, "symmetric": False}
    qlayers = {}
    for info in adapter.layers():
        mod = adapter.denoiser.get_submodule(info.name)
        wq = build_quantizer(quantizer_config(wcfg, "int4", "weight", "bench"), "weight")
        cls = QuantConv2d if isinstance(mod, torch.nn.Conv2d) else QuantLinear
        q = cls(mod, wq, None, name=info.name)
        adapter.denoiser.set_submodule(info.name, q)
        qlayers[info.name] = q
    return adapter, qlayers


def records(n: int, seed: int = 0):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    sch.set_timesteps(50)
    ts = [int(t) for t in sch.timesteps]
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(ts)[torch.randint(0, len(ts), (n,), generator=g)]
    return {"x": torch.randn(n, 4, 32, 32, generator=g), "t": t, "y": torch.randint(0, 1000, (n,), generator=g)}, ts


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock intervals measure it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gptq_layers(qlayers, names, stats):
    from ditq.methods.gptq import gptq_layer  # exactly what the GPTQ step does per layer

    for n in names:
        gptq_layer(qlayers[n], stats.hessian(n), n, block_size=128)


def run_ours(blocks, n_records, batch, device):
    from ditq.calibration.engine import BlockwiseEngine

    adapter, qlayers = build(blocks, device)
    recs, ts = records(n_records)
    seg_time: dict = {}

    def on_segment(segment, names, stats):
        sync(device)
        t0 = time.perf_counter()
        gptq_layers(qlayers, names, stats)
        sync(device)
        seg_time[segment] = time.perf_counter() - t0

    eng = BlockwiseEngine(adapter, qlayers, recs, include_uncond=True, batch_size=batch, sequential=True,
                          grid_timesteps=ts, grid_labels=list(range(1001)), progress=False)
    t0 = time.perf_counter()
    rep = eng.run(on_segment)
    sync(device)
    wall = time.perf_counter() - t0
    params = sum(p.numel() for p in adapter.denoiser.parameters())
    return {"wall": wall, "report": rep, "gptq_s": seg_time, "params": params,
            "rss_gb": peak_rss_gib(),
            "gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}


def run_reference(blocks, n_records, batch, device):
    """Q-DiT's schedule: per block a whole-model forward over all records, hooks on that block."""
    from ditq.calibration.blocks import BlockRunner, calibration_batches
    from ditq.calibration.stats import LayerStats

    adapter, qlayers = build(blocks, device)
    recs, _ = records(n_records)
    batches = list(calibration_batches(recs, adapter.null_class, True, batch))
    segs = BlockRunner(adapter).segment_layers(list(qlayers))
    t0 = time.perf_counter()  # one plain whole-model forward over all records (no hooks, no statistics)
    with torch.no_grad():
        for x, t, y in batches:
            adapter.denoise(x.to(device), t.to(device), y.to(device))
    sync(device)
    plain_s = time.perf_counter() - t0
    fwd_s, gptq_s = [], []
    for k in range(blocks):
        names = segs[k]
        t0 = time.perf_counter()
        with LayerStats({n: qlayers[n] for n in names}) as stats, torch.no_grad():
            for q in (qlayers[n] for n in names):
                q.quant_enabled = False
            for x, t, y in batches:
                stats.new_batch()
                adapter.denoise(x.to(device), t.to(device), y.to(device))
            for q in (qlayers[n] for n in names):
                q.quant_enabled = True
        sync(device)
        fwd_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gptq_layers(qlayers, names, stats)
        sync(device)
        gptq_s.append(time.perf_counter() - t0)
    return {"fwd_s": fwd_s, "gptq_s": gptq_s, "plain_s": plain_s}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--records", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="rows per forward (conditional + unconditional)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (see benchmarks/gpu_gptq.sh)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; DiT-XL/2 widths, {a.blocks} blocks, "
          f"{a.records} records x 2 branches, batch {a.batch}", flush=True)

    ours = run_ours(a.blocks, a.records, a.batch, a.device)
    rep = ours["report"]
    per_block = [ours["gptq_s"].get(k, 0.0) for k in range(a.blocks)]
    other = ours["wall"] - sum(per_block)  # forwards, statistics, capture, grid, tail
    # the condition grid is computed once (identical embedder copies): a fixed cost, like pre and tail
    seg = rep["segment_s"]
    blocks_s = sum(seg[str(k)] for k in range(a.blocks)) - rep["grid_s"]
    fixed_s = ours["wall"] - blocks_s
    ours_28 = fixed_s + blocks_s / a.blocks * DEPTH
    fp32_gb = ours["params"] * 4 / 2**30
    io_gb = rep["rows"] * 256 * 1152 * 4 * 2 / 2**30  # two hidden-state streams alive at once
    print(f"ours: {ours['wall']:.1f} s wall for {a.blocks} blocks (GPTQ {sum(per_block):.1f} s, forwards/stats "
          f"{other:.1f} s); block forwards {rep['block_forwards']} (= 2 x {a.blocks} blocks x {rep['batches']} "
          f"batches), grid rows {rep['grid_rows']}; peak RSS {ours['rss_gb']:.2f} GB = "
          f"{ours['rss_gb'] / (3 * fp32_gb + io_gb):.2f} x (3 x fp32 model {fp32_gb:.2f} GB + block I/O "
          f"{io_gb:.2f} GB)", flush=True)
    if ours["gpu_gb"] is not None:
        print(f"peak GPU memory {ours['gpu_gb']:.2f} GB")
    print(f"ours per block {blocks_s / a.blocks:.1f} s, fixed (capture, condition grid {rep['grid_s']:.1f} s, "
          f"tail) {fixed_s:.1f} s; extrapolated to {DEPTH} blocks: {ours_28:.0f} s, "
          f"{2 * DEPTH * rep['batches']} block forwards")
    if a.skip_reference:
        return
    ref = run_reference(a.blocks, a.records, a.batch, a.device)
    # per block at depth 28: one forward of a 28-block model (the plain forward scaled by depth), plus
    # the statistics of the block's layers (the hooked pass minus the plain forward), plus its GPTQ
    fwd_28 = ref["plain_s"] * DEPTH / a.blocks
    stats_s = max(0.0, sum(ref["fwd_s"]) / a.blocks - ref["plain_s"])
    ref_28 = DEPTH * (fwd_28 + stats_s + sum(ref["gptq_s"]) / a.blocks)
    print(f"whole-model-per-block: {sum(ref['fwd_s']) + sum(ref['gptq_s']):.1f} s for {a.blocks} blocks "
          f"({a.blocks} whole-model forwards of {a.blocks} blocks: {sum(ref['fwd_s']):.1f} s, GPTQ "
          f"{sum(ref['gptq_s']):.1f} s; a plain {a.blocks}-block forward {ref['plain_s']:.1f} s, so the block "
          f"statistics cost {stats_s:.1f} s per block); extrapolated to {DEPTH} blocks: {ref_28:.0f} s "
          f"({DEPTH} x {DEPTH} = {DEPTH * DEPTH * len(range(0, 2 * a.records, a.batch))} block forwards)")
    print(f"speedup at {DEPTH} blocks (extrapolated, same run): {ref_28 / ours_28:.1f}x  (target >= 10x)")


if __name__ == "__main__":
    sys.exit(main())
