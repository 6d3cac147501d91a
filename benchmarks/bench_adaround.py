"""Time per AdaRound iteration (BRECQ block reconstruction) for one block, on this CPU.

Models: the embedded DiT (tiny_dit_digits, 6 blocks, hidden 128, 16 tokens) and DiT-XL/2 256 with
random weights (one block, hidden 1152, 256 tokens). Every quantized layer of the block (q, k, v,
out, fc1, fc2, adaLN) gets FP4 E2M1 weights in groups of 128 and FP8 E4M3 per-token online
activations (bits=w4a8_fp4 with conf/method/adaround_fp_scaleaware.yaml's quantizers); one iteration
= draw `--batch` rows, forward of the soft-rounded block, loss, backward, Adam step (exactly
`adaround_block`'s loop). Records: random latents at DDIM-50 timesteps, random labels.
Reported per model and thread count: seconds per iteration (median of the timed iterations after
`--warmup`), and for the embedded model the estimated total of 2500 iterations x 6 blocks.

    python benchmarks/bench_adaround.py [--iters 20] [--xl-iters 3] [--warmup 2] [--batch 16] [--threads 1 2]
                                        [--skip-xl]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf


def build(model: str):
    from ditq.config.schema import ModelConfig, quantizer_config
    from ditq.models import load_adapter
    from ditq.quant.modules import QuantLinear
    from ditq.quant.quantizer import build_quantizer

    if model == "tiny_dit_digits":
        from ditq.paths import ASSETS_DIR

        cfg = OmegaConf.structured(ModelConfig(name="tiny_dit_digits", path=str(ASSETS_DIR / "tiny_dit_digits")))
        shape, classes = (1, 8, 8), 10
    else:  # dit_xl_256, random weights, one block (conf/model/dit_xl_256.yaml's arch, num_layers 1)
        arch = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=1,
                    sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
        cfg = OmegaConf.structured(ModelConfig(name="dit_xl_256", weights="random", arch=arch, resolution=256,
                                               num_classes=1000))
        shape, classes = (4, 32, 32), 1000
    adapter = load_adapter(cfg)
    wcfg = {"granularity": "per_group", "group_size": 128, "symmetric": True}
    acfg = {"granularity": "per_token", "dynamic": True, "symmetric": True}
    qlayers = {}
    roles = ("qkv", "proj", "fc1", "fc2", "adaln")
    for info in adapter.layers():
        if info.role not in roles or info.block != 0:
            continue
        mod = adapter.denoiser.get_submodule(info.name)
        wq = build_quantizer(quantizer_config(wcfg, "fp4_e2m1", "weight", "w"), "weight")
        aq = build_quantizer(quantizer_config(acfg, "fp8_e4m3", "act", "a"), "act")
        q = QuantLinear(mod, wq, aq, name=info.name)
        adapter.denoiser.set_submodule(info.name, q)
        qlayers[info.name] = q
    return adapter, qlayers, shape, classes


def time_block(model: str, threads: int, iters: int, warmup: int, batch: int, rows: int, scale_aware: bool = True):
    from ditq.algorithms.adaround import SoftRounding, reconstruction_loss, soft_weights
    from ditq.calibration.blocks import BlockRunner
    from ditq.calibration.engine import full_precision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    adapter, qlayers, shape, classes = build(model)
    runner = BlockRunner(adapter)
    x = torch.randn(rows, *shape)
    t = torch.randint(0, 1000, (rows,))
    y = torch.randint(0, classes, (rows,))
    with full_precision(qlayers):
        hidden, call = runner.capture(x, t, y)
        target = runner.run_block(0, hidden, call)
    block = runner.blocks[0]
    for p in block.parameters():
        p.requires_grad_(False)
    roundings = {}
    for n, q in qlayers.items():
        q.weight_quantizer.fit(q.weight.detach())
        roundings[n] = SoftRounding(q.weight.detach(), q.weight_quantizer, scale_aware=scale_aware, name=n)
    opt = torch.optim.Adam([r.param for r in roundings.values()], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    times = []
    from ditq.methods.adaround import RowSet

    inputs = RowSet(lambda j: (hidden, call), [rows])
    with soft_weights(qlayers, roundings):
        for it in range(warmup + iters):
            t0 = time.perf_counter()
            idx = torch.randperm(rows, generator=g)[:batch]
            h, c = inputs.gather(idx)
            out = block(h, *c.args, **c.kwargs)
            out = out[0] if isinstance(out, tuple) else out
            loss = reconstruction_loss(out, target[idx.sort().values])
            loss = loss + 0.01 * sum(r.regularizer(10.0) for r in roundings.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it >= warmup:
                times.append(time.perf_counter() - t0)
    weights = sum(q.weight.numel() for q in qlayers.values())
    return statistics.median(times), weights, len(qlayers), tuple(hidden.shape[1:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20, help="timed iterations (embedded DiT)")
    ap.add_argument("--xl-iters", type=int, default=3, help="timed iterations (DiT-XL/2: seconds each on a CPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rows", type=int, default=64, help="calibration rows the batches are drawn from")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-xl", action="store_true")
    args = ap.parse_args(argv)
    models = ["tiny_dit_digits"] + ([] if args.skip_xl else ["dit_xl_256"])
    print(f"torch {torch.__version__}, batch {args.batch}, {args.iters} (DiT-XL/2: {args.xl_iters}) timed iterations, "
          f"median")
    for model in models:
        for th in args.threads:
            iters = args.iters if model == "tiny_dit_digits" else args.xl_iters
            s, weights, layers, hshape = time_block(model, th, iters, args.warmup if model == "tiny_dit_digits" else 1,
                                                    args.batch, args.rows)
            line = (f"{model:16s} threads={th}: {s * 1000:9.1f} ms / iteration  ({layers} layers, "
                    f"{weights / 1e6:.2f} M weights, block input {hshape})")
            if model == "tiny_dit_digits":
                line += f"; 2500 it x 6 blocks ~ {s * 2500 * 6 / 60:.1f} min"
            else:
                line += (f"; 2500 it x 28 blocks ~ {s * 2500 * 28 / 3600:.1f} h, 20000 it x 28 blocks ~ "
                         f"{s * 20000 * 28 / 3600:.0f} h")
            print(line, flush=True)


if __name__ == "__main__":
    main()
