"""One denoiser forward of the real text-to-image architectures with random weights, on this CPU.

For each model (default: PixArt-alpha 512 and Hunyuan-DiT 1024, full depth), in its own process:
build the adapter through `ditq.models.load_adapter` (model.weights=random, float32, CPU; the
model's conf/model/<name>.yaml, composed and validated as a run would), encode the empty prompt
and one prompt with the adapter's own (random, small) text encoder into a `TextBank`, release
the encoder, then time `adapter.denoise` at batch 1 (after `--warmup` untimed forwards).
Peak memory is the process's peak RSS (resource.getrusage ru_maxrss), after building and at the end.

    python benchmarks/t2i_forward.py [--models pixart_alpha_512 hunyuan_dit_1024] [--warmup 1]
                                     [--repeats 1] [--threads N] [--num-layers N (debug: reduced depth)]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("pixart_alpha_512", "hunyuan_dit_1024")
DATASET = "hpsv2"  # any prompt dataset: only the model group matters here
_TAG = "T2I_FORWARD_RESULT "



def measure(model: str, warmup: int, repeats: int, num_layers: int | None) -> dict:
    """Runs in the child process: build, encode, time the forward."""
    import torch
    from ditq.conditioning import TextBank
    from ditq.analysis.embedded import compose_run
    from ditq.models import load_adapter
    from ditq.utils.timing import peak_rss_gib

    overrides = [f"model={model}", "model.weights=random", f"dataset={DATASET}"]
    if num_layers:
        overrides.append(f"model.arch.num_layers={num_layers}")
    run = compose_run(overrides)
    t0 = time.perf_counter()
    adapter = load_adapter(run.model, device="cpu", dtype="float32")
    build_s = time.perf_counter() - t0
    rss_built = peak_rss_gib()

    t0 = time.perf_counter()
    enc = adapter.text_encoder()
    out = enc.encode(["", "a photograph of an astronaut riding a horse"])
    fingerprint = enc.fingerprint()
    enc.release()
    del enc
    embeds, mask = out.pop("embeds"), out.pop("mask")
    adapter.set_text_bank(TextBank(torch.tensor([-1, 0]), embeds, mask, out, fingerprint))
    encode_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, *adapter.latent_shape, generator=gen)
    t, y = torch.tensor([500]), torch.tensor([0])
    with torch.inference_mode():
        for _ in range(warmup):
            adapter.denoise(x, t, y)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            eps = adapter.denoise(x, t, y)
            times.append(time.perf_counter() - t0)
    if eps.shape != x.shape or not bool(torch.isfinite(eps).all()):
        raise RuntimeError(f"{model}: the forward returned shape {tuple(eps.shape)} / non-finite values")
    params = sum(p.numel() for p in adapter.denoiser.parameters())
    arch = run.model.arch
    patch = int(arch.get("patch_size", 2))
    tokens = (adapter.latent_shape[1] // patch) * (adapter.latent_shape[2] // patch)
    return {"model": model, "family": run.model.family, "depth": int(arch.num_layers),
            "params_m": params / 1e6, "latent": list(adapter.latent_shape), "tokens": tokens,
            "threads": torch.get_num_threads(), "build_s": build_s, "encode_s": encode_s, "warmup": warmup,
            "forward_s": min(times), "forward_s_all": times, "peak_rss_built_gib": rss_built,
            "peak_rss_gib": peak_rss_gib(), "torch": torch.__version__}


def run_child(model: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", model, "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.num_layers:
        cmd += ["--num-layers", str(args.num_layers)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_TAG):
            return json.loads(line[len(_TAG):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {"model": model, "error": f"exit {proc.returncode}: {tail}"}


def table(rows: list[dict]) -> str:
    head = ("| model | depth | params (M) | latent | tokens | threads | build s | s / forward | peak RSS GiB "
            "(built / end) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error'].splitlines()[-1]} | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['depth']} | {r['params_m']:.0f} | {'x'.join(map(str, r['latent']))} | "
                     f"{r['tokens']} | {r['threads']} | {r['build_s']:.1f} | {r['forward_s']:.1f} | "
                     f"{r['peak_rss_built_gib']:.2f} / {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), help="conf/model names (text-to-image)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards before the timed ones")
    p.add_argument("--repeats", type=int, default=1, help="timed forwards (the minimum is reported)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the child processes")
    p.add_argument("--num-layers", type=int, default=None, help="reduced depth (debugging; default: the real one)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(_TAG + json.dumps(measure(args.child, args.warmup, args.repeats, args.num_layers)), flush=True)
        return 0
    rows = []
    for model in args.models:
        print(f"{model}: measuring in a subprocess ...", file=sys.stderr, flush=True)
        rows.append(run_child(model, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
