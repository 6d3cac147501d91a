"""Class-conditional DiT through diffusers' `DiTTransformer2DModel`.

One adapter serves the embedded digits model (pixel space, shipped in ditq/assets) and the
published DiT-XL/2 256/512 checkpoints (latent space, SD VAE): both are directories in the
hub layout of `facebook/DiT-XL-2-256` (transformer/, scheduler/, vae/).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ditq.models.base import LayerInfo, MissingCheckpointError, ModelAdapter

# diffusers module paths -> roles. Every Linear/Conv2d of the model must match one.
_ROLE_PATTERNS = [
    (re.compile(r"^transformer_blocks\.(\d+)\.attn1\.to_[qkv]$"), "qkv"),
    (re.compile(r"^transformer_blocks\.(\d+)\.attn1\.to_out\.0$"), "proj"),
    (re.compile(r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj$"), "fc1"),
    (re.compile(r"^transformer_blocks\.(\d+)\.ff\.net\.2$"), "fc2"),
    (re.compile(r"^transformer_blocks\.(\d+)\.norm1\.linear$"), "adaln"),
    (re.compile(r"^transformer_blocks\.(\d+)\.norm1\.emb\..+$"), "embed"),
    (re.compile(r"^pos_embed\.proj$"), "embed"),
    (re.compile(r"^proj_out_[12]$"), "final"),
]

# The DiT paper's training schedule (used when weights=random and no scheduler config exists).
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")

# The Stable Diffusion VAE (sd-vae-ft-ema/mse) that DiT decodes with.
SD_VAE_ARCH = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextmanager
def _quiet_diffusers():
    """diffusers' loading notices (no `accelerate`, dtype casts) are noise here; errors still raise."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _download_hint(cfg, what: str) -> str:
    where = cfg.path or "<a local directory>"
    problem = (f"the directory {cfg.path} does not exist or lacks transformer/config.json" if cfg.path
               else "no model.path is set")
    offline = ", and the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() and cfg.hub_id else ""
    if cfg.hub_id is None:
        how = cfg.obtain_hint or "point model.path at a directory in the hub layout"
        return f"{what} for model '{cfg.name}' are not available: {problem}. {how}."
    return (
        f"{what} for model '{cfg.name}' are not available: {problem}{offline}. "
        f"Download them on a machine with network access, e.g. `huggingface-cli download {cfg.hub_id} "
        f"--local-dir {where}`, and copy the directory here, or set model.path=/path/to/{cfg.hub_id.split('/')[-1]}."
    )


def resolve_model_dir(cfg) -> Path | None:
    """The local directory holding the model (hub layout), or None for random weights."""
    if cfg.weights == "random":
        return None
    if cfg.path and (Path(cfg.path) / "transformer" / "config.json").is_file():
        return Path(cfg.path)
    if cfg.weights == "local" and not cfg.hub_id:
        raise MissingCheckpointError(_download_hint(cfg, "Weights"))
    if cfg.hub_id is None:
        raise MissingCheckpointError(_download_hint(cfg, "Weights"))
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.hub_id, local_files_only=hub_offline()))
    except Exception as err:  # noqa: BLE001 - any hub failure means: not available here
        raise MissingCheckpointError(_download_hint(cfg, "Weights") + f" (hub said: {type(err).__name__})") from None


def _file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's size, first and last MiB: cheap for multi-GB checkpoints."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


class DiTAdapter(ModelAdapter):
    def __init__(self, cfg, device: str = "cpu", dtype: str = "float32"):
        from diffusers import DiTTransformer2DModel

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.root = resolve_model_dir(cfg)
        if self.root is None:
            torch.manual_seed(0)
            self.transformer = DiTTransformer2DModel(**dict(cfg.arch))
            # converted DiT checkpoints hold identical per-block copies of one embedder: mimic that
            first = self.transformer.transformer_blocks[0].norm1.emb.state_dict()
            for block in self.transformer.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(first)
        else:
            try:
                with _quiet_diffusers():
                    self.transformer = DiTTransformer2DModel.from_pretrained(self.root, subfolder="transformer",
                                                                             torch_dtype=self.dtype)
            except (OSError, ValueError, RuntimeError) as err:
                raise MissingCheckpointError(
                    f"cannot load the DiT transformer from {self.root / 'transformer'}: {err}. "
                    "The directory must hold diffusers' config.json and diffusion_pytorch_model.safetensors "
                    f"(as `huggingface-cli download {cfg.hub_id or 'facebook/DiT-XL-2-256'}` writes them)."
                ) from None
        with _quiet_diffusers():
            self.transformer.to(self.device, self.dtype).eval().requires_grad_(False)
        tc = self.transformer.config
        self.num_classes = tc.num_embeds_ada_norm
        if self.num_classes != cfg.num_classes:
            raise ValueError(
                f"model.num_classes={cfg.num_classes} but the checkpoint has {self.num_classes} classes"
            )
        self.null_class = self.num_classes  # diffusers' LabelEmbedding keeps the cfg entry last
        self.cfg_channels = cfg.cfg_channels
        self.vae = self._load_vae(cfg) if cfg.vae else None
        self.latent_shape = (tc.in_channels, tc.sample_size, tc.sample_size)

    # -- loading ---------------------------------------------------------------------------------
    def _load_vae(self, cfg):
        from diffusers import AutoencoderKL

        if self.root is None:  # random weights: the SD VAE architecture DiT uses, randomly initialised
            torch.manual_seed(0)
            vae = AutoencoderKL(**SD_VAE_ARCH)
            return vae.to(self.device, self.dtype).eval().requires_grad_(False)
        if (self.root / cfg.vae / "config.json").is_file():
            src, kw = self.root, {"subfolder": cfg.vae}
        elif (Path(cfg.vae) / "config.json").is_file():
            src, kw = Path(cfg.vae), {}
        else:
            try:
                from huggingface_hub import snapshot_download

                src, kw = Path(snapshot_download(cfg.vae, local_files_only=hub_offline())), {}
            except Exception:  # noqa: BLE001
                raise MissingCheckpointError(
                    f"VAE {cfg.vae!r} for model '{cfg.name}' not found: neither {self.root / cfg.vae} nor a "
                    f"directory {cfg.vae!r} holds its config.json"
                    f"{' and the hub is offline' if hub_offline() else ''}. Download it with "
                    f"`huggingface-cli download {cfg.vae} --local-dir <dir>` and set model.vae=<dir>."
                ) from None
        with _quiet_diffusers():
            vae = AutoencoderKL.from_pretrained(src, torch_dtype=self.dtype, **kw)
        return vae.to(self.device, self.dtype).eval().requires_grad_(False)

    # -- interface -------------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.transformer(x.to(self.dtype), timestep=t, class_labels=y).sample
        return out[:, : x.shape[1]].to(x.dtype)  # learned-sigma channels (DiT-XL/2) are not used

    def layers(self) -> list[LayerInfo]:
        found = []
        for name, mod in self.transformer.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                continue
            for pattern, role in _ROLE_PATTERNS:
                m = pattern.match(name)
                if m:
                    block = int(m.group(1)) if m.groups() else None
                    found.append(LayerInfo(name=name, role=role, block=block))
                    break
            else:
                raise RuntimeError(f"DiT layer {name} ({type(mod).__name__}) has no role; extend _ROLE_PATTERNS")
        return found

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.transformer_blocks)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            x = self.vae.decode(x.to(self.dtype) / self.cfg.vae_scale).sample.float()
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def scheduler_config(self) -> dict:
        if self.root is not None:
            path = self.root / "scheduler" / "scheduler_config.json"
            if path.is_file():
                conf = json.loads(path.read_text())
                return {k: v for k, v in conf.items() if not k.startswith("_")}
        return dict(DIT_SCHEDULE)

    def fingerprint(self) -> dict:
        fp = {"family": "dit", "name": self.cfg.name, "dtype": str(self.dtype)}
        if self.root is None:
            fp["random_arch"] = {k: v for k, v in dict(self.cfg.arch).items()}
            fp["seed"] = 0
            return fp
        files = {}
        for sub in ("transformer", self.cfg.vae) if self.cfg.vae else ("transformer",):
            d = self.root / sub
            for p in sorted(d.glob("*")) if d.is_dir() else []:
                if p.suffix in (".safetensors", ".bin", ".json"):
                    files[f"{sub}/{p.name}"] = _file_fingerprint(p)
        fp["files"] = files
        return fp

    def unique_parameters(self) -> list[nn.Parameter]:
        """diffusers keeps one copy of the timestep/label embedder per block (the original DiT has
        one, shared): copies equal to block 0's count once."""
        blocks = self.transformer.transformer_blocks
        ref = dict(blocks[0].norm1.emb.named_parameters())
        dup: set[int] = set()
        for block in blocks[1:]:
            params = dict(block.norm1.emb.named_parameters())
            if all(torch.equal(params[k], ref[k]) for k in ref):
                dup.update(id(p) for p in params.values())
        return [p for p in self.transformer.parameters() if id(p) not in dup]
