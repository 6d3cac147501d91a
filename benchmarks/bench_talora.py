"""Seconds per TALoRA fine-tuning iteration on this CPU, against the same model's FP forward+backward.

Models: the embedded DiT (tiny_dit_digits) and U-Net (tiny_unet_digits, when its weights are there), and a
real-size U-Net with random weights: diffusers' UNet2DModel with DDPM CIFAR-10's configuration (32 px, 3
channels, block_out_channels (128, 256, 256, 256), layers_per_block 2, attention at 16x16; 35.7M
parameters). DiT-XL/2 (675M parameters, 256 tokens) takes over a minute per forward+backward of 8 rows on
two CPU cores, so the real-size model here is the U-Net. Every Linear / Conv2d is quantized (FP4 E2M1
weights per output channel, FP4 E2M1 activations per tensor, dynamic), then TALoRA is installed (K branches
of rank r, learned router, as conf/method/msfp.yaml). One iteration = forward of `--batch` rows at random
sampler timesteps, MSE to a fixed target, backward to the LoRA and router weights, Adam step (what
`ditq.algorithms.finetune` does per iteration). The reference: the FP model (no quantizers, no LoRA),
forward + backward to all its weights, same rows, measured in the same run.

    python benchmarks/bench_talora.py [--models tiny_dit_digits tiny_unet_digits unet_cifar10] [--iters 10]
                                      [--warmup 2] [--batch 16] [--cifar-batch 8] [--branches 4] [--rank 4]
                                      [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from omegaconf import OmegaConf

TS = list(range(960, -1, -40))  # ddim25's timesteps


def _embedded(name: str):
    from ditq.config.schema import ModelConfig
    from ditq.models import load_adapter
    from ditq.paths import ASSETS_DIR

    raw = OmegaConf.load(f"conf/model/{name}.yaml")
    raw.path = str(ASSETS_DIR / name)
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)
    adapter = load_adapter(cfg)
    shape = adapter.latent_shape
    classes = max(1, int(getattr(cfg, "num_classes", 1)))

    def denoise(model, x, t):
        y = torch.arange(len(x)) % classes if adapter.conditioning == "class" else torch.zeros(len(x), dtype=torch.long)
        return adapter.denoise(x, t, y)

    return adapter.denoiser, shape, denoise, adapter


def _unet_cifar10():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                        block_out_channels=(128, 256, 256, 256),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return model, (3, 32, 32), lambda m, x, t: m(x, timestep=t).sample, None


def _quantize(model):
    from ditq.config.schema import quantizer_config
    from ditq.quant.modules import QuantConv2d, QuantLinear
    from ditq.quant.quantizer import build_quantizer

    qlayers = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            wq = build_quantizer(quantizer_config({"granularity": "per_channel"}, "fp4_e2m1", "weight", "w"), "weight")
            aq = build_quantizer(quantizer_config({"granularity": "per_tensor", "dynamic": True}, "fp4_e2m1", "act",
                                                  "a"), "act")
            cls = QuantConv2d if isinstance(mod, torch.nn.Conv2d) else QuantLinear
            q = cls(mod, wq, aq, name=name)
            model.set_submodule(name, q)
            qlayers[name] = q
    return qlayers


def _time(step, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, batch: int, iters: int, warmup: int, branches: int, rank: int) -> dict:
    from ditq.quant.lora import Router, install_lora, lora_modules

    model, shape, denoise, adapter = _unet_cifar10() if name == "unet_cifar10" else _embedded(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g)
    t = torch.tensor([TS[int(i)] for i in torch.randint(0, len(TS), (batch,), generator=g)])
    with torch.no_grad():
        target = denoise(model, x, t)
    n_params = sum(p.numel() for p in model.parameters())
    fp_model = copy.deepcopy(model) if adapter is None else model

    # FP reference: forward + backward to every weight (a training step without the optimizer)
    for p in fp_model.parameters():
        p.requires_grad_(True)

    def fp_step():
        fp_model.zero_grad(set_to_none=True)
        (denoise(fp_model, x, t) - target).pow(2).mean().backward()

    fp_s = _time(fp_step, iters, warmup)
    qlayers = _quantize(model)
    router = Router(branches, "learned", TS)
    router.fit_partition()
    install_lora(model, qlayers, router, rank)
    mods = lora_modules(model, qlayers)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in mods.parameters():
        p.requires_grad_(True)
    n_lora = sum(p.numel() for p in mods.parameters())
    opt = torch.optim.Adam(mods.parameters(), lr=1e-3)

    def lora_step():
        opt.zero_grad(set_to_none=True)
        (denoise(model, x, t) - target).pow(2).mean().backward()
        opt.step()

    lora_s = _time(lora_step, iters, warmup)
    with torch.no_grad():
        for p in mods.parameters():
            p.requires_grad_(False)
        infer_q = _time(lambda: denoise(model, x, t), iters, warmup)
        for q in qlayers.values():
            q.quant_enabled = False
        infer_fp = _time(lambda: denoise(model, x, t), iters, warmup)
    return {"model": name, "params": n_params, "lora_params": n_lora, "batch": batch, "layers": len(qlayers),
            "fp_fwd_bwd_s": fp_s, "talora_iter_s": lora_s, "ratio": lora_s / fp_s,
            "fp_fwd_s": infer_fp, "quant_lora_fwd_s": infer_q, "fwd_ratio": infer_q / infer_fp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny_dit_digits", "tiny_unet_digits", "unet_cifar10"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cifar-batch", type=int, default=8)
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads={a.threads} K={a.branches} r={a.rank} (median of {a.iters} after {a.warmup} warm-up)")
    print(f"{'model':<18}{'params':>12}{'lora':>11}{'batch':>6}{'FP f+b s':>10}{'TALoRA it s':>13}{'ratio':>7}"
          f"{'FP fwd s':>10}{'Q+LoRA fwd s':>14}{'ratio':>7}")
    for name in a.models:
        try:
            r = bench(name, a.cifar_batch if name == "unet_cifar10" else a.batch, a.iters, a.warmup, a.branches, a.rank)
        except FileNotFoundError as err:  # an embedded model whose weights are not there yet
            print(f"{name:<18} skipped: {err}")
            continue
        print(f"{r['model']:<18}{r['params']:>12,}{r['lora_params']:>11,}{r['batch']:>6}{r['fp_fwd_bwd_s']:>10.4f}"
              f"{r['talora_iter_s']:>13.4f}{r['ratio']:>7.2f}{r['fp_fwd_s']:>10.4f}{r['quant_lora_fwd_s']:>14.4f}"
              f"{r['fwd_ratio']:>7.2f}")


if __name__ == "__main__":
    main()
