"""Value checks of a merged run config: ranges, choices and combinations that types cannot express.

`validate_config` calls `check_values(run)` after the schema merge (OmegaConf has checked the
types). Every error names the key, the valid range or choices, and what to change. Torch-free and
fast: it runs before any model loads. Checks that need the loaded model (training timesteps,
latent channels) live in `ditq.preflight`.
"""
from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from ditq.config.schema import ConfigError, quantizer_config
from ditq.config.schema import _check_choice as _choice

MODEL_FAMILIES = ("dit",)  # ditq.models.registry.load_adapter
MODEL_DTYPES = ("float32", "float16", "bfloat16")
DATASET_KINDS = ("digits", "imagenet", "coco")
# diffusers' DDIM/DDPM/DPM-Solver schedulers accept these spacings
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
# diffusers' DPMSolverMultistepScheduler algorithm types without step noise; the SDE variants
# (sde-dpmsolver, sde-dpmsolver++) would draw noise from one shared RNG and break the per-seed
# pairing of FP and quantized samples, so they are refused.
DPM_ALGORITHMS = ("dpmsolver++", "dpmsolver")
DPM_SOLVER_ORDERS = (1, 2, 3)
SD_VAE_FACTOR = 8  # image side / latent side of the SD VAE that DiT (and weights=random) decodes with


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def _nonempty(key: str, value) -> None:
    if value is None or not str(value).strip():
        _fail(f"{key} must be a non-empty string, got {value!r}")


def _at_least(key: str, value, low, fix: str = "") -> None:
    if value is None or not math.isfinite(value) or value < low:
        _fail(f"{key}={value!r} must be >= {low}{'; ' + fix if fix else ''}")


def _in_range(key: str, value, low, high, fix: str = "") -> None:
    if value is None or not math.isfinite(value) or not low <= value <= high:
        _fail(f"{key}={value!r} must be in [{low}, {high}]{'; ' + fix if fix else ''}")


def check_values(run: DictConfig) -> None:
    """Raise ConfigError for the first value the run cannot use."""
    for group in ("model", "method", "bits", "sampler", "dataset"):
        _nonempty(f"{group}.name", run[group].name)
    for key in ("root", "results_dir", "models_dir", "data_dir", "assets_dir", "output_dir"):
        _nonempty(f"paths.{key}", run.paths[key])
    if run.run_name is not None:
        _nonempty("run_name", run.run_name)
    _check_model(run)
    _check_method_bits(run)
    _check_sampler(run.sampler)
    _check_dataset(run)
    _check_calib(run.calib)
    _check_eval(run.eval)
    _check_logger(run.logger)
    _check_table(run)


def _check_model(run: DictConfig) -> None:
    m = run.model
    _choice("model.family", m.family, MODEL_FAMILIES)
    _choice("model.dtype", m.dtype, MODEL_DTYPES)
    _at_least("model.resolution", m.resolution, 1)
    _at_least("model.num_classes", m.num_classes, 1)
    if m.vae_scale is None or not math.isfinite(m.vae_scale) or m.vae_scale <= 0:
        _fail(f"model.vae_scale={m.vae_scale!r} must be a positive number (SD VAE: 0.18215)")
    if m.cfg_channels is not None:
        _at_least("model.cfg_channels", m.cfg_channels, 1, "null guides every channel")
    arch = dict(m.arch)
    in_ch = arch.get("in_channels")
    if m.cfg_channels is not None and isinstance(in_ch, int) and m.cfg_channels > in_ch:
        _fail(f"model.cfg_channels={m.cfg_channels} exceeds model.arch.in_channels={in_ch}; "
              f"set model.cfg_channels <= {in_ch} or null (all channels)")
    if m.weights != "random":
        return
    if not arch:
        _fail(f"model.weights=random needs model.arch (the constructor arguments of the "
              f"'{m.family}' architecture to build, e.g. num_layers, num_embeds_ada_norm, sample_size), and "
              f"model '{m.name}' has none; add model.arch to its config or use model.weights=local")
    if m.family == "dit":
        n_cls = arch.get("num_embeds_ada_norm")
        if n_cls != m.num_classes:
            _fail(f"model.arch.num_embeds_ada_norm={n_cls!r} must equal model.num_classes={m.num_classes} "
                  "(the class count of the random DiT)")
        side = arch.get("sample_size")
        if isinstance(side, int):
            factor = SD_VAE_FACTOR if m.vae else 1
            if side * factor != m.resolution:
                _fail(f"model.arch.sample_size={side} gives {side * factor}px images"
                      f"{' through the SD VAE (x8)' if m.vae else ''}, but model.resolution={m.resolution}; "
                      f"set model.arch.sample_size={m.resolution // factor}")


def _check_method_bits(run: DictConfig) -> None:
    m, bits = run.method, run.bits
    quantizes = bits.weight is not None or bits.act is not None or bool(bits.overrides)
    if quantizes and not m.layers:
        _fail(f"method.layers is empty, so bits={bits.name} quantizes nothing; list the roles to quantize "
              "(e.g. method.layers=[qkv,proj,fc1,fc2,adaln]) or use bits=fp")
    for role, ov in bits.overrides.items():
        if not isinstance(ov, (dict, DictConfig)):
            _fail(f"bits.overrides.{role}={ov!r} must be a mapping {{weight: <format>, act: <format>}}")
        if role not in m.layers:
            _fail(f"bits.overrides.{role} applies to role {role!r}, which method.layers={list(m.layers)} does "
                  f"not quantize; add {role} to method.layers or drop the override")
        for side in ("weight", "act"):
            fmt = ov.get(side)
            if fmt is not None:
                quantizer_config(m[side], fmt, side, f"method.{side} (bits.overrides.{role}.{side})")


def _check_sampler(s: DictConfig) -> None:
    _choice("sampler.timestep_spacing", s.timestep_spacing, TIMESTEP_SPACINGS)
    if not math.isfinite(s.cfg_scale):
        _fail(f"sampler.cfg_scale={s.cfg_scale} must be a finite number >= 1")
    _in_range("sampler.eta", s.eta, 0.0, 1.0, "0 is deterministic DDIM, 1 matches DDPM's variance")
    if s.kind != "ddim" and s.eta != 0:
        _fail(f"sampler.eta={s.eta} only applies to sampler.kind=ddim (this sampler is {s.kind}); "
              "set sampler.eta=0 or use a DDIM sampler")
    _choice("sampler.solver_order", s.solver_order, DPM_SOLVER_ORDERS, " (DPM-Solver's order)")
    _choice("sampler.algorithm", s.algorithm, DPM_ALGORITHMS,
            " (diffusers' DPMSolverMultistep algorithm types; the SDE variants are refused because their "
            "step noise would not come from each sample's own seed)")


def _check_dataset(run: DictConfig) -> None:
    d, m = run.dataset, run.model
    _choice("dataset.kind", d.kind, DATASET_KINDS)
    _at_least("dataset.num_classes", d.num_classes, 1)
    if d.num_classes != m.num_classes:
        _fail(f"dataset.num_classes={d.num_classes} (dataset={d.name}) does not match model.num_classes="
              f"{m.num_classes} (model={m.name}): the model is scored against another dataset than it "
              "generates; pick the dataset of this model (e.g. dataset=digits for tiny_dit_digits, "
              "dataset=imagenet for dit_xl_*)")
    resolutions = list(d.resolutions)
    if resolutions and m.resolution not in resolutions:
        _fail(f"model.resolution={m.resolution} (model={m.name}) has no reference in dataset={d.name}: "
              f"dataset.resolutions={resolutions}; pick a model at one of them or another dataset")
    if d.kind == "digits" and d.reference is not None:
        _fail(f"dataset.reference={d.reference!r} is ignored for dataset.kind=digits (the bundled digits are "
              "the reference); set dataset.reference=null")
    if d.kind != "digits" and not d.reference:
        _fail(f"dataset.kind={d.kind} needs dataset.reference (a reference batch .npz)"
              f"{'; get it from ' + d.download_hint if d.download_hint else ''}")


def _check_calib(c: DictConfig) -> None:
    _at_least("calib.seed_start", c.seed_start, 0)
    _at_least("calib.max_tokens_per_layer", c.max_tokens_per_layer, 1)
    _at_least("calib.batch_size", c.batch_size, 1)
    if c.timesteps == "ndtc":  # positions on the timestep axis: 0 = clean end, 1 = pure noise
        _in_range("calib.ndtc_mean", c.ndtc_mean, -10.0, 10.0, "PTQ4DM's NDTC uses 0.4 (towards the clean end)")
        if c.ndtc_std is None or not math.isfinite(c.ndtc_std) or c.ndtc_std <= 0:
            _fail(f"calib.ndtc_std={c.ndtc_std!r} must be a finite number > 0 (PTQ4DM's NDTC uses 0.4)")


def _check_eval(e: DictConfig) -> None:
    _at_least("eval.seed_start", e.seed_start, 0)
    _at_least("eval.grid_size", e.grid_size, 0, "0 saves no grid")
    if not e.metrics:
        _fail("eval.metrics is empty; list at least one metric (e.g. eval.metrics=[fid])")
    twice = sorted({x for x in e.metrics if list(e.metrics).count(x) > 1})
    if twice:
        _fail(f"eval.metrics lists {twice} more than once")
    _nonempty("eval.feature_net", e.feature_net)


def _check_logger(lg: DictConfig) -> None:
    if lg.wandb and lg.mode != "disabled":
        _nonempty("logger.project", lg.project)
    for i, tag in enumerate(lg.tags):
        _nonempty(f"logger.tags[{i}]", tag)


_ABSENT = object()


def _check_table(run: DictConfig) -> None:
    t = run.table
    for i, key in enumerate(t.rows):
        if OmegaConf.select(run, key, default=_ABSENT) is _ABSENT:
            _fail(f"table.rows[{i}]={key!r} is not a config key; use dotted keys such as method.name, bits.name")
    for label, cells in t.paper.items():
        if not isinstance(cells, (dict, DictConfig)):
            _fail(f"table.paper.{label} must map column keys to the paper's values, got {cells!r}")
        from ditq.tracking.table import paper_value_problem

        for col, value in cells.items():
            problem = paper_value_problem(str(label), str(col), value)
            if problem:
                _fail(problem)
        if t.columns:
            unknown = sorted(set(cells) - set(t.columns))
            if unknown:
                _fail(f"table.paper.{label} has values for {unknown}, which are not in table.columns "
                      f"({sorted(t.columns)}); add the columns or drop the values")
