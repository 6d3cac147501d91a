"""Error of a quantized denoiser against its FP self, per layer and timestep, on trajectory records.

Per quantized layer (QuantLinear / QuantConv2d) and timestep:
  weight  ||W_hat - W||^2 / ||W||^2 of the weight the forward uses (timestep-independent);
  act     the activation quantizer's own error on the inputs it sees in the quantized model,
          ||Q(x) - x||^2 / ||x||^2;
  input   input drift: the layer's input in the quantized model vs in the FP model, same record;
  output  the layer's output in the quantized model vs in the FP model, same record.
Per timestep the denoiser's eps error, quantized vs FP, per guidance branch (cond, uncond) and for
the guided eps the sampler uses (eps_u + s (eps_c - eps_u) on the first cfg_channels channels).

Each value is a ratio of sums over the records of that timestep (relative MSE; SQNR = -10 log10 of
it, inf when exact). Batches of records run twice: FP with forward hooks keeping this batch's layer
inputs/outputs, then quantized with hooks comparing and dropping them; only the sums persist.
A batch holds at most `batch_size` records and at most `max_stored_mb` of kept FP activations
(measured on the first record; at least one record per batch).
"""
from __future__ import annotations

import logging
import math
import re

import pandas as pd
import torch
from tqdm.auto import tqdm

from ditq.methods.wrap import full_precision

log = logging.getLogger(__name__)

COLUMNS = ["scope", "name", "role", "block", "branch", "step", "t", "records",
           "weight_rel_mse", "weight_sqnr_db", "act_rel_mse", "act_sqnr_db",
           "input_rel_mse", "input_sqnr_db", "output_rel_mse", "output_sqnr_db"]
_SIDES = ("act", "input", "output")


def rel_mse(err: float, ref: float) -> float:
    if ref > 0:
        return err / ref
    return 0.0 if err == 0 else math.inf


def sqnr_db(err: float, ref: float) -> float:
    """10 log10(signal / noise) in dB: inf when exact, nan when both are zero."""
    if err == 0:
        return math.inf if ref > 0 else math.nan
    return 10.0 * math.log10(ref / err) if ref > 0 else -math.inf


def _block_of(name: str) -> int | None:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


@torch.no_grad()
def weight_errors(qlayers: dict) -> dict[str, tuple[float, float]]:
    """{layer: (relative MSE, SQNR dB)} of the weight each layer's forward uses (nan: FP weight)."""
    out = {}
    for name, q in qlayers.items():
        if q.weight_quantizer is None:
            out[name] = (math.nan, math.nan)
            continue
        w = q.weight.detach().double()
        err = float((q.quantized_weight().detach().double() - w).pow(2).sum())
        ref = float(w.pow(2).sum())
        out[name] = (rel_mse(err, ref), sqnr_db(err, ref))
    return out


def _per_record(a: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of squares of each record's slice of `a` (batch first), in float64."""
    return torch.linalg.vector_norm(a.reshape(n, -1), dim=1, dtype=torch.float32).double().square()


def _stored_bytes(stored: dict) -> int:
    seen = {}
    for pair in stored.values():
        for t in pair:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def guided(eps_c: torch.Tensor, eps_u: torch.Tensor, scale: float, cfg_channels: int | None) -> torch.Tensor:
    """The guided eps of ditq.sampling.Sampler.guided_eps from both branches' predictions."""
    k = cfg_channels or eps_c.shape[1]
    out = eps_c.clone()
    out[:, :k] = eps_u[:, :k] + scale * (eps_c[:, :k] - eps_u[:, :k])
    return out


@torch.no_grad()
def error_table(adapter, qlayers: dict, records: dict[str, torch.Tensor], *, roles: dict[str, str] | None = None,
                include_uncond: bool = True, cfg_scale: float = 1.0, batch_size: int = 64,
                max_stored_mb: float = 2048, progress: bool = True) -> pd.DataFrame:
    """The tidy error table (columns `COLUMNS`) of the model holding `qlayers`, on `records`
    ({"x", "t", "y", "step"}, e.g. from `heldout_records`). The layers' `quant_enabled` switches are
    respected for the quantized pass (all off: every error is zero) and restored afterwards."""
    if not qlayers:
        raise ValueError("error_table needs the quantized layers of the model (qlayers is empty)")
    roles = roles or {}
    names = list(qlayers)
    dev = adapter.device
    steps = sorted({int(s) for s in records["step"].tolist()})
    slot_of = {s: i for i, s in enumerate(steps)}
    t_of = {int(s): int(t) for s, t in zip(records["step"].tolist(), records["t"].tolist())}
    slots_all = torch.tensor([slot_of[int(s)] for s in records["step"].tolist()], dtype=torch.long)
    branches = ["cond", "uncond"] if include_uncond else ["cond"]
    nb, L, S = len(branches), len(names), len(steps)
    den_branches = branches + (["guided"] if include_uncond and cfg_scale > 1 else [])
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=dev)  # noqa: E731
    acc = {f"{side}_{k}": zeros(L, S) for side in _SIDES for k in ("err", "ref")}
    den = {k: zeros(len(den_branches), S) for k in ("err", "ref")}
    count = zeros(S)

    stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    batch: dict[str, torch.Tensor] = {}

    recent: list[tuple[torch.Tensor, torch.Tensor]] = []  # (reference, its per-record sums): q, k, v share inputs

    def ref_sums(ref: torch.Tensor, n: int) -> torch.Tensor:
        for t, sums in recent:
            if t is ref:
                return sums
        recent.insert(0, (ref, _per_record(ref, n)))
        del recent[4:]
        return recent[0][1]

    def add(side: str, li: int, a: torch.Tensor, ref: torch.Tensor) -> None:
        n = batch["slots"].shape[0]
        if a.shape[0] != n or a.shape != ref.shape:
            raise RuntimeError(
                f"diagnostics: the {side} of layer {names[li]} has shape {tuple(a.shape)} (FP: {tuple(ref.shape)}) "
                f"for a batch of {n} records; per-record errors need the batch dimension first"
            )
        acc[f"{side}_err"][li].index_add_(0, batch["slots"], _per_record(a - ref, n))
        acc[f"{side}_ref"][li].index_add_(0, batch["slots"], ref_sums(ref, n))

    def fp_hook(name):
        def hook(module, args, out):
            stored[name] = (args[0].detach(), out.detach())
        return hook

    def q_hook(name, li):
        def hook(module, args, out):
            if name not in stored:
                raise RuntimeError(f"diagnostics: layer {name} ran more often in the quantized forward than in the "
                                   "FP forward (a layer called twice per forward is not supported)")
            x_fp, o_fp = stored.pop(name)
            add("input", li, args[0], x_fp)
            add("output", li, out, o_fp)
        return hook

    def act_hook(li):
        def hook(quantizer, args, out):  # the act quantizer's own output: no second quantization
            add("act", li, out, args[0])
        return hook

    def forward(hooks, act_hooks=()) -> torch.Tensor:
        handles = [qlayers[n].register_forward_hook(h) for n, h in hooks]
        handles += [qlayers[n].act_quantizer.register_forward_hook(h) for n, h in act_hooks]
        try:
            return adapter.denoise(batch["x"], batch["t"], batch["y"])
        finally:
            recent.clear()
            for h in handles:
                h.remove()

    # the first batch holds one record and measures the FP activations kept per record; later batches
    # hold as many records as `max_stored_mb` allows, at most `batch_size`
    total, chunk, i = len(records["x"]), 1, 0
    budget = max_stored_mb * 2**20
    with tqdm(total=total, desc="diagnostics", unit="rec", disable=not progress, dynamic_ncols=True,
              mininterval=2.0) as bar:
        while i < total:
            sl = slice(i, min(i + chunk, total))
            x, t, y = records["x"][sl].to(dev), records["t"][sl].to(dev), records["y"][sl].to(dev)
            ys = [y] + ([adapter.conditions.null_like(y)] if include_uncond else [])
            batch.update(x=torch.cat([x] * nb), t=torch.cat([t] * nb), y=torch.cat(ys),
                         slots=torch.cat([slots_all[sl]] * nb).to(dev))
            with full_precision(qlayers):
                eps_fp = forward([(n, fp_hook(n)) for n in names])
            if i == 0:
                per_record = _stored_bytes(stored)
                chunk = max(1, min(int(batch_size), int(budget // max(per_record, 1))))
                log.info("diagnostics: %.1f MB of FP activations per record; batches of %d records",
                         per_record / 2**20, chunk)
            try:
                eps_q = forward([(n, q_hook(n, li)) for li, n in enumerate(names)],
                                [(n, act_hook(li)) for li, n in enumerate(names)
                                 if qlayers[n].act_quantizer is not None])
            finally:
                stored.clear()
            m = x.shape[0]
            fp_parts, q_parts = list(eps_fp.float().split(m)), list(eps_q.float().split(m))
            if "guided" in den_branches:
                fp_parts.append(guided(fp_parts[0], fp_parts[1], cfg_scale, adapter.cfg_channels))
                q_parts.append(guided(q_parts[0], q_parts[1], cfg_scale, adapter.cfg_channels))
            slots = batch["slots"][:m]
            for bi, (f, q) in enumerate(zip(fp_parts, q_parts)):
                den["err"][bi].index_add_(0, slots, _per_record(q - f, m))
                den["ref"][bi].index_add_(0, slots, _per_record(f, m))
            count.index_add_(0, slots, torch.ones(m, dtype=torch.float64, device=dev))
            i += m
            bar.update(m)

    acc = {k: v.cpu().tolist() for k, v in acc.items()}
    den = {k: v.cpu().tolist() for k, v in den.items()}
    count = [int(c) for c in count.cpu().tolist()]
    werr = weight_errors(qlayers)
    rows = []
    for li, name in enumerate(names):
        has_act = qlayers[name].act_quantizer is not None
        for si, step in enumerate(steps):
            row = {"scope": "layer", "name": name, "role": roles.get(name, ""), "block": _block_of(name),
                   "branch": "+".join(branches), "step": step, "t": t_of[step], "records": count[si] * nb,
                   "weight_rel_mse": werr[name][0], "weight_sqnr_db": werr[name][1]}
            for side in _SIDES:
                err, ref = acc[f"{side}_err"][li][si], acc[f"{side}_ref"][li][si]
                absent = side == "act" and not has_act
                row[f"{side}_rel_mse"] = math.nan if absent else rel_mse(err, ref)
                row[f"{side}_sqnr_db"] = math.nan if absent else sqnr_db(err, ref)
            rows.append(row)
    for bi, br in enumerate(den_branches):
        for si, step in enumerate(steps):
            err, ref = den["err"][bi][si], den["ref"][bi][si]
            rows.append({"scope": "denoiser", "name": "denoiser", "role": "denoiser", "block": None, "branch": br,
                         "step": step, "t": t_of[step], "records": count[si],
                         "output_rel_mse": rel_mse(err, ref), "output_sqnr_db": sqnr_db(err, ref)})
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["block"] = table["block"].astype("Int64")  # integers, empty for the denoiser rows
    return table
