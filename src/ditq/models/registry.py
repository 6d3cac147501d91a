"""Model family name -> adapter class."""
from __future__ import annotations

from ditq.models.base import ModelAdapter


def load_adapter(cfg, device: str = "cpu", dtype: str = "float32") -> ModelAdapter:
    family = cfg.family
    if family == "dit":
        from ditq.models.dit import DiTAdapter

        return DiTAdapter(cfg, device=device, dtype=dtype)
    if family == "hunyuan":
        from ditq.models.hunyuan import HunyuanDiTAdapter

        return HunyuanDiTAdapter(cfg, device=device, dtype=dtype)
    if family == "pixart":
        from ditq.models.pixart import PixArtAdapter

        return PixArtAdapter(cfg, device=device, dtype=dtype)
    if family == "unet":
        from ditq.models.unet import UNetAdapter

        return UNetAdapter(cfg, device=device, dtype=dtype)
    raise ValueError(f"model.family={family!r} is not known; choose one of: dit, hunyuan, pixart, unet")
