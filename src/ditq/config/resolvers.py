"""OmegaConf resolvers used by conf/ (registered once, idempotent)."""
from __future__ import annotations

from omegaconf import OmegaConf


def register_resolvers() -> None:
    from ditq.paths import ASSETS_DIR, project_root

    if not OmegaConf.has_resolver("ditq_root"):
        OmegaConf.register_new_resolver("ditq_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("ditq_assets"):
        OmegaConf.register_new_resolver("ditq_assets", lambda: str(ASSETS_DIR))
