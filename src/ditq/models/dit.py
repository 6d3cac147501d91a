"""Class-conditional DiT through diffusers' `DiTTransformer2DModel`.

One adapter serves the embedded digits model (pixel space, shipped in ditq/assets) and the
published DiT-XL/2 256/512 checkpoints (latent space, SD VAE): both are directories in the
hub layout of `facebook/DiT-XL-2-256` (transformer/, scheduler/, vae/).
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ditq.models.base import (LayerInfo, MissingCheckpointError, ModelAdapter, assign_roles,
                              read_scheduler_config)

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

# Layers whose input is a function of (t, y) only (block-wise calibration feeds them from a grid).
_CONDITIONING = re.compile(r"^transformer_blocks\.(\d+)\.norm1\.(linear|emb\.timestep_embedder\.linear_[12])$")

# The DiT paper's training schedule (used when weights=random and no scheduler config exists).
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")

# The Stable Diffusion VAE (sd-vae-ft-ema/mse) that DiT decodes with.
SD_VAE_ARCH = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextmanager
def quiet_diffusers():
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


def file_fingerprint(path: Path) -> str:
    """sha256 of the file's whole content (memoised by path, size and times: see utils/filehash)."""
    from ditq.utils.filehash import file_sha256

    return file_sha256(path)


class NonFiniteWeightsError(ValueError):
    """Loaded weights hold NaN/Inf: every sample would be meaningless, so the run stops at load."""


def check_finite_weights(module: nn.Module, what: str, cfg, where, dtype: torch.dtype) -> None:
    """Raise NonFiniteWeightsError naming the tensors of `module` that hold NaN/Inf (after the
    cast to the inference dtype, i.e. the values that would actually run)."""
    bad = []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(f"{name} ({int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} Inf of {t.numel()})")
    if not bad:
        return
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    overflow = (f" If the file is intact in float32, the values may only overflow in {str(dtype).replace('torch.', '')}: "
                "try dtype_inference=float32." if dtype != torch.float32 else "")
    raise NonFiniteWeightsError(
        f"model '{cfg.name}': {len(bad)} tensor(s) of the {what} loaded from {where} hold NaN/Inf values: "
        f"{', '.join(bad[:5])}{more}. Sampling from these weights would produce meaningless images, so ditq "
        f"stops before any sampling. Replace the checkpoint with an intact copy "
        f"({cfg.obtain_hint or 'download it again'}; or point model.path at a good copy).{overflow}"
    )


class DiTAdapter(ModelAdapter):
    def __init__(self, cfg, device: str = "cpu", dtype: str = "float32"):
        from diffusers import DiTTransformer2DModel

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
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
                with quiet_diffusers():
                    self.transformer = DiTTransformer2DModel.from_pretrained(self.root, subfolder="transformer",
                                                                             torch_dtype=self.dtype)
            except (OSError, ValueError, RuntimeError) as err:
                raise MissingCheckpointError(
                    f"cannot load the DiT transformer from {self.root / 'transformer'}: {err}. "
                    "The directory must hold diffusers' config.json and diffusion_pytorch_model.safetensors "
                    f"(as `huggingface-cli download {cfg.hub_id or 'facebook/DiT-XL-2-256'}` writes them)."
                ) from None
        with quiet_diffusers():
            self.transformer.to(self.device, self.dtype).eval().requires_grad_(False)
        if self.root is not None:
            check_finite_weights(self.transformer, "transformer", cfg, self.root / "transformer", self.dtype)
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
        with quiet_diffusers():
            vae = AutoencoderKL.from_pretrained(src, torch_dtype=self.dtype, **kw)
        vae = vae.to(self.device, self.dtype).eval().requires_grad_(False)
        check_finite_weights(vae, "VAE", cfg, Path(src) / kw.get("subfolder", ""), self.dtype)
        return vae

    # -- interface -------------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.transformer(x.to(self.dtype), timestep=t, class_labels=y).sample
        return out[:, : x.shape[1]].to(x.dtype)  # learned-sigma channels (DiT-XL/2) are not used

    def layers(self) -> list[LayerInfo]:
        return assign_roles(self.transformer, _ROLE_PATTERNS, "ditq.models.dit._ROLE_PATTERNS")

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.transformer_blocks)

    def scheduler_config(self) -> dict:
        return read_scheduler_config(self.root, DIT_SCHEDULE)

    def fingerprint(self) -> dict:
        fp = {"family": "dit", "name": self.cfg.name, "dtype": str(self.dtype)}
        if self.root is None:
            fp["random_arch"] = {k: v for k, v in dict(self.cfg.arch).items()}
            fp["seed"] = 0
            return fp
        files = {}  # whole-file sha256 of everything that shapes the outputs, the schedule included
        for sub in ("transformer", "scheduler", self.cfg.vae) if self.cfg.vae else ("transformer", "scheduler"):
            d = self.root / sub
            for p in sorted(d.glob("*")) if d.is_dir() else []:
                if p.suffix in (".safetensors", ".bin", ".json"):
                    files[f"{sub}/{p.name}"] = file_fingerprint(p)
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

    # -- block-wise calibration ------------------------------------------------------------------
    def pre_block_layers(self) -> list[str]:
        return ["pos_embed.proj"]

    def block_tail(self, hidden: torch.Tensor, call) -> torch.Tensor:
        """diffusers' DiTTransformer2DModel.forward after the blocks (final adaLN, projection,
        unpatchify), then `denoise`'s channel selection."""
        import torch.nn.functional as F

        tr = self.transformer
        t, y = call.kwargs["timestep"], call.kwargs["class_labels"]
        conditioning = tr.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=hidden.dtype)
        shift, scale = tr.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        h = tr.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]
        h = tr.proj_out_2(h)
        p, c = tr.patch_size, tr.out_channels
        side = int(h.shape[1] ** 0.5)
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, side, side, p, p, c))
        out = h.reshape(-1, c, side * p, side * p)
        return out[:, : call.out_shape[1]].to(call.out_dtype)

    def conditioning_layers(self) -> dict[str, object]:
        """The timestep embedder's linears and the adaLN linear of every block (their inputs are
        functions of (t, y) only), and the final layer's adaLN projection."""
        out: dict[str, object] = {}
        for name, _ in self.transformer.named_modules():
            m = _CONDITIONING.match(name)
            if m:
                out[name] = int(m.group(1))
        out["proj_out_1"] = "tail"
        return out

    def _emb_module(self, segment):
        blocks = self.transformer.transformer_blocks
        return blocks[0 if segment == "tail" else int(segment)].norm1

    @torch.no_grad()
    def conditioning_inputs(self, segment, t: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch.nn.functional as F

        norm1 = self._emb_module(segment)
        prefix = "" if segment == "tail" else f"transformer_blocks.{int(segment)}.norm1."
        emb = norm1.emb
        got: dict[str, torch.Tensor] = {}
        hooks = []
        if segment != "tail":
            for sub, mod in emb.named_modules():
                if isinstance(mod, nn.Linear) or hasattr(mod, "weight_quantizer"):
                    name = f"{prefix}emb.{sub}"
                    hooks.append(mod.register_forward_pre_hook(
                        lambda m, args, name=name: got.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))))
        try:
            cond = emb(t.to(self.device), y.to(self.device), hidden_dtype=self.dtype)
        finally:
            for h in hooks:
                h.remove()
        if segment == "tail":
            return {"proj_out_1": F.silu(cond)}
        got[f"{prefix}linear"] = norm1.silu(cond)
        return got
