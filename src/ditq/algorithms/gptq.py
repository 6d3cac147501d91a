"""GPTQ (Frantar et al., 2023): quantize a weight column by column, spreading each column's error
over the columns not yet quantized so that the layer's output error tr((W - Q) H (W - Q)^T) stays
small. Format-agnostic: the number format is reached only through the Quantizer interface
(`compute_params`, `quantize_with`, `group_size`, `fit`), never a format object.

Structure (as IST-DASLab/gptq `fasterquant`): H is symmetrized ((H + H^T) / 2); dead columns
(H[i,i] == 0) get H[i,i] = 1 and W[:, i] = 0; damping `percdamp * mean(diag H)` on the diagonal
(retried x10 if the Cholesky fails); U = upper Cholesky factor of H^-1; lazy block updates
(`block_size` columns at a time: the error propagates inside the block column by column, then to
all later columns with one matmul). Optional act_order: columns in descending diag(H).

Groups (`quantizer.group_size`: per_group INT/FP grids, or the block of MX / NVFP4) run along the
input dim. Without static groups, a group's parameters are computed when the group starts, on the
weights updated by the errors of ALL earlier columns, as in the paper's Algorithm 1. (The reference
code reads those columns from the not-yet-updated matrix when a group starts inside a lazy block,
i.e. when group_size < block_size; here the pending in-block updates are included, so the result
does not depend on block_size beyond float rounding.) With static groups, each contiguous group's
parameters come from the weight before the loop (this is what makes act_order with groups valid).
Per-channel / per-tensor parameters come from the whole weight before the loop.

Side effect on the quantizer: none, except for a quantizer whose parameters carry a per-tensor
scale (`QParams.tensor_scale`, NVFP4): its tensor range is fixed from the weight (dead columns
zeroed) with `quantizer.fit`, so every group's block scales share it; the `scale` / `zero_point`
that `fit` also stores are put back as they were. Storing the returned params is the caller's job
(`quantizer.set_params(result.params)`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

import torch

from ditq.quant.quantizer import QParams, Quantizer
from ditq.quant.runtime import kernel_threads
from ditq.quant.spec import NonFiniteError

__all__ = ["GPTQResult", "GPTQError", "gptq_quantize", "MAX_DAMPING_RETRIES"]

log = logging.getLogger(__name__)

MAX_DAMPING_RETRIES = 4  # after a failed Cholesky: relative damping x10, at most this many times


class GPTQError(ValueError):
    """GPTQ cannot run on this layer (bad arguments, a Hessian without data, or not invertible)."""


@dataclass
class GPTQResult:
    weight: torch.Tensor  # [out, in] quantized (on the quantizer's grid), original column order, weight's dtype
    params: QParams  # parameters used, original column order (per group: [out, G])
    loss: float  # sum over columns of ((w - q) / U_jj)^2 / 2 (GPTQ's Losses.sum()) = tr(dW Hd dW^T) / 2
    dead_columns: int  # columns with H[i,i] == 0 (weights set to 0)
    damping: float  # absolute damping added to diag(H) (after any retries)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: Quantizer,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    name: str = "",
) -> GPTQResult:
    """GPTQ-quantize `weight` [out, in] under `hessian` [in, in] (2/N sum x x^T) with `quantizer`.

    Works in float32, or float64 when the weight or the Hessian is float64; the result is cast to the
    weight's dtype (bf16/fp16 may round grid values: pass a float32 weight to keep them exact).
    `weight`, `hessian` and the quantizer's parameters are left unchanged (see the module doc for
    NVFP4's tensor range).
    Raises `GPTQError` (bad arguments, frozen quantizer, all columns dead, H not invertible even
    after damping retries) or `NonFiniteError` (NaN/Inf in W or H), naming the layer, before any work.
    """
    layer = name or "<unnamed layer>"
    group = _check_inputs(weight, hessian, quantizer, block_size, percdamp, act_order, static_groups, layer)
    dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    with torch.no_grad():
        W = weight.detach().to(dtype=dtype, copy=True)
        H = hessian.detach().to(device=W.device, dtype=dtype, copy=True)
        K = W.shape[1]
        dead = torch.diagonal(H) == 0
        n_dead = int(dead.sum())
        H = (H + H.T).mul_(0.5)  # accumulated x^T x can be asymmetric by rounding; Cholesky reads one triangle
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        _pin_tensor_range(quantizer, W)

        static: Optional[List[QParams]] = None
        params: Optional[QParams] = None
        if group is None:
            params = quantizer.compute_params(W)
        elif static_groups:
            static = [quantizer.compute_params(W[:, g0 : g0 + group]) for g0 in range(0, K, group)]

        perm = None
        if act_order:
            perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            W, H = W[:, perm], H[perm][:, perm]

        U, damp = _inverse_cholesky_upper(H, percdamp, layer)
        del H
        col_group = None  # static groups: the group of the j-th processed column
        if static is not None:
            col_group = [j // group for j in (perm.tolist() if perm is not None else range(K))]
        Q, loss, dynamic = _run_blocks(W, U, quantizer, block_size, group, static, col_group, params)
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        if static is not None:
            params = QParams.cat(static)
        elif dynamic:
            params = QParams.cat(dynamic)
        return GPTQResult(Q.to(weight.dtype), params, loss, n_dead, float(damp))


# ----------------------------------------------------------------------------- internals
def _check_inputs(weight, hessian, quantizer, block_size, percdamp, act_order, static_groups, layer) -> Optional[int]:
    """Validate everything cheap; return the effective group size (None: one set of params)."""
    where = f"GPTQ on layer {layer!r}"
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise GPTQError(f"{where}: weight must be a floating [out, in] tensor (reshape conv weights to "
                        f"[out, in*kh*kw] first), got {got}")
    k = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k) or not hessian.is_floating_point():
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise GPTQError(f"{where}: the Hessian must be a floating [in, in] = [{k}, {k}] tensor matching the "
                        f"weight's input width, got {got}")
    if getattr(quantizer, "role", None) != "weight":
        raise GPTQError(f"{where}: needs a weight quantizer (role 'weight'), got role "
                        f"{getattr(quantizer, 'role', None)!r}")
    if getattr(quantizer, "frozen", False):
        raise GPTQError(f"{where}: the weight quantizer's parameters are frozen by {quantizer.frozen_by!r}, so "
                        f"GPTQ could not store its own; drop one of the two steps, or unfreeze() deliberately")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise GPTQError(f"{where}: block_size must be a positive integer (e.g. 128), got {block_size!r}")
    if not (isinstance(percdamp, (int, float)) and 0.0 <= float(percdamp) < float("inf")):
        raise GPTQError(f"{where}: percdamp must be a finite number >= 0 (e.g. 0.01), got {percdamp!r}")
    group = quantizer.group_size
    group = None if group is None else min(int(group), k)
    if act_order and group is not None and not static_groups:
        raise GPTQError(
            f"{where}: act_order with grouped parameters (group size {quantizer.group_size}) needs "
            f"static_groups=True (each group's parameters fixed from the weight before the loop); "
            f"set static_groups: true or act_order: false"
        )
    for what, t in (("weight", weight), ("Hessian", hessian)):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(t).sum())
            raise NonFiniteError(
                f"{where}: the {what} {tuple(t.shape)} holds {n_nan} NaN and {int((~finite).sum()) - n_nan} "
                f"Inf values; find the overflow upstream (fp16 activations or weights) before quantizing"
            )
    if bool((torch.diagonal(hessian) == 0).all()):
        raise GPTQError(
            f"{where}: the Hessian is all zero on its diagonal (all {k} input columns dead), so the layer "
            f"saw no non-zero input during calibration; check that its inputs were captured (hooks, "
            f"calibration samples) or leave this layer to RTN"
        )
    asym = float((hessian - hessian.T).abs().max())
    if asym > 1e-3 * float(hessian.abs().max()):
        raise GPTQError(
            f"{where}: the Hessian is not symmetric (max |H - H^T| = {asym:.3g}, max |H| = "
            f"{float(hessian.abs().max()):.3g}); pass 2/N sum x x^T over the layer's input columns"
        )
    return group


def _pin_tensor_range(quantizer: Quantizer, w: torch.Tensor) -> None:
    """Fix the per-tensor range of formats with a tensor-level scale (NVFP4) from the whole weight,
    so the block scales computed later on slices share it; keep scale / zero_point as they were."""
    if quantizer.compute_params(w).tensor_scale is None:
        return
    kept = (quantizer.scale, quantizer.zero_point)
    quantizer.fit(w)
    quantizer.scale, quantizer.zero_point = kept


def _inverse_cholesky_upper(H: torch.Tensor, percdamp: float, layer: str):
    """Upper Cholesky factor of (H + damp I)^-1 and the damping used; retries with 10x damping."""
    mean_diag = torch.diagonal(H).mean()
    rel = float(percdamp)
    tried = []
    for attempt in range(MAX_DAMPING_RETRIES + 1):
        damp = rel * mean_diag
        Hd = H.flip(0, 1)  # J H J, J the reversal permutation (a copy)
        Hd.diagonal().add_(damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            # J H J = L L^T  =>  H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular with a
            # positive diagonal: the upper Cholesky factor of H^-1, without forming H^-1 (half the flops of
            # cholesky -> cholesky_inverse -> cholesky, the reference's route to the same factor)
            U = _lower_triangular_inverse(L).flip(0, 1)
            del L
            if bool(torch.isfinite(U).all()):
                if attempt:
                    log.warning(
                        "GPTQ on layer %r: the damped Hessian was not positive definite with damping %s; "
                        "succeeded with percdamp %.3g (damping %.4g). The layer's inputs may be rank "
                        "deficient (too few calibration samples?)", layer, ", ".join(tried), rel, float(damp),
                    )
                return U, damp
        tried.append(f"{rel:.3g}")
        rel = rel * 10.0 if rel > 0 else 1e-4
    raise GPTQError(
        f"GPTQ on layer {layer!r}: the Hessian is not positive definite even with percdamp "
        f"{', '.join(tried)} (x mean diag {float(mean_diag):.4g}); it is probably corrupt (check that it "
        f"is 2/N sum x x^T accumulated in float32 or float64) or leave this layer to RTN"
    )


def _lower_triangular_inverse(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """L^-1 of a lower-triangular L by 2x2 block recursion ([[A, 0], [B, C]]^-1 = [[A^-1, 0],
    [-C^-1 B A^-1, C^-1]]): n^3/3 flops in matmuls, a third of a triangular solve against I."""
    n = L.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    m = n // 2
    out = torch.zeros_like(L)
    out[:m, :m] = _lower_triangular_inverse(L[:m, :m], leaf)
    out[m:, m:] = _lower_triangular_inverse(L[m:, m:], leaf)
    out[m:, :m] = -(out[m:, m:] @ L[m:, :m]) @ out[:m, :m]
    return out


def _run_blocks(W, U, quantizer, block_size, group, static, col_group, params):
    """The column loop with lazy block updates; W is consumed. Returns (Q, loss, dynamic group params)."""
    out, K = W.shape
    Q = torch.empty_like(W)
    dynamic: List[QParams] = []
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    current = params
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        with kernel_threads(W):  # small per-column ops: no OpenMP barriers (see ditq.quant.runtime)
            for i in range(i2 - i1):
                j = i1 + i
                if static is not None:
                    current = static[col_group[j]]
                elif group is not None and j % group == 0:
                    cols = _updated_columns(W, W1, Err1, U, i1, i2, j, min(j + group, K))
                    current = quantizer.compute_params(cols)
                    dynamic.append(current)
                w = W1[:, i : i + 1]
                q = quantizer.quantize_with(w, current)
                Q[:, j : j + 1] = q
                err = (w - q).div_(U1[i, i])
                W1[:, i:].sub_(err * U1[i : i + 1, i:])
                Err1[:, i : i + 1] = err
            loss += Err1.square().sum(dtype=torch.float64)
        if i2 < K:  # the matmul keeps torch's thread setting
            W[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
    return Q, float(loss) / 2.0, dynamic


def _updated_columns(W, W1, Err1, U, i1, i2, j, e):
    """Columns [j, e) of the weight updated by every column before j (j inside block [i1, i2)):
    in-block columns are current in W1; columns past the block still lack this block's updates."""
    inside = W1[:, j - i1 : min(e, i2) - i1]
    if e <= i2:
        return inside
    beyond = W[:, i2:e] - Err1[:, : j - i1] @ U[i1:j, i2:e]
    return torch.cat([inside, beyond], dim=1)
