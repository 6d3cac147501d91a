"""Model adapters: load a diffusion model (embedded or published) behind one interface.

`load_adapter(model_cfg, device, dtype)` returns a `ModelAdapter` (see `base.py`).
"""
from ditq.models.base import MissingCheckpointError, ModelAdapter  # noqa: F401
from ditq.models.registry import load_adapter  # noqa: F401
