"""ditq: low-bit post-training quantization of diffusion transformers.

Subpackages, in the order a run uses them (no stage imports a later one):
config -> models -> data -> sampling -> calibration -> quant -> methods -> metrics -> tracking.
`ditq.pipeline` wires them together; `ditq.cli` is the Hydra entry point.
"""

__version__ = "0.1.0"
