"""OmegaConf resolvers used by conf/ (registered once, idempotent)."""
from __future__ import annotations

import uuid

from omegaconf import OmegaConf


def register_resolvers() -> None:
    from ditq.paths import ASSETS_DIR, project_root

    if not OmegaConf.has_resolver("ditq_root"):
        OmegaConf.register_new_resolver("ditq_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("ditq_assets"):
        OmegaConf.register_new_resolver("ditq_assets", lambda: str(ASSETS_DIR))
    if not OmegaConf.has_resolver("ditq_uid"):
        # a random id drawn once per composed config (cached): Hydra copies a sweep's cache to each
        # job, so the jobs of one sweep share it and two sweeps (or runs) never do; see conf/hydra
        OmegaConf.register_new_resolver("ditq_uid", lambda: uuid.uuid4().hex[:8], use_cache=True)
