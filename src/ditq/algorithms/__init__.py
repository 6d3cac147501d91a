"""Quantization algorithms as pure functions on tensors (no modules, no configs): the method steps
in `ditq.methods` call them. Format-agnostic: formats are reached only through `ditq.quant.Quantizer`."""
from .gptq import GPTQError, GPTQResult, gptq_quantize

__all__ = ["GPTQError", "GPTQResult", "gptq_quantize"]
