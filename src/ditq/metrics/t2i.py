"""Lazy construction of the text-to-image scorers (CLIP score, ImageReward, HPSv2).

The scorers live in `clip_score.py`, `image_reward.py` and `hps.py`; each class is built as
`Cls(path_or_id, device=..., **settings)` and offers `.score(uint8 [N,3,H,W], prompts, batch_size)
-> Tensor[N]` and `.settings()`. They are imported only when a run asks for them.
"""
from __future__ import annotations

import importlib

from ditq.metrics.errors import MetricInputError

# metric -> (module, class, option holding the model id or weights path, {option: constructor keyword})
SCORERS = {
    "clip": ("ditq.metrics.clip_score", "ClipScorer", "clip_model", {}),
    "image_reward": ("ditq.metrics.image_reward", "ImageRewardScorer", "image_reward_path",
                     {"image_reward_med_config": "med_config", "image_reward_tokenizer": "tokenizer"}),
    "hpsv2": ("ditq.metrics.hps", "HPSv2Scorer", "hps_path", {"hps_version": "version", "hps_tokenizer": "tokenizer"}),
}


def scorer_options(metric: str, options: dict) -> dict:
    _, _, main, extra = SCORERS[metric]
    return {main: options.get(main), **{k: options.get(k) for k in extra}}


def build_scorer(metric: str, options: dict, device: str = "cpu"):
    """The scorer for `metric`; a None path/id option leaves the scorer's own default."""
    module_name, class_name, main, extra = SCORERS[metric]
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as err:
        raise MetricInputError(f"metric {metric!r} needs {module_name}.{class_name}, "
                               f"which cannot be imported: {err}") from err
    args = () if options.get(main) is None else (options[main],)
    kwargs = {kw: options[opt] for opt, kw in extra.items() if options.get(opt) is not None}
    try:
        return cls(*args, device=device, **kwargs)
    except MetricInputError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise MetricInputError(f"metric {metric!r}: {class_name}({options.get(main)!r}) cannot be built: "
                               f"{type(err).__name__}: {err}") from err
