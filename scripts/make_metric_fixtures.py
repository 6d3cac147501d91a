"""Produce the parity fixtures of tests/metrics from the reference implementations.

pytorch-fid, torch-fidelity (torchmetrics' Inception) and lpips all import torchvision, which must
never enter ditq's environment. Run this script in a separate, throwaway environment instead:

    python3 -m venv /tmp/oracle-venv
    PIP_FIND_LINKS= /tmp/oracle-venv/bin/pip install --isolated --index-url https://pypi.org/simple \
        torch==2.13.0 torchvision==0.28.0 pytorch-fid==0.3.0 torch-fidelity==0.4.0 torchmetrics==1.9.0 \
        lpips==0.1.4 numpy scipy pillow
    /tmp/oracle-venv/bin/python scripts/make_metric_fixtures.py

(`PIP_FIND_LINKS=` keeps pip from taking the local CPU-only torch wheel; the CUDA build runs on
the CPU.) Their real weights cannot be downloaded, so every network gets the deterministic random
weights of `ditq.metrics.random_weights` (the same tensors ditq's tests rebuild offline; a checksum
of each state dict is stored to prove it), fed through the libraries' own loading paths.

Writes tests/fixtures/metrics/{inception_parity.npz, lpips_parity.npz, oracle_meta.json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ditq.metrics.inception import random_inception_state_dict  # noqa: E402
from ditq.metrics.lpips_net import random_lpips_state_dict  # noqa: E402
from ditq.metrics.random_weights import state_dict_checksum  # noqa: E402

SEED = 1234
INPUT_SEED = 99


def fixture_inputs() -> dict[str, torch.Tensor]:
    """Small uint8 images; the tests read them back from the fixture rather than regenerating them."""
    g = torch.Generator().manual_seed(INPUT_SEED)
    # smooth-ish content: random coarse grid upsampled, plus noise
    coarse = torch.randint(0, 256, (3, 3, 9, 9), generator=g).float()
    smooth = F.interpolate(coarse, size=(37, 37), mode="bicubic", align_corners=False)
    small = (smooth + torch.randn(smooth.shape, generator=g) * 12).clamp(0, 255).round().to(torch.uint8)
    rect = torch.randint(0, 256, (3, 3, 48, 64), generator=g).to(torch.uint8)  # non-square: checks the axes
    pairs_a = torch.randint(0, 256, (4, 3, 64, 64), generator=g).to(torch.uint8)
    pairs_b = (pairs_a.float() + torch.randn(pairs_a.shape, generator=g) * 30).clamp(0, 255).round().to(torch.uint8)
    return {"small": small, "rect": rect, "pairs_a": pairs_a, "pairs_b": pairs_b}


def pytorch_fid_outputs(state: dict, x299: torch.Tensor) -> tuple[dict[str, np.ndarray], torch.nn.Module]:
    import pytorch_fid.inception as pfi

    pfi.load_state_dict_from_url = lambda *a, **k: {k2: v.clone() for k2, v in state.items()}
    model = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    captured = {}
    mixed_6d = model.blocks[2][6]  # Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e
    mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.__setitem__("m6d", o))
    with torch.no_grad():
        pool = model(x299)[0].flatten(1)
    full = pfi.fid_inception_v3().eval()  # same weights, with the 1008-class fc
    logits = (pool @ full.fc.weight.T).detach()
    return {"pfid_pool": pool.numpy(), "pfid_mixed6d_1x1_c7": captured["m6d"][:, :7].numpy(),
            "pfid_logits_nobias": logits.numpy()}, full


def torch_fidelity_outputs(weights_path: str, images: torch.Tensor) -> dict[str, np.ndarray]:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                     feature_extractor_weights_path=weights_path).eval()
    with torch.no_grad():
        pool, logits = fe(images)
    return {"tfid_pool": pool.numpy(), "tfid_logits_unbiased": logits.numpy()}


def torchmetrics_outputs(weights_path: str, images: torch.Tensor) -> dict[str, np.ndarray]:
    from torchmetrics.image.fid import NoTrainInceptionV3

    out = {}
    for antialias in (True, False):
        net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path,
                                 antialias=antialias)
        with torch.no_grad():
            out[f"tm_pool_antialias_{antialias}"] = net(images).numpy()
    return out


def lpips_outputs(a: torch.Tensor, b: torch.Tensor) -> tuple[dict, dict]:
    import lpips

    arrays, keys = {}, {}
    for net in ("alex", "vgg"):
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False).eval()
        state = random_lpips_state_dict(net, SEED)
        # lpips registers each head twice (lin0 and the ModuleList alias lins.0)
        aliased = {**state, **{f"lins.{k[3]}.{k.split('.', 1)[1]}": v for k, v in state.items() if k.startswith("lin")}}
        model.load_state_dict(aliased, strict=True)
        with torch.no_grad():
            d = model(a.float() / 127.5 - 1, b.float() / 127.5 - 1).flatten()
        arrays[f"lpips_{net}"] = d.numpy()
        keys[net] = {"keys": sorted(model.state_dict()), "checksum": state_dict_checksum(state)}
    return arrays, keys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "metrics"))
    out_dir = Path(p.parse_args().out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    inputs = fixture_inputs()
    state = random_inception_state_dict(SEED)
    x299 = F.interpolate(inputs["small"].float() / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1

    with tempfile.TemporaryDirectory() as tmp:
        weights_path = str(Path(tmp) / "random_inception.pth")
        torch.save(state, weights_path)
        pfid, full = pytorch_fid_outputs(state, x299)
        tfid = torch_fidelity_outputs(weights_path, inputs["rect"])
        tm = torchmetrics_outputs(weights_path, inputs["rect"])
    lp, lpips_keys = lpips_outputs(inputs["pairs_a"], inputs["pairs_b"])

    np.savez_compressed(out_dir / "inception_parity.npz", small=inputs["small"].numpy(), rect=inputs["rect"].numpy(),
                        x299_checksum=np.float64(x299.double().abs().sum()), **pfid, **tfid, **tm)
    np.savez_compressed(out_dir / "lpips_parity.npz", pairs_a=inputs["pairs_a"].numpy(),
                        pairs_b=inputs["pairs_b"].numpy(), **lp)

    import lpips
    import pytorch_fid
    import torch_fidelity
    import torchmetrics
    import torchvision

    pfid_keys = {k: list(v.shape) for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    meta = {
        "seed": SEED,
        "inception_checksum": state_dict_checksum(state),
        "pytorch_fid_state_dict_shapes": pfid_keys,
        "lpips": lpips_keys,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "pytorch_fid": pytorch_fid.__version__, "torch_fidelity": torch_fidelity.__version__,
                     "torchmetrics": torchmetrics.__version__, "lpips": getattr(lpips, "__version__", "0.1.4")},
        "made_by": "scripts/make_metric_fixtures.py",
    }
    (out_dir / "oracle_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    for f in sorted(out_dir.iterdir()):
        print(f"{f.name}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
