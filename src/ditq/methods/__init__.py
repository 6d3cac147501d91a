"""Quantization algorithms as steps; a method config is an ordered list of steps.

Steps are format-agnostic: they act on `QuantLinear` layers through their quantizers
(`ditq.quant`), never on a number format directly.
"""
