"""Options of each method step (torch-free dataclasses, validated with the config)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RTNOptions:
    """Round-to-nearest: weight ranges from the weights, static activation ranges from calibration."""


@dataclass
class GPTQOptions:
    """GPTQ on the weights (any number format), calibrated block by block (ditq.calibration.engine).

    Static activation ranges are not GPTQ's job: put `rtn` before `gptq` in `steps` to fit them."""

    block_size: int = 128  # columns per lazy update block
    percdamp: float = 0.01  # damping: percdamp * mean(diag H) added to the diagonal
    act_order: bool = False  # columns by descending diag(H); with groups needs static_groups
    static_groups: bool = False  # group parameters from the original weight, before the updates
    sequential: bool = True  # block k sees the outputs of the quantized blocks 0..k-1 (else FP outputs)
    conditioning_grid: bool = True  # adaLN / embedder Hessians from all labels (+ null) x all timesteps
    batch_size: int = 32  # rows per block forward (conditional + unconditional twins)
    io_budget_mb: float = 2048.0  # block I/O kept in memory; beyond it, memory-mapped files

    def check(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size} must be a positive number of columns")
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"percdamp={self.percdamp} must be in [0, 1) (a fraction of mean(diag H))")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size} must be >= 2 (a row and its unconditional twin)")
        if self.io_budget_mb < 0:
            raise ValueError(f"io_budget_mb={self.io_budget_mb} must be >= 0")
