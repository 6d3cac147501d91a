"""Layer-input statistics per layer and timestep on calibration trajectories (Q-DiT Figs. 3-5),
and what HQ-DiT's Hadamard rotation does to them.

`inputs_by_timestep` records, for each timestep of the FP trajectories, every chosen layer's
input with `ditq.calibration.collect_layer_inputs` (the exact per-channel min/max over all rows
plus a seeded row sample); `activation_stats` turns that into one tidy row per (layer, timestep)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

ROLES = ("qkv", "proj", "fc1", "fc2", "adaln")


def trajectory_records(sampler, run, num_samples: int, num_timesteps: int, *, include_all: bool = False,
                       progress: bool = False) -> dict[str, torch.Tensor]:
    """Denoiser inputs {x, t, y, seed, step} of the FP model on `num_samples` calibration seeds, at
    `num_timesteps` steps evenly spaced over the sampler's schedule (every step with include_all)."""
    from omegaconf import OmegaConf

    from ditq.calibration import collect_trajectory_inputs

    if num_samples < 1 or num_timesteps < 1:
        raise ValueError(f"num_samples={num_samples} and num_timesteps={num_timesteps} must both be >= 1")
    cfg = OmegaConf.merge(run.calib, {"num_samples": int(num_samples), "num_timesteps": int(num_timesteps),
                                      "timesteps": "all" if include_all else "uniform",
                                      "batch_size": int(min(num_samples, run.calib.batch_size))})
    return collect_trajectory_inputs(sampler, cfg, sampler.adapter.conditions, progress=progress)


def select_layers(adapter, roles: Sequence[str] = ROLES, blocks: Sequence[int] | None = None) -> dict[str, dict]:
    """{layer name: {"role", "block"}} of the adapter's layers with a role in `roles` (and a block in
    `blocks`, all if None), in model order. q, k and v read one tensor: only to_q is kept for "qkv"."""
    known = {info.role for info in adapter.layers()}
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise ValueError(f"role(s) {unknown} are not roles of this model; its roles: {sorted(known)}")
    out: dict[str, dict] = {}
    seen_qkv: set = set()
    for info in adapter.layers():
        if info.role not in roles or (blocks is not None and info.block not in blocks):
            continue
        if info.role == "qkv":
            parent = info.name.rsplit(".", 1)[0]
            if parent in seen_qkv:
                continue
            seen_qkv.add(parent)
        out[info.name] = {"role": info.role, "block": info.block}
    if not out:
        raise ValueError(f"no layer of role(s) {list(roles)} in block(s) {blocks}")
    return out


def inputs_by_timestep(adapter, records: dict[str, torch.Tensor], layers: Sequence[str], *, max_tokens: int = 2048,
                       include_uncond: bool = False, seed: int = 0) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """{t: {layer: {"rows" [<= max_tokens, C], "min" [C], "max" [C]}}} over the records at each
    timestep t (noisiest first), through the model as it is (FP unless quantizers are on)."""
    from ditq.calibration import collect_layer_inputs

    ts = sorted({int(v) for v in records["t"].tolist()}, reverse=True)
    out = {}
    for t in ts:
        mask = records["t"] == t
        sub = {k: records[k][mask] for k in ("x", "t", "y")}
        out[t] = collect_layer_inputs(adapter, sub, list(layers), max_tokens, include_uncond=include_uncond,
                                      batch_size=max(1, len(sub["x"])), seed=seed, progress=False)
    return out


def _stats(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, percentiles: bool = True) -> dict[str, float]:
    r = rows.double()
    absmax_c = torch.maximum(lo.abs(), hi.abs()).double()
    std = float(r.std())
    absmax = float(absmax_c.max())
    out = {"min": float(lo.min()), "max": float(hi.max()), "absmax": absmax, "mean": float(r.mean()), "std": std}
    if percentiles:
        p01, p99 = np.percentile(r.numpy().ravel(), [1.0, 99.0])  # partition-based: far faster than a sort
        out.update(p01=float(p01), p99=float(p99))
    return {
        **out,
        "absmax_over_std": absmax / std if std > 0 else float("inf"),
        # channel outliers: the largest channel's range over the median channel's
        "channel_outlier_ratio": float(absmax_c.max() / absmax_c.median()) if float(absmax_c.median()) > 0
        else float("inf"),
        "channels": int(rows.shape[1]), "rows": int(rows.shape[0]),
    }


def activation_stats(by_t: dict[int, dict[str, dict]], layers: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per (layer, timestep): layer, role, block, t, min, max, absmax, mean, std, p01, p99,
    absmax_over_std, channel_outlier_ratio, channels, rows (min/max/absmax exact; the rest from
    the row sample)."""
    out = []
    for t, per_layer in by_t.items():
        for name, rec in per_layer.items():
            meta = layers.get(name, {})
            out.append({"layer": name, "role": meta.get("role"), "block": meta.get("block"), "t": int(t),
                        **_stats(rec["rows"], rec["min"], rec["max"])})
    return out


def channel_absmax(by_t: dict[int, dict[str, dict]], layer: str) -> tuple[list[int], np.ndarray]:
    """(timesteps, [T, C] array) of the exact per-channel max |x| of `layer`'s input at each timestep."""
    ts = list(by_t)
    missing = [t for t in ts if layer not in by_t[t]]
    if missing:
        raise KeyError(f"layer {layer!r} was not recorded (timesteps {missing}); record it with inputs_by_timestep")
    arr = np.stack([torch.maximum(by_t[t][layer]["min"].abs(), by_t[t][layer]["max"].abs()).numpy() for t in ts])
    return ts, arr


def pooled_rows(by_t: dict[int, dict[str, dict]], layer: str) -> torch.Tensor:
    """All timesteps' sampled input rows of `layer`, stacked [N, C]."""
    return torch.cat([by_t[t][layer]["rows"] for t in by_t if layer in by_t[t]])


def rotate(rows: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """`rows` [N, C] times HQ-DiT's rotation R (`ditq.quant.hadamard.Rotation(C, seed)`), as the
    quantized layer sees them once W R is folded in."""
    from ditq.quant.hadamard import Rotation

    return Rotation(int(rows.shape[-1]), seed=seed)(rows.float())


def rotation_effect(rows: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """max|x| / std and the channel outlier ratio (largest channel max|x| over the median one) of
    `rows` [N, C] before and after the rotation, and the ratio of the before/after max|x| / std."""
    rot = rotate(rows, seed)
    before = _stats(rows, rows.amin(0), rows.amax(0), percentiles=False)
    after = _stats(rot, rot.amin(0), rot.amax(0), percentiles=False)
    return {"absmax_over_std": before["absmax_over_std"], "absmax_over_std_rotated": after["absmax_over_std"],
            "channel_outlier_ratio": before["channel_outlier_ratio"],
            "channel_outlier_ratio_rotated": after["channel_outlier_ratio"],
            "reduction": before["absmax_over_std"] / after["absmax_over_std"]}
