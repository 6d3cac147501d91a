"""Unconditional U-Net diffusion models through diffusers' `UNet2DModel`.

One adapter serves the embedded digits U-Net (pixel space, shipped in ditq/assets), DDPM on
CIFAR-10 (`google/ddpm-cifar10-32`: pixel space, the hub repo holds the U-Net at its root) and the
latent-diffusion U-Nets (`CompVis/ldm-celebahq-256`, and LSUN Bedroom / Church converted from the
latent-diffusion release by `python -m ditq.models.convert_ldm`: `unet/`, `vqvae/` or `vae/`,
`scheduler/`). The models are unconditional: `conditioning = "none"`, y is all zeros and there is
no null condition, so guidance is refused before any work (`preflight.check_guidance`).

Roles (every Linear/Conv2d gets one; `layers()` raises on any other):
  conv    the ResNets' conv1 / conv2 / conv_shortcut and the down/up-samplers' convolutions
  qkv     attention to_q / to_k / to_v;   proj  attention to_out.0
  adaln   each ResNet's time_emb_proj (the block's conditioning projection, as DiT's adaLN linear)
  embed   conv_in and the timestep embedding MLP (time_embedding.linear_1/2)
  final   conv_out
A U-Net is not a chain of blocks: the down blocks push their outputs on a skip stack that the up
blocks pop. `UNetRunner` runs it segment by segment for the block-wise engine (GPTQ) with the state
(hidden states, *skip stack) passed between segments.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from ditq.calibration.blocks import PRE, BlockCall, BlockRunner
from ditq.models.base import LayerInfo, MissingCheckpointError, ModelAdapter, assign_roles, read_scheduler_config
from ditq.models.dit import DTYPES, check_finite_weights, file_fingerprint, hub_offline, quiet_diffusers

_ROLE_PATTERNS = [
    (re.compile(r"^.*attentions\.\d+\.to_[qkv]$"), "qkv"),
    (re.compile(r"^.*attentions\.\d+\.to_out\.0$"), "proj"),
    (re.compile(r"^.*(resnets|downsamplers|upsamplers)\.\d+\.time_emb_proj$"), "adaln"),
    (re.compile(r"^.*(resnets|downsamplers|upsamplers)\.\d+\.(conv1|conv2|conv_shortcut)$"), "conv"),
    (re.compile(r"^.*(downsamplers|upsamplers)\.\d+\.conv$"), "conv"),
    (re.compile(r"^(conv_in|time_embedding\.linear_[12])$"), "embed"),
    (re.compile(r"^conv_out$"), "final"),
]
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")
_TIME_EMB_PROJ = re.compile(r"^(.*(resnets|downsamplers|upsamplers)\.\d+)\.time_emb_proj$")
HEADS_KEY = "ditq_num_attention_heads"  # LDM's fixed head count (num_heads): not a UNet2DModel argument


def set_attention_heads(unet: nn.Module, heads: int) -> None:
    """Give every attention of `unet` `heads` heads. UNet2DModel has one head width (attention_head_dim);
    latent-diffusion's num_heads fixes the head count at every width instead (LSUN Churches: 8 heads of
    24..96 channels), so such a model is built with single-head attentions and re-split here."""
    from diffusers.models.attention_processor import Attention

    for name, m in unet.named_modules():
        if isinstance(m, Attention):
            if m.inner_dim % heads:
                raise ValueError(f"{name}: width {m.inner_dim} is not divisible into {heads} heads")
            m.heads = heads
            m.scale = (m.inner_dim // heads) ** -0.5

# DDPM's training schedule (used when weights=random and no scheduler config exists).
DDPM_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def _unet_dir(root: Path) -> tuple[Path, dict]:
    """Where the U-Net's config.json is: `<root>/unet/` (pipeline layout) or `<root>/` (DDPM's hub repo)."""
    if (root / "unet" / "config.json").is_file():
        return root, {"subfolder": "unet"}
    return root, {}


def _has_unet(path: Path) -> bool:
    return (path / "unet" / "config.json").is_file() or (path / "config.json").is_file()


def resolve_unet_dir(cfg) -> Path | None:
    """The local directory holding the model, or None for random weights (errors name the fix)."""
    if cfg.weights == "random":
        return None
    if cfg.path and _has_unet(Path(cfg.path)):
        return Path(cfg.path)
    where = cfg.path or "<a local directory>"
    problem = (f"the directory {cfg.path} does not exist or holds no unet/config.json (nor config.json)"
               if cfg.path else "no model.path is set")
    if not cfg.hub_id:
        how = cfg.obtain_hint or "point model.path at a directory in diffusers' layout (unet/, scheduler/)"
        raise MissingCheckpointError(f"Weights for model '{cfg.name}' are not available: {problem}. {how}.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.hub_id, local_files_only=hub_offline()))
    except Exception as err:  # noqa: BLE001 - any hub failure means: not available here
        offline = ", and the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else ""
        raise MissingCheckpointError(
            f"Weights for model '{cfg.name}' are not available: {problem}{offline}. Download them on a machine "
            f"with network access, e.g. `huggingface-cli download {cfg.hub_id} --local-dir {where}`, and copy the "
            f"directory here, or set model.path=/path/to/{cfg.hub_id.split('/')[-1]} (hub said: {type(err).__name__})"
        ) from None


class UNetAdapter(ModelAdapter):
    conditioning = "none"
    is_chain = False  # skip stack: `block_runner()` is UNetRunner, AdaRound's chain runner refuses it
    num_classes = 1
    cfg_channels = None

    def __init__(self, cfg, device: str = "cpu", dtype: str = "float32"):
        from diffusers import UNet2DModel

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.root = resolve_unet_dir(cfg)
        if self.root is None:
            torch.manual_seed(0)
            arch = dict(cfg.arch)
            heads = arch.pop(HEADS_KEY, None)
            self.unet = UNet2DModel(**arch)
            if heads:
                set_attention_heads(self.unet, int(heads))
        else:
            src, kw = _unet_dir(self.root)
            try:
                with quiet_diffusers():
                    self.unet = UNet2DModel.from_pretrained(src, torch_dtype=self.dtype, **kw)
                import json

                raw = json.loads((src / kw.get("subfolder", "") / "config.json").read_text())
                if raw.get(HEADS_KEY):
                    set_attention_heads(self.unet, int(raw[HEADS_KEY]))
            except (OSError, ValueError, RuntimeError) as err:
                raise MissingCheckpointError(
                    f"cannot load the U-Net from {src / kw.get('subfolder', '')}: {err}. The directory must hold "
                    "diffusers' config.json and diffusion_pytorch_model.safetensors (or .bin); convert a "
                    "latent-diffusion checkpoint with `python -m ditq.models.convert_ldm`."
                ) from None
        with quiet_diffusers():
            self.unet.to(self.device, self.dtype).eval().requires_grad_(False)
        if self.root is not None:
            check_finite_weights(self.unet, "U-Net", cfg, self.root, self.dtype)
        uc = self.unet.config
        if uc.class_embed_type is not None or getattr(uc, "num_class_embeds", None):
            raise ValueError(f"model '{cfg.name}': the U-Net is class-conditional; ditq's U-Net adapter serves "
                             "unconditional models")
        self.vae = self._load_vae(cfg) if cfg.vae else None
        self._check_ldm_scale(cfg)
        self.latent_shape = (uc.in_channels, uc.sample_size, uc.sample_size)

    def _check_ldm_scale(self, cfg) -> None:
        """A directory written by `convert_ldm` records LDM's latent scale_factor (LSUN Churches learns it:
        scale_by_std); decoding with another model.vae_scale would be silently wrong."""
        meta = self.root / "ldm_conversion.json" if self.root is not None else None
        if meta is None or not meta.is_file():
            return
        import json

        sf = json.loads(meta.read_text()).get("scale_factor")
        if sf is not None and abs(float(sf) - float(cfg.vae_scale)) > 1e-6 * max(1.0, abs(float(sf))):
            raise ValueError(f"model '{cfg.name}': model.vae_scale={cfg.vae_scale} but the converted checkpoint's "
                             f"latent scale_factor is {float(sf):.10g} ({meta}): set model.vae_scale={float(sf):.10g}")

    def _load_vae(self, cfg):
        """The autoencoder of a latent model: `<root>/<cfg.vae>/` (VQModel for `vqvae`, else AutoencoderKL
        unless its config names the class); random weights build it from `model.vae_arch`."""
        from diffusers import AutoencoderKL, VQModel

        if self.root is None:
            arch = dict(getattr(self.cfg, "vae_arch", None) or {})
            if not arch:
                raise ValueError(f"model '{cfg.name}': weights=random with a VAE needs model.vae_arch")
            kind = arch.pop("_class", "VQModel")
            torch.manual_seed(0)
            vae = (VQModel if kind == "VQModel" else AutoencoderKL)(**arch)
            with quiet_diffusers():
                return vae.to(self.device, self.dtype).eval().requires_grad_(False)
        sub = self.root / cfg.vae
        if not (sub / "config.json").is_file():
            raise MissingCheckpointError(f"model '{cfg.name}': the autoencoder is missing: {sub}/config.json not "
                                         f"found ({cfg.obtain_hint or 'download the whole model directory'})")
        import json

        cls_name = json.loads((sub / "config.json").read_text()).get("_class_name", "")
        cls = VQModel if cls_name == "VQModel" or (not cls_name and cfg.vae == "vqvae") else AutoencoderKL
        with quiet_diffusers():
            vae = cls.from_pretrained(self.root, subfolder=cfg.vae, torch_dtype=self.dtype)
        with quiet_diffusers():
            vae = vae.to(self.device, self.dtype).eval().requires_grad_(False)
        check_finite_weights(vae, "autoencoder", cfg, sub, self.dtype)
        return vae

    # -- interface -------------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.unet(x.to(self.dtype), timestep=t).sample
        return out[:, : x.shape[1]].to(x.dtype)

    def layers(self) -> list[LayerInfo]:
        found = assign_roles(self.unet, _ROLE_PATTERNS, "ditq.models.unet._ROLE_PATTERNS")
        index = self._block_index()
        return [LayerInfo(i.name, i.role, index.get(self._block_key(i.name))) for i in found]

    def blocks(self) -> list[nn.Module]:
        u = self.unet
        return [*u.down_blocks, *([u.mid_block] if u.mid_block is not None else []), *u.up_blocks]

    def block_runner(self) -> "UNetRunner":
        return UNetRunner(self)

    def scheduler_config(self) -> dict:
        return read_scheduler_config(self.root, DDPM_SCHEDULE, places=("scheduler", ""))  # "": DDPM's hub repo

    def fingerprint(self) -> dict:
        fp = {"family": "unet", "name": self.cfg.name, "dtype": str(self.dtype)}
        if self.root is None:
            fp["random_arch"] = dict(self.cfg.arch)
            fp["seed"] = 0
            return fp
        files = {}
        subs = ["unet", "scheduler", *([self.cfg.vae] if self.cfg.vae else [])]
        for d in [self.root / s for s in subs] + [self.root]:
            for p in sorted(d.glob("*")) if d.is_dir() else []:
                if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"):
                    files[str(p.relative_to(self.root))] = file_fingerprint(p)
        fp["files"] = files
        return fp

    # -- block-wise calibration ------------------------------------------------------------------
    @staticmethod
    def _block_key(name: str):
        m = _BLOCK.match(name)
        if not m:
            return None
        return "mid" if m.group(3) else (m.group(1), int(m.group(2)))

    def _block_index(self) -> dict:
        u = self.unet
        keys = [("down_blocks", i) for i in range(len(u.down_blocks))]
        keys += ["mid"] if u.mid_block is not None else []
        keys += [("up_blocks", i) for i in range(len(u.up_blocks))]
        return {k: i for i, k in enumerate(keys)}

    def pre_block_layers(self) -> list[str]:
        return ["conv_in", "time_embedding.linear_1", "time_embedding.linear_2"]

    def conditioning_layers(self) -> dict[str, object]:
        """The timestep MLP (segment "pre") and every ResNet's time_emb_proj (its block): their inputs
        are functions of t only."""
        index = self._block_index()
        out: dict[str, object] = {"time_embedding.linear_1": PRE, "time_embedding.linear_2": PRE}
        for name, _ in self.unet.named_modules():
            if _TIME_EMB_PROJ.match(name):
                out[name] = index[self._block_key(name)]
        return out

    @torch.no_grad()
    def conditioning_inputs(self, segment, t: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        u = self.unet
        t = t.to(self.device)
        t_emb = u.time_proj(t).to(self.dtype)
        if segment == PRE:
            te = u.time_embedding
            return {"time_embedding.linear_1": t_emb, "time_embedding.linear_2": te.act(te.linear_1(t_emb))}
        emb = u.time_embedding(t_emb)  # each ResNet's time_emb_proj reads nonlinearity(emb)
        return {name: u.get_submodule(name.rsplit(".", 1)[0]).nonlinearity(emb)
                for name, seg in self.conditioning_layers().items() if seg == int(segment)}


class UNetRunner(BlockRunner):
    """The block-wise engine's runner for `UNet2DModel`: segments "pre" (timestep MLP, conv_in), the
    down blocks, the mid block, the up blocks, "tail" (norm, SiLU, conv_out). The state between
    segments is the tuple (hidden states, *skip stack): a down block pushes its outputs, an up block
    pops as many as it has ResNets. `replay` equals `adapter.denoise` exactly (tested). GPTQ's engine
    and AdaRound's block reconstruction both run on it."""

    def __init__(self, adapter: UNetAdapter):
        self.adapter = adapter
        u = adapter.unet
        self.blocks = adapter.blocks()
        self.kinds = (["down"] * len(u.down_blocks) + (["mid"] if u.mid_block is not None else [])
                      + ["up"] * len(u.up_blocks))
        if any(hasattr(b, "skip_conv") for b in self.blocks) or u.config.time_embedding_type == "fourier":
            raise TypeError(f"{type(adapter).__name__}: skip-sample (score-SDE) U-Net blocks and Fourier "
                            "timestep embeddings are not supported by the block runner")

    def first_input(self, args, kwargs):
        """The first down block is called with keywords: the state (hidden, skip stack = (conv_in output,))
        and the timestep embedding."""
        h = kwargs["hidden_states"]
        return (h, h), (), {"temb": kwargs["temb"]}

    def block_forward(self, k: int, state, call: BlockCall):
        """Segment k on the state (hidden states, *skip stack) -> the next state, in the caller's grad
        mode; the stack entries it passes through are its inputs, unchanged (zero reconstruction error)."""
        sample, stack = state[0], tuple(state[1:])
        block, emb = self.blocks[k], call.kwargs["temb"]
        kind = self.kinds[k]
        if kind == "down":
            sample, res = block(hidden_states=sample, temb=emb)
            return (sample, *stack, *res)
        if kind == "mid":
            return (block(sample, emb), *stack)
        n = len(block.resnets)
        return (block(sample, stack[-n:], emb), *stack[:-n])

    def tail_forward(self, state, call: BlockCall) -> torch.Tensor:
        u = self.adapter.unet
        if len(state) != 1:
            raise RuntimeError(f"U-Net runner: {len(state) - 1} skip tensors left after the up blocks")
        out = u.conv_out(u.conv_act(u.conv_norm_out(state[0])))
        return out[:, : call.out_shape[1]].to(call.out_dtype)
