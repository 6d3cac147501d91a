"""Error diagnostics of a quantized run against its FP model, on held-out trajectory records:
per layer and timestep (weight, input-activation, input drift, output) and the denoiser's eps
error per timestep. The full table goes to `<run dir>/diagnostics.csv`, plots next to it, and a
summary into the result row (`row["diagnostics"]["errors"]`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ditq.diagnostics.errors import COLUMNS, error_table, weight_errors  # noqa: F401
from ditq.diagnostics.plot import plot_denoiser_error, plot_layer_errors  # noqa: F401
from ditq.diagnostics.records import heldout_records, records_spec, selected_steps  # noqa: F401
from ditq.diagnostics.table import TABLE_NAME, as_table, summarize, write_table  # noqa: F401
from ditq.utils.timing import Timings

LAYERS_PNG = "diagnostics_layers.png"
TIMESTEPS_PNG = "diagnostics_timesteps.png"


def run_diagnostics(adapter, sampler, run, qlayers: dict, roles: dict[str, str], *, output_dir: str | Path,
                    cache=None, model_fp: str, sampler_spec: dict, progress: bool = True) -> dict[str, Any]:
    """Held-out records (cached, kind "diag_inputs") -> error table -> CSV + plots in `output_dir`;
    returns the summary for the result row."""
    from ditq.methods.wrap import full_precision

    cfg = run.diagnostics
    clock = Timings()
    spec = records_spec(cfg, model=model_fp, sampler=sampler_spec, dtype=run.dtype_inference)
    with clock("records"), full_precision(qlayers):  # FP trajectories
        records = heldout_records(sampler, cfg, adapter.conditions, cache=cache, spec=spec, progress=progress)
    with clock("errors"):
        table = error_table(adapter, qlayers, records, roles=roles, include_uncond=cfg.include_uncond and adapter.null_index is not None,
                            cfg_scale=run.sampler.cfg_scale, batch_size=cfg.batch_size,
                            max_stored_mb=cfg.max_stored_mb, progress=progress)
    out = Path(output_dir)
    with clock("write"):
        write_table(table, out / TABLE_NAME)
        summary = summarize(table)
    summary["seeds"] = [int(cfg.seed_start), int(cfg.num_samples)]
    with clock("plots"):
        plot_layer_errors(table, out / LAYERS_PNG)
        plot_denoiser_error(summary, out / TIMESTEPS_PNG)
    summary["plots"] = [LAYERS_PNG, TIMESTEPS_PNG]
    summary["seconds"] = dict(clock.seconds)
    return summary
