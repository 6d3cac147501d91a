"""Dataclass schemas of the Hydra config groups, and the validation of a composed config.

Every group (`model`, `method`, `bits`, `sampler`, `dataset`, `calib`, `eval`, `logger`,
`paths`) has a dataclass here; `validate_config` merges the composed Hydra config into
them (unknown keys and wrong types are errors naming the key) and then checks the
combinations that types cannot express (formats, granularities, layer roles, sample counts).
This module must not import torch: it runs before any model loads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Roles a model adapter assigns to its quantizable layers.
LAYER_ROLES = ("qkv", "proj", "fc1", "fc2", "adaln", "embed", "final", "cross_attn", "caption", "conv")
SAMPLER_KINDS = ("ddim", "dpm_solver", "ddpm")
LABEL_MODES = ("balanced", "random")
CALIB_TIMESTEP_MODES = ("uniform", "all", "random_per_sample", "ndtc")
WEIGHT_SOURCES = ("local", "hub", "random")


class ConfigError(ValueError):
    """A composed config that cannot run; the message names the key and the valid choices."""


@dataclass
class PathsConfig:
    root: str = "."
    cache_dir: str = "${paths.root}/.cache/ditq"  # content-keyed artifacts (calibration, FP samples, features)
    results_dir: str = "${paths.root}/results"  # the results store (one JSON row per run)
    models_dir: str = "${paths.root}/checkpoints"  # where downloaded checkpoints go
    data_dir: str = "${paths.root}/data"  # reference batches, prompt files, datasets
    assets_dir: str = "."  # ditq's shipped assets (embedded models)
    output_dir: str = "."  # this run's directory (Hydra sets it)


@dataclass
class ModelConfig:
    name: str = "???"
    family: str = "dit"  # adapter registry key (ditq.models)
    weights: str = "local"  # local: `path` in hub layout | hub: `hub_id` | random: build `arch`, random init
    path: Optional[str] = None  # local directory in the hub layout (transformer/, scheduler/, vae/)
    hub_id: Optional[str] = None  # e.g. facebook/DiT-XL-2-256
    obtain_hint: Optional[str] = None  # how to get the weights when they are missing (no hub id)
    arch: Dict[str, Any] = field(default_factory=dict)  # constructor kwargs when weights=random
    resolution: int = 8  # image side in pixels
    num_classes: int = 10
    vae: Optional[str] = None  # null: pixel space; else a subfolder of `path` (e.g. "vae") or a hub id
    vae_scale: float = 0.18215
    vae_arch: Dict[str, Any] = field(default_factory=dict)  # weights=random: the autoencoder's kwargs (`_class`: VQModel | AutoencoderKL)
    cfg_channels: Optional[int] = None  # guidance on the first k output channels (original DiT: 3); null = all
    clip_sample: bool = False  # clamp predicted x0 to [-1, 1] (pixel-space models)
    dtype: str = "float32"
    # text-conditional models: text-encoder settings (PixArt: max_tokens, dtype, batch_size, and for
    # weights=random `arch` = T5 config kwargs and `tokenizer` = bytes | digit_words); empty for class models
    text: Dict[str, Any] = field(default_factory=dict)


@dataclass
class BitsConfig:
    name: str = "???"
    weight: Optional[str] = None  # format name (ditq.quant.spec); null = full precision
    act: Optional[str] = None
    overrides: Dict[str, Any] = field(default_factory=dict)  # role -> {weight: fmt, act: fmt}


@dataclass
class MethodConfig:
    name: str = "???"
    # Ordered algorithm steps; each item is {name: <step>, ...step options}.
    steps: List[Dict[str, Any]] = field(default_factory=list)
    # Quantizer settings (everything but the format, which comes from `bits`):
    # fields of ditq.quant.spec.QuantizerConfig.
    weight: Dict[str, Any] = field(default_factory=dict)
    act: Dict[str, Any] = field(default_factory=dict)
    # one uniform group size that grouped methods tie weight.group_size and act.group_size to
    # (`group_size: ${method.group_size}` in their YAML, e.g. qdit): method.group_size=64 changes both
    group_size: Optional[int] = None
    layers: List[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2", "adaln"])
    needs_calibration: bool = False
    # the calib.timesteps mode the method is defined with (PTQ4DM: ndtc); conf/calib/trajectories.yaml
    # follows it unless calib.timesteps is set explicitly
    calib_timesteps: str = "uniform"
    plan: Optional[str] = None  # per-layer plan YAML (ditq.methods.plan); overrides weight/act/layers and bits per layer
    # per-role formats by bit width (FP4DiT): {<role> | default: {weight | act: {fp<n>: <format of n bits>}}}; a rule
    # replaces the format `bits` gives that role's side only when it is a signed FP format of n bits (`method_format`)
    formats: Dict[str, Any] = field(default_factory=dict)
    # quantizers inside diffusers attentions (ditq.quant.qkv): qkv: the outputs of to_q/to_k/to_v (the attention
    # matmuls' inputs) per token, dynamic, in each projection's activation format; per_head: one range per (token,
    # head) instead of per token; probs: a format for the post-softmax probabilities (null: full precision)
    attn: Dict[str, Any] = field(default_factory=lambda: {"qkv": False, "per_head": False, "probs": None})


@dataclass
class SamplerConfig:
    name: str = "???"
    kind: str = "ddim"
    num_steps: int = 50
    cfg_scale: float = 1.5
    eta: float = 0.0  # DDIM stochasticity; >0 draws per-sample noise from each sample's own RNG
    timestep_spacing: str = "leading"  # diffusers' spacing; "leading" equals DiT's respaced DDIM
    solver_order: int = 2  # DPM-Solver
    algorithm: str = "dpmsolver++"  # DPM-Solver
    batch_size: int = 500


@dataclass
class DatasetConfig:
    name: str = "???"
    # image datasets (class / unconditional models): digits | imagenet | coco;
    # prompt datasets (text models, ditq.data.prompts): digits_captions | coco_captions | hpsv2 | prompts
    kind: str = "digits"
    num_classes: int = 10
    reference: Optional[str] = None  # reference statistics / images (e.g. ADM .npz); null: built in
    root: Optional[str] = None
    download_hint: Optional[str] = None  # how to obtain `reference` (shown when it is missing)
    resolutions: List[int] = field(default_factory=list)  # image sides with a reference; empty: any
    # prompt datasets: coco_captions: the COCO captions annotation JSON; hpsv2: the directory of the
    # benchmark's <style>.json files; prompts: a .txt (one prompt per line) or .json list
    prompts: Optional[str] = None
    images: Optional[str] = None  # coco_captions: the COCO image directory (captioned calibration images)
    styles: List[str] = field(default_factory=lambda: ["anime", "concept-art", "paintings", "photo"])  # hpsv2


@dataclass
class CalibConfig:
    num_samples: int = 64
    seed_start: int = 1_000_000  # disjoint from evaluation seeds
    labels: str = "balanced"
    timesteps: str = "uniform"  # uniform: `num_timesteps` evenly spaced steps | all | random_per_sample (Q-DiT) | ndtc (PTQ4DM)
    num_timesteps: int = 10
    # ndtc: each seed keeps one step at position u ~ N(ndtc_mean, ndtc_std) of the timestep axis
    # (0 = the clean end, 1 = pure noise); defaults: PTQ4DM's NDTC script (mean 0.4, std 0.4)
    ndtc_mean: float = 0.4
    ndtc_std: float = 0.4
    include_uncond: bool = True  # record the unconditional (cfg) branch too
    max_tokens_per_layer: int = 4096  # random token subsample kept per layer
    batch_size: int = 256
    # a calibration file to use (made by this model, sampler and settings, else an error) or to write
    # when missing (ditq.calibration.files); null: the content-keyed cache only
    file: Optional[str] = None
    # where the records come from: trajectories (the FP model's sampling trajectories) | noised_data (real captioned
    # images noised with the training schedule, FP4DiT; ditq.calibration.noised)
    source: str = "trajectories"
    # noised_data: the timesteps images are noised at: sampler (the run's sampler steps picked by `timesteps`; the
    # FP4DiT paper) | raw_0_19 (raw timesteps 0..19 of the training schedule; FP4DiT's public code)
    noise_timesteps: str = "sampler"


@dataclass
class DiagnosticsConfig:
    """Per-layer and denoiser error tables of a quantized run, on held-out FP trajectory records."""
    enabled: bool = True
    num_samples: int = 8  # held-out trajectories (seeds disjoint from calib and eval seeds)
    seed_start: int = 2_000_000
    labels: str = "balanced"
    num_timesteps: int = 10  # up to this many steps, evenly spaced (every step when the sampler has fewer)
    batch_size: int = 64  # records per FP/quantized forward pair (fewer when max_stored_mb is exceeded)
    include_uncond: bool = True  # also the unconditional (cfg) branch, and the guided eps
    max_stored_mb: int = 2048  # bound on the FP activations kept per batch for comparison


@dataclass
class EvalConfig:
    num_samples: int = 1000
    seed_start: int = 0
    labels: str = "balanced"
    metrics: List[str] = field(default_factory=lambda: ["fid", "cls_acc", "psnr", "fid_to_fp"])
    feature_net: str = "digits"
    batch_size: int = 500
    options: Dict[str, Any] = field(default_factory=dict)  # backend settings (ditq.metrics.Evaluator options)
    save_samples: bool = True  # ADM-format .npz of the samples in the run dir
    grid_size: int = 100  # images in the PNG grid saved per run (0: none)


@dataclass
class LoggerConfig:
    wandb: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "ditq"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class TableConfig:
    title: str = ""
    rows: List[str] = field(default_factory=lambda: ["method.name", "bits.name"])  # config keys naming a row
    columns: Dict[str, str] = field(default_factory=dict)  # result key -> header
    paper: Dict[str, Any] = field(default_factory=dict)  # row label -> {column: paper value}


@dataclass
class SearchConfig:
    """Per-layer group-size allocation (Q-DiT): the search space, the cost constraint and the
    objective, shared by the `group_search` step (evolutionary, Alg. 1) and the sensitivity-based
    `group_allocation` step (ILP / Hessian, Q-DiT Table 5). conf/search/*.yaml."""
    name: str = "qdit"
    choices: List[int] = field(default_factory=lambda: [32, 64, 128, 192, 288])  # group sizes per layer
    target_group_size: int = 128  # the uniform plan the constraint is measured against
    # bitops: BitOps (incl. per-group rescale work) <= the uniform target plan's | mean_group_size: the
    # public code's "mean group size >= target" | storage: weight bits incl. scales <= the target plan's | none
    constraint: str = "bitops"
    max_bitops: Optional[float] = None  # an explicit budget instead of the target plan's
    # evolution (Alg. 1)
    population: int = 50
    top_k: int = 10
    mutations: int = 25
    mutation_prob: float = 0.1
    crossovers: int = 25
    generations: int = 10
    seed: int = 0
    include_target: bool = True  # the uniform target plan is one of the initial candidates
    # objective: FID of `num_samples` images of the search seeds against the FP model's images of the
    # same seeds (fid_to_fp, paired) or against the dataset's reference (fid, the paper's)
    objective: str = "fid_to_fp"
    num_samples: int = 128
    seed_start: int = 4_000_000  # search seeds: disjoint from calibration, evaluation and held-out seeds
    holdout_samples: int = 256  # the chosen plan and the target plan re-scored on held-out seeds
    holdout_seed_start: int = 5_000_000
    cfg_scale: Optional[float] = None  # null: the run's sampler's (the public code searches at cfg 0)
    num_steps: Optional[int] = None  # null: the run's sampler's
    weights: str = "rtn"  # candidates' weights: rtn (round-to-nearest per group, fast) | method (the method's own steps, e.g. GPTQ, per candidate)
    # the search's checkpoint (resumed when it exists; refused when made under another config);
    # null: <paths.cache_dir>/search/<key of everything the result depends on>.json
    state_file: Optional[str] = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    bits: BitsConfig = field(default_factory=BitsConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    table: TableConfig = field(default_factory=TableConfig)
    experiment: Optional[str] = None  # the experiment (table) this run belongs to
    run_name: Optional[str] = None  # derived from config values when null
    force: bool = False  # redo a run even if an identical one already finished (else its row is reused)
    device: str = "auto"  # auto | cpu | cuda
    dtype_inference: str = "float32"  # dtype of sampling (float32 | float16 | bfloat16)


def _choices(values) -> str:
    return ", ".join(str(v) for v in values)


def _check_choice(key: str, value: str, valid, why: str = "") -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {_choices(valid)}{why}")


def _check_positive(key: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive number")


def _check_diagnostics(run: DictConfig) -> None:
    """Positive counts; held-out seeds disjoint from the calibration and the evaluation seeds."""
    d = run.diagnostics
    if not d.enabled:
        return
    for key in ("num_samples", "num_timesteps", "batch_size", "max_stored_mb"):
        _check_positive(f"diagnostics.{key}", d[key])
    _check_choice("diagnostics.labels", d.labels, LABEL_MODES)
    diag = range(d.seed_start, d.seed_start + d.num_samples)
    for group in ("calib", "eval"):
        other = range(run[group].seed_start, run[group].seed_start + run[group].num_samples)
        if diag.start < other.stop and other.start < diag.stop:
            raise ConfigError(
                f"diagnostics seeds [{diag.start}, {diag.stop}) overlap {group} seeds [{other.start}, {other.stop}): "
                f"diagnostics must run on held-out trajectories; move diagnostics.seed_start or {group}.seed_start"
            )


def _leading_transforms(steps: list) -> int:
    """How many steps at the start of `steps` transform the model (ditq.methods.options.MODEL_TRANSFORM_STEPS)."""
    from ditq.methods.options import MODEL_TRANSFORM_STEPS

    n = 0
    while n < len(steps) and steps[n] in MODEL_TRANSFORM_STEPS:
        n += 1
    return n


def _check_step_order(run: DictConfig) -> None:
    """Model transforms (rotations folded into the weights) lead method.steps: a step before them would
    fit quantizers or record calibration inputs of the model they are about to change."""
    from ditq.methods.options import MODEL_TRANSFORM_STEPS

    steps = [spec.get("name") for spec in run.method.steps]
    late = [s for s in steps[_leading_transforms(steps):] if s in MODEL_TRANSFORM_STEPS]
    if late:
        first = steps[_leading_transforms(steps)]
        raise ConfigError(f"method.steps: {late[0]} comes after {first}, which fits quantizers or records calibration "
                          f"inputs on the model before {late[0]} changes its weights (the fitted grids and inputs would "
                          f"be stale); put {late[0]} first, e.g. steps: [{late[0]}, {first}, ...]; got {steps}")


SEARCH_CONSTRAINTS = ("bitops", "storage", "mean_group_size", "none")
SEARCH_OBJECTIVES = ("fid_to_fp", "fid")
SEARCH_WEIGHTS = ("rtn", "method")


def _check_search(run: DictConfig) -> None:
    """The search group, when a step uses it: choices, budget, objective, seeds disjoint from the rest."""
    steps = [spec.get("name") for spec in run.method.steps]
    if not {"group_search", "group_allocation"} & set(steps):
        return
    s = run.search
    if not s.choices or any(int(c) <= 0 for c in s.choices) or len(set(s.choices)) != len(s.choices):
        raise ConfigError(f"search.choices={list(s.choices)} must be distinct positive group sizes, "
                          "e.g. [32, 64, 128, 192, 288] (Q-DiT) or search=embedded for the embedded models")
    _check_positive("search.target_group_size", s.target_group_size)
    _check_choice("search.constraint", s.constraint, SEARCH_CONSTRAINTS)
    if s.max_bitops is not None:
        _check_positive("search.max_bitops", s.max_bitops)
    if "group_search" not in steps:
        return
    if steps.index("group_search") != _leading_transforms(steps):
        raise ConfigError(f"method.steps: group_search must come first, after model transforms only (it rebuilds "
                          f"every quantizer); got {steps}")
    for key in ("population", "generations", "top_k", "num_samples", "holdout_samples"):
        if s[key] is None or s[key] <= 0:
            raise ConfigError(f"search.{key}={s[key]!r}: a search budget of zero cannot choose anything; "
                              f"set search.{key} to a positive number (conf/search/qdit.yaml has the paper's)")
    for key in ("mutations", "crossovers"):
        if s[key] < 0:
            raise ConfigError(f"search.{key}={s[key]} must be >= 0")
    if s.generations > 1 and s.mutations + s.crossovers == 0:
        raise ConfigError("search.mutations + search.crossovers = 0: later generations would be empty; "
                          "set them (Q-DiT: 25 and 25) or search.generations=1")
    if s.top_k > s.population:
        raise ConfigError(f"search.top_k={s.top_k} > search.population={s.population}")
    if not 0 <= s.mutation_prob <= 1:
        raise ConfigError(f"search.mutation_prob={s.mutation_prob} must be in [0, 1]")
    _check_choice("search.objective", s.objective, SEARCH_OBJECTIVES)
    _check_choice("search.weights", s.weights, SEARCH_WEIGHTS)
    if s.objective == "fid" and "fid" not in run.eval.metrics:
        raise ConfigError("search.objective=fid needs a reference FID (eval.metrics has no 'fid'); "
                          "use search.objective=fid_to_fp")
    if s.num_steps is not None:
        _check_positive("search.num_steps", s.num_steps)
    ranges = {"search": (s.seed_start, s.num_samples), "search held-out": (s.holdout_seed_start, s.holdout_samples),
              "calib": (run.calib.seed_start, run.calib.num_samples), "eval": (run.eval.seed_start, run.eval.num_samples)}
    if run.diagnostics.enabled:
        ranges["diagnostics"] = (run.diagnostics.seed_start, run.diagnostics.num_samples)
    items = list(ranges.items())
    for i, (a, (sa, na)) in enumerate(items):
        for b, (sb, nb) in items[i + 1:]:
            if sa < sb + nb and sb < sa + na and ("search" in a or "search" in b):
                raise ConfigError(f"{a} seeds [{sa}, {sa + na}) overlap {b} seeds [{sb}, {sb + nb}): the search must "
                                  "choose on its own seeds and be re-scored on held-out ones; move "
                                  "search.seed_start / search.holdout_seed_start")


def to_run_config(cfg: DictConfig | dict) -> DictConfig:
    """Merge a composed config into the schema: unknown keys and wrong types name the key."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f" (key: {key})" if key else ""
        raise ConfigError(f"invalid config{where}: {err.msg if hasattr(err, 'msg') else err}") from None
    missing = OmegaConf.missing_keys(merged)
    if missing:
        raise ConfigError(f"config keys without a value: {', '.join(sorted(missing))}")
    return merged


def format_implied(fmt: str, role: str) -> dict[str, Any]:
    """Quantizer settings a format dictates, whatever the method asks for:
    block formats (mx*, nvfp4) scale their own blocks (per_block, symmetric, minmax; dynamic for
    activations); signed FP grids are symmetric; uint/ufp grids carry a zero point. `symmetric`
    in a method is thus the INT knob (signed symmetric grid vs unsigned grid with zero point)."""
    from ditq.quant.spec import parse_format

    spec = parse_format(fmt)
    if spec.is_block:
        implied: dict[str, Any] = {"granularity": "per_block", "group_size": None, "symmetric": True,
                                   "range": "minmax"}
        if role == "act":
            implied["dynamic"] = True
        return implied
    if spec.needs_zero_point:
        return {"symmetric": False}
    if spec.family in ("fp", "ocp"):
        return {"symmetric": True}
    return {}


def method_format(formats, role: str, side: str, fmt: Optional[str]) -> Optional[str]:
    """The format of `side` ("weight"/"act") of a layer role after the method's per-role rules
    (`method.formats`, FP4DiT's E3M0 for fc1): `formats[role][side]` (else `formats["default"][side]`)
    maps "fp<n>" to a format of n bits, used when `fmt` (from bits) is a signed FP format of n bits,
    so a rule written for 4-bit weights never touches an 8-bit or an INT run."""
    if fmt is None or not formats:
        return fmt
    rules = formats.get(role)
    if rules is None or rules.get(side) is None:
        rules = formats.get("default")
    rule = None if rules is None else rules.get(side)
    if not rule:
        return fmt
    from ditq.quant.spec import parse_format

    spec = parse_format(fmt)
    if spec.family not in ("fp", "ocp"):
        return fmt
    return rule.get(f"fp{spec.bits}", fmt)


def quantizer_config(method_side: dict, fmt: str, role: str, key: str):
    """The full ditq.quant QuantizerConfig of one side (weight/act) of a method, validated:
    the method's settings, then what the format dictates (`format_implied`)."""
    from ditq.quant.spec import FormatError, QuantizerConfig, validate_quantizer_config

    valid = {f.name for f in fields(QuantizerConfig)} - {"format"}
    unknown = set(method_side) - valid
    if unknown:
        raise ConfigError(f"{key}: unknown quantizer option(s) {sorted(unknown)}; valid: {_choices(sorted(valid))}")
    try:
        side = {**dict(method_side), **format_implied(fmt, role)}
        qcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QuantizerConfig(format=fmt)), side))
        validate_quantizer_config(qcfg, role)
    except (FormatError, ValueError, OmegaConfBaseException) as err:
        raise ConfigError(f"{key} with format {fmt!r}: {err}") from None
    return qcfg


def validate_config(cfg: DictConfig | dict) -> DictConfig:
    """Schema merge plus semantic checks. Returns the resolved, typed config."""
    from ditq.quant.spec import FormatError, parse_format

    run = to_run_config(cfg)
    m = run.method
    for role in m.layers:
        _check_choice("method.layers[]", role, LAYER_ROLES)
    for key, fmt in (("bits.weight", run.bits.weight), ("bits.act", run.bits.act)):
        if fmt is not None:
            try:
                parse_format(fmt)
            except FormatError as err:
                raise ConfigError(f"{key}: {err}") from None
    for role, ov in run.bits.overrides.items():
        _check_choice("bits.overrides key", role, LAYER_ROLES)
        for side in ov:
            _check_choice(f"bits.overrides.{role} key", side, ("weight", "act"))
            if ov[side] is not None:
                try:
                    parse_format(ov[side])
                except FormatError as err:
                    raise ConfigError(f"bits.overrides.{role}.{side}: {err}") from None
    if run.bits.weight is not None:
        quantizer_config(m.weight, run.bits.weight, "weight", "method.weight")
    if run.bits.act is not None:
        quantizer_config(m.act, run.bits.act, "act", "method.act")
    from ditq.methods.registry import check_steps  # torch-free option check of each step

    try:
        check_steps(list(m.steps))
    except ValueError as err:
        raise ConfigError(f"method.steps: {err}") from None
    _check_step_order(run)
    if m.plan is not None:  # the file exists, parses, and its entries resolve (torch-free)
        from ditq.methods.plan import check_plan_file

        check_plan_file(m.plan, run)

    _check_choice("sampler.kind", run.sampler.kind, SAMPLER_KINDS)
    _check_positive("sampler.num_steps", run.sampler.num_steps)
    _check_positive("sampler.batch_size", run.sampler.batch_size)
    if run.sampler.cfg_scale < 1.0:
        raise ConfigError(f"sampler.cfg_scale={run.sampler.cfg_scale} must be >= 1 (1 disables guidance)")
    _check_choice("model.weights", run.model.weights, WEIGHT_SOURCES)
    if run.model.weights == "local" and not run.model.path:
        raise ConfigError("model.weights=local needs model.path (a directory in the hub layout)")
    if run.model.weights == "hub" and not run.model.hub_id:
        raise ConfigError("model.weights=hub needs model.hub_id")
    _check_choice("eval.labels", run.eval.labels, LABEL_MODES)
    _check_choice("calib.labels", run.calib.labels, LABEL_MODES)
    _check_choice("method.calib_timesteps", run.method.calib_timesteps, CALIB_TIMESTEP_MODES)
    _check_choice("calib.timesteps", run.calib.timesteps, CALIB_TIMESTEP_MODES)
    _check_positive("eval.num_samples", run.eval.num_samples)
    _check_positive("eval.batch_size", run.eval.batch_size)
    _check_positive("calib.num_samples", run.calib.num_samples)
    _check_positive("calib.num_timesteps", run.calib.num_timesteps)
    if run.calib.num_timesteps > run.sampler.num_steps and run.calib.timesteps == "uniform":
        raise ConfigError(
            f"calib.num_timesteps={run.calib.num_timesteps} exceeds sampler.num_steps={run.sampler.num_steps}"
        )
    eval_seeds = range(run.eval.seed_start, run.eval.seed_start + run.eval.num_samples)
    calib_seeds = range(run.calib.seed_start, run.calib.seed_start + run.calib.num_samples)
    if eval_seeds.start < calib_seeds.stop and calib_seeds.start < eval_seeds.stop:
        raise ConfigError(
            "calib seeds overlap eval seeds: calibrating on the evaluated images biases the result; "
            "move calib.seed_start or eval.seed_start"
        )
    _check_diagnostics(run)
    _check_search(run)
    _check_choice("logger.mode", run.logger.mode, ("offline", "online", "disabled"))
    _check_choice("device", run.device, ("auto", "cpu", "cuda"))
    _check_choice("dtype_inference", run.dtype_inference, ("float32", "float16", "bfloat16"))
    from ditq.config.checks import check_values  # ranges, choices and combinations of every group

    check_values(run)
    if run.run_name is None:
        run.run_name = derive_run_name(run)
    return run


def is_full_precision(run: DictConfig) -> bool:
    return (run.bits.weight is None and run.bits.act is None and not run.bits.overrides
            and not run.method.get("plan"))


def derive_run_name(run: DictConfig) -> str:
    """A run name built from config values only (never typed by hand)."""
    quant = "fp" if is_full_precision(run) else f"{run.method.name}-{run.bits.name}"
    if run.method.get("plan"):  # the plan decides the layers' formats: name it instead of bits
        quant = f"{run.method.name}-plan_{os.path.splitext(os.path.basename(run.method.plan))[0]}"
    return f"{run.model.name}-{quant}-{run.sampler.name}-cfg{run.sampler.cfg_scale:g}-n{run.eval.num_samples}"
