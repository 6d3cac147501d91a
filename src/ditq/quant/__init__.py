"""Number formats and quantizers shared by every method: format and algorithm are independent.

`ditq.quant.spec` (names, configs, validation) imports without torch; the torch parts
(formats, quantizers, layers) load on first access, so `from ditq.quant import parse_format`
stays fast. See docs/quant.md.
"""
from __future__ import annotations

import importlib

from .spec import (
    FormatError,
    FormatSpec,
    NonFiniteError,
    QuantizerConfig,
    available_formats,
    parse_format,
    validate_quantizer_config,
)

_LAZY = {
    "Format": "formats",
    "get_format": "formats",
    "QParams": "quantizer",
    "Quantizer": "quantizer",
    "build_quantizer": "quantizer",
    "QuantLinear": "modules",
    "QuantConv2d": "modules",
    "round_ste": "ste",
    "set_kernel_threads": "runtime",
    "Rotation": "hadamard",
}

__all__ = [
    "FormatError",
    "FormatSpec",
    "NonFiniteError",
    "QuantizerConfig",
    "available_formats",
    "parse_format",
    "validate_quantizer_config",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
