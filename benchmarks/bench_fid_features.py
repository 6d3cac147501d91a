"""FID feature-extraction throughput on the CPU: ditq's Inception port against clean-fid's and
torchmetrics' extraction pipelines, on the same images, in one process.

    python benchmarks/bench_fid_features.py [--images 48] [--size 256] [--batch 16] [--rounds 3]

Every contender maps the same uint8 images (ADM's 256x256 by default) to 2048-d pool_3 features,
with random weights of the same architecture (the published weights cannot be downloaded here;
speed does not depend on the values). Contenders run interleaved, round after round (the order
rotates every round), and each is scored by its median wall time and its median CPU time
(`time.process_time`, all threads of this process): on a shared machine the CPU time is the
steadier of the two, the wall time what a user waits.

  ditq            InceptionV3TF: TF1 bilinear resize inside, folded batch norms, channels_last.
  clean-fid/clean clean-fid's own resizer (`cleanfid.resize.build_resizer("clean")`: PIL bicubic
                  per channel in float, one image at a time, as its DataLoader workers do) and its
                  own `InceptionV3W` wrapper around a TorchScript network. NVIDIA's TorchScript file
                  is not downloadable, so the network is a trace of pytorch-fid's FID Inception when
                  pytorch-fid is importable, else of the ditq port (said in the output).
  clean-fid/legacy_tensorflow  the same wrapper with the resize inside the network.
  torchmetrics    `FrechetInceptionDistance(feature=2048, antialias=False).update(...)`: torch-fidelity's
                  extractor plus torchmetrics' accumulation. Needs torch-fidelity (and torchvision):
                  run this script in the isolated environment of scripts/make_metric_fixtures.py.
  pytorch-fid     `InceptionV3([3])` with its own resize (reference point; needs torchvision).
Contenders whose packages are missing are reported as skipped. Prints a JSON summary last.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ditq.metrics.cleanfid_export import export_cleanfid_torchscript  # noqa: E402
from ditq.metrics.inception import InceptionV3TF, load_inception_state, random_inception_state_dict  # noqa: E402

SEED = 0


def make_images(n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(n, 3, 8, 8, generator=g) * 255
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (x + torch.randn(x.shape, generator=g) * 8).clamp(0, 255).round().to(torch.uint8)


def batches(images: torch.Tensor, batch: int):
    for s in range(0, images.shape[0], batch):
        yield images[s:s + batch]


def contender_ditq(state):
    net = load_inception_state(InceptionV3TF(), state)

    def run(images, batch):
        return torch.cat([net(b).pool for b in batches(images, batch)])

    return run, "ditq InceptionV3TF (tf1 resize, folded BN, channels_last)"


def pytorch_fid_pool_module(state):
    """pytorch-fid's FID Inception with `state`, as normalised-299 -> [N, 2048] (None if unavailable)."""
    try:
        import pytorch_fid.inception as pfi
    except Exception:  # noqa: BLE001 - torchvision missing raises at import
        return None
    pfi.load_state_dict_from_url = lambda *a, **k: {k2: v.clone() for k2, v in state.items()}
    model = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()

    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)[0].flatten(1)

    return Pool()


def contender_cleanfid(state, mode, workdir):
    try:
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer
    except Exception as err:  # noqa: BLE001
        return None, f"clean-fid unavailable: {err}"
    pfid = pytorch_fid_pool_module(state)
    net = pfid if pfid is not None else load_inception_state(InceptionV3TF(), state)
    which = "pytorch-fid FID Inception" if pfid is not None else "ditq port"
    export_cleanfid_torchscript(net, workdir)
    model = InceptionV3W(str(workdir), download=False, resize_inside=mode == "legacy_tensorflow").eval()
    resize = build_resizer(mode)

    def run(images, batch):
        out = []
        with torch.no_grad():
            for b in batches(images, batch):
                arrs = [np.asarray(resize(im)) for im in b.permute(0, 2, 3, 1).numpy()]
                x = torch.from_numpy(np.stack(arrs).astype(np.float32)).permute(0, 3, 1, 2)
                out.append(model(x))
        return torch.cat(out)

    return run, f"clean-fid {mode}: its resizer + InceptionV3W over a TorchScript trace of the {which}"


def contender_torchmetrics(state, workdir):
    try:
        import torch_fidelity  # noqa: F401
        from torchmetrics.image.fid import FrechetInceptionDistance
    except Exception as err:  # noqa: BLE001
        return None, f"torchmetrics' own extractor unavailable (needs torch-fidelity + torchvision): {err}"
    path = Path(workdir) / "tm_weights.pth"
    torch.save(state, path)
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path), antialias=False)

    def run(images, batch):
        fid.reset()
        for b in batches(images, batch):
            fid.update(b, real=False)
        return fid.fake_features_sum

    return run, "torchmetrics FrechetInceptionDistance(feature=2048, antialias=False).update (torch-fidelity extractor)"


def contender_pytorch_fid(state):
    pfid = pytorch_fid_pool_module(state)
    if pfid is None:
        return None, "pytorch-fid unavailable"
    import pytorch_fid.inception as pfi

    model = pfi.InceptionV3([3]).eval()  # resize_input + normalize_input, its defaults

    def run(images, batch):
        with torch.no_grad():
            return torch.cat([model(b.float() / 255)[0].flatten(1) for b in batches(images, batch)])

    return run, "pytorch-fid InceptionV3([3]) with its bilinear resize"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    state = random_inception_state_dict(SEED)
    images = make_images(args.images, args.size)
    contenders, skipped = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        makers = {
            "ditq": lambda: contender_ditq(state),
            "clean-fid/clean": lambda: contender_cleanfid(state, "clean", tmp / "clean"),
            "clean-fid/legacy_tensorflow": lambda: contender_cleanfid(state, "legacy_tensorflow", tmp / "legacy"),
            "torchmetrics": lambda: contender_torchmetrics(state, tmp),
            "pytorch-fid": lambda: contender_pytorch_fid(state),
        }
        for name, make in makers.items():
            run, what = make()
            if run is None:
                skipped[name] = what
            else:
                contenders[name] = (run, what)
                for _ in range(2):  # warm-up: allocations, TorchScript's profiling executor
                    run(images[: min(2, args.images)], args.batch)

        wall = {name: [] for name in contenders}
        cpu = {name: [] for name in contenders}
        names = list(contenders)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                run = contenders[name][0]
                w0, c0 = time.perf_counter(), time.process_time()
                run(images, args.batch)
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
            print(f"round {r + 1}: " + ", ".join(f"{n} {wall[n][-1]:.2f}s wall {cpu[n][-1]:.2f}s cpu"
                                                 for n in contenders), flush=True)

    med_wall = {n: statistics.median(t) for n, t in wall.items()}
    med_cpu = {n: statistics.median(t) for n, t in cpu.items()}
    summary = {
        "images": args.images, "size": args.size, "batch": args.batch, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "images_per_s_wall": {n: round(args.images / t, 3) for n, t in med_wall.items()},
        "cpu_s_per_image": {n: round(t / args.images, 4) for n, t in med_cpu.items()},
        "ditq_speedup_wall": {n: round(t / med_wall["ditq"], 3) for n, t in med_wall.items() if n != "ditq"},
        "ditq_speedup_cpu": {n: round(t / med_cpu["ditq"], 3) for n, t in med_cpu.items() if n != "ditq"},
        "what": {n: w for n, (_, w) in contenders.items()},
        "skipped": skipped,
    }
    for n in contenders:
        print(f"{n:30s} {args.images / med_wall[n]:7.2f} img/s wall, {med_cpu[n] / args.images:7.3f} cpu-s/img "
              f"(medians of {args.rounds})")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
