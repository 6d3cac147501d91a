"""One denoiser forward (and forward + backward) of the real U-Nets with random weights, on this CPU.

For each model (default: DDPM CIFAR-10 and the three latent-diffusion U-Nets), in its own process:
build the adapter through `ditq.models.load_adapter` (model.weights=random, float32, CPU; the model's
conf/model/<name>.yaml, composed and validated as a run would), then time `adapter.denoise` at each
batch size (after `--warmup` untimed forwards) and one forward + backward of the mean output with
gradients on the weights (what a fine-tuning iteration such as TALoRA's pays per batch, before any
LoRA branch). Each time is wall-clock and, in brackets, the process's CPU time (all threads: on an idle
machine about threads x wall; on a shared one the steadier figure). Peak memory is the process's peak RSS.

    python benchmarks/unet_forward.py [--models ddpm_cifar10_32 ...] [--batches 1 8] [--warmup 1]
                                      [--repeats 1] [--threads N] [--no-backward]
Batch sizes above 1 apply to DDPM CIFAR-10 only unless --batches-all is given (the 256-px latent models
at batch 8 take minutes here).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("ddpm_cifar10_32", "ldm_celebahq_256", "ldm_lsun_bedroom_256", "ldm_lsun_church_256")
DATASET = {"ddpm_cifar10_32": "cifar10", "ldm_celebahq_256": "celebahq", "ldm_lsun_bedroom_256": "lsun_bedroom",
           "ldm_lsun_church_256": "lsun_church"}
_TAG = "UNET_FORWARD_RESULT "



def measure(model: str, batches: list[int], warmup: int, repeats: int, backward: bool) -> dict:
    """Runs in the child process: build, time forwards (and one forward + backward per batch size)."""
    import torch
    from ditq.analysis.embedded import compose_run
    from ditq.models import load_adapter
    from ditq.utils.timing import peak_rss_gib

    overrides = [f"model={model}", "model.weights=random", f"dataset={DATASET.get(model, 'digits')}",
                 "eval=adm", "sampler=ddim25_uncond"]
    run = compose_run(overrides)
    t0 = time.perf_counter()
    adapter = load_adapter(run.model, device="cpu", dtype="float32")
    build_s = time.perf_counter() - t0
    rss_built = peak_rss_gib()
    params = sum(p.numel() for p in adapter.denoiser.parameters())
    rows = []
    for b in batches:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, *adapter.latent_shape, generator=gen)
        t, y = torch.full((b,), 500), torch.zeros(b, dtype=torch.long)
        with torch.inference_mode():
            for _ in range(warmup):
                adapter.denoise(x, t, y)
            times, cpu = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                eps = adapter.denoise(x, t, y)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        if eps.shape != x.shape or not bool(torch.isfinite(eps).all()):
            raise RuntimeError(f"{model}: the forward returned shape {tuple(eps.shape)} / non-finite values")
        row = {"batch": b, "forward_s": min(times), "forward_cpu_s": min(cpu)}
        if backward:
            adapter.denoiser.requires_grad_(True)
            t0, c0 = time.perf_counter(), time.process_time()
            adapter.denoise(x, t, y).float().mean().backward()
            row["forward_backward_s"] = time.perf_counter() - t0
            row["forward_backward_cpu_s"] = time.process_time() - c0
            adapter.denoiser.zero_grad(set_to_none=True)
            adapter.denoiser.requires_grad_(False)
        rows.append(row)
    return {"model": model, "params": params, "latent": list(adapter.latent_shape), "build_s": build_s,
            "rss_built_gib": rss_built, "rss_peak_gib": peak_rss_gib(), "threads": torch.get_num_threads(),
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--batches-all", action="store_true", help="every batch size for every model")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        batches = a.batches if (a.batches_all or a.child == "ddpm_cifar10_32") else [1]
        print(_TAG + json.dumps(measure(a.child, batches, a.warmup, a.repeats, not a.no_backward)), flush=True)
        return 0
    results = []
    for m in a.models:  # one process per model: peak RSS is that model's
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", m, "--batches", *map(str, a.batches),
               "--warmup", str(a.warmup), "--repeats", str(a.repeats), "--threads", str(a.threads)]
        cmd += ["--batches-all"] if a.batches_all else []
        cmd += ["--no-backward"] if a.no_backward else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(_TAG)), None)
        if proc.returncode or line is None:
            print(f"{m}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line[len(_TAG):]))
    print("| model | params | latent | batch | forward s (CPU s) | fwd+bwd s (CPU s) | peak RSS GiB | threads |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        for row in r["rows"]:
            fb = row.get("forward_backward_s")
            fb = "-" if fb is None else f"{fb:.2f} ({row['forward_backward_cpu_s']:.2f})"
            print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {'x'.join(map(str, r['latent']))} | {row['batch']} | "
                  f"{row['forward_s']:.2f} ({row['forward_cpu_s']:.2f}) | {fb} | {r['rss_peak_gib']:.2f} | "
                  f"{r['threads']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
