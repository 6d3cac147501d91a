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

MODEL_FAMILIES = ("dit", "hunyuan", "pixart", "unet")  # ditq.models.registry.load_adapter
MODEL_DTYPES = ("float32", "float16", "bfloat16")
IMAGE_DATASET_KINDS = ("digits", "imagenet", "coco", "images")  # class-conditional / unconditional models (images: a reference .npz of real images)
PROMPT_DATASET_KINDS = ("digits_captions", "coco_captions", "hpsv2", "prompts")  # text models (ditq.data.prompts)
DIGITS_REFERENCE_KINDS = ("digits", "digits_captions")  # scored against the bundled real digits
DATASET_KINDS = IMAGE_DATASET_KINDS + PROMPT_DATASET_KINDS
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")  # = ditq.metrics.hps.HPS_STYLES (torch-free copy)
# what each family's adapter is conditioned on (its `conditioning`), to pair models and datasets before loading
FAMILY_CONDITIONING = {"dit": "class", "pixart": "text", "hunyuan": "text", "unet": "none"}
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
    _check_noised_calib(run)
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
    if m.family == "pixart":
        _check_pixart(m, arch)
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
        _check_image_side(m, arch)
    if m.family == "hunyuan":
        _check_hunyuan_arch(m, arch)
    if m.family == "unet" and m.vae and not dict(m.vae_arch):
        _fail(f"model.weights=random for the latent U-Net '{m.name}' needs model.vae_arch (the autoencoder's "
              "constructor arguments, `_class: VQModel | AutoencoderKL`)")


def _check_image_side(m, arch: dict) -> None:
    """A random architecture's sample_size (x8 through a VAE) must give model.resolution."""
    side = arch.get("sample_size")
    factor = SD_VAE_FACTOR if m.vae else 1
    if isinstance(side, int) and side * factor != m.resolution:
        _fail(f"model.arch.sample_size={side} gives {side * factor}px images"
              f"{' through the VAE (x8)' if m.vae else ''}, but model.resolution={m.resolution}; "
              f"set model.arch.sample_size={m.resolution // factor}")


def _check_pixart(m, arch: dict) -> None:
    """model.text of a PixArt model (T5 settings) and, for weights=random, arch/text.arch that fit."""
    keys = ("max_tokens", "dtype", "batch_size", "arch", "tokenizer")  # ditq.models.pixart.TEXT_KEYS
    text = dict(m.text)
    for k in text:
        if k not in keys:
            _fail(f"model.text.{k} is not a PixArt text-encoder setting; choose from: {', '.join(keys)}")
    if text.get("max_tokens") is not None:
        _at_least("model.text.max_tokens", text["max_tokens"], 1, "PixArt-alpha: 120, PixArt-Sigma: 300")
    if text.get("batch_size") is not None:
        _at_least("model.text.batch_size", text["batch_size"], 1)
    if text.get("dtype") is not None:
        _choice("model.text.dtype", text["dtype"], MODEL_DTYPES)
    if text.get("tokenizer") is not None:
        _choice("model.text.tokenizer", text["tokenizer"], ("bytes", "digit_words"))
    if m.weights != "random":
        return
    cap = arch.get("caption_channels")
    if not isinstance(cap, int):
        _fail(f"model.arch.caption_channels={cap!r}: a random PixArt needs the width of its text states "
              "(PixArt-alpha/Sigma: 4096)")
    width = dict(text.get("arch") or {}).get("d_model")
    if width != cap:
        _fail(f"model.text.arch.d_model={width!r} must equal model.arch.caption_channels={cap} (the random T5 "
              f"encoder feeds the caption projection); set model.text.arch.d_model={cap}")
    _check_image_side(m, arch)


def _check_hunyuan_arch(m, arch: dict) -> None:
    """model.arch of a random Hunyuan-DiT (diffusers HunyuanDiT2DModel kwargs): widths that fit."""
    heads, head_dim, hidden = (arch.get(k) for k in ("num_attention_heads", "attention_head_dim", "hidden_size"))
    if all(isinstance(v, int) for v in (heads, head_dim, hidden)) and heads * head_dim != hidden:
        _fail(f"model.arch.hidden_size={hidden} must equal num_attention_heads x attention_head_dim = "
              f"{heads} x {head_dim} = {heads * head_dim} (the blocks are that wide, the embedders hidden_size "
              f"wide); set model.arch.hidden_size={heads * head_dim}")
    for key, arch_key in (("max_tokens", "text_len"), ("max_tokens_t5", "text_len_t5")):
        got, want = m.text.get(key), arch.get(arch_key)
        if got is not None and isinstance(want, int) and got != want:
            _fail(f"model.text.{key}={got} but model.arch.{arch_key}={want}: the Hunyuan-DiT transformer takes "
                  f"exactly {want} tokens from that encoder; set model.text.{key}={want}")
    t5 = arch.get("cross_attention_dim_t5")
    if isinstance(t5, int) and t5 % 8:
        _fail(f"model.arch.cross_attention_dim_t5={t5} must be a multiple of 8 (Hunyuan-DiT's text pooler has 8 "
              "heads over the T5 states); e.g. 2048 as the released model")
    side, patch = arch.get("sample_size"), arch.get("patch_size")
    if isinstance(side, int) and isinstance(patch, int) and side % patch:
        _fail(f"model.arch.sample_size={side} is not a multiple of model.arch.patch_size={patch}")
    _check_image_side(m, arch)


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
    _check_method_formats(m)
    _check_attn(run)


FORMAT_RULE_SIDES = ("weight", "act")
ATTN_KEYS = ("qkv", "per_head", "probs")  # method.attn (ditq.quant.qkv)


def _check_method_formats(m: DictConfig) -> None:
    """method.formats: {<role> | default: {weight | act: {fp<n>: <signed FP format of n bits>}}} (schema.method_format)."""
    import re

    from ditq.config.schema import LAYER_ROLES
    from ditq.quant.spec import FormatError, parse_format

    for role, sides in m.formats.items():
        where = f"method.formats.{role}"
        if role != "default":
            _choice("method.formats key", role, LAYER_ROLES + ("default",))
        if sides is None:  # no rule of its own (e.g. a derived method dropping its parent's rule)
            continue
        if not isinstance(sides, (dict, DictConfig)):
            _fail(f"{where}={sides!r} must be a mapping {{weight: {{fp4: fp4_e3m0}}}}")
        for side, rule in sides.items():
            _choice(f"{where} key", side, FORMAT_RULE_SIDES)
            if rule is None:
                continue
            if not isinstance(rule, (dict, DictConfig)):
                _fail(f"{where}.{side}={rule!r} must map a bit width to a format, e.g. {{fp4: fp4_e3m0}} (used only "
                      "when bits give this side a 4-bit FP format)")
            for width, fmt in rule.items():
                got = re.fullmatch(r"fp(\d+)", str(width))
                if got is None:
                    _fail(f"{where}.{side}: key {width!r} must be fp<bits> (e.g. fp4): the rule applies when bits give "
                          f"this side a signed FP format of that width")
                try:
                    spec = parse_format(fmt)
                except FormatError as err:
                    _fail(f"{where}.{side}.{width}: {err}")
                if spec.family not in ("fp", "ocp") or spec.bits != int(got.group(1)):
                    _fail(f"{where}.{side}.{width}={fmt!r} is not a signed FP format of {got.group(1)} bits; a rule keeps "
                          f"the bit width (e.g. {width}: fp{got.group(1)}_e1m{int(got.group(1)) - 2})")
                quantizer_config(m[side], fmt, side, f"method.{side} (method.formats.{role}.{side}.{width})")
        if role != "default" and role not in m.layers:
            _fail(f"{where} sets formats of role {role!r}, which method.layers={list(m.layers)} does not quantize; "
                  f"add {role} to method.layers or drop the rule")


def _check_attn(run: DictConfig) -> None:
    """method.attn (ditq.quant.qkv): known keys; Q/K/V need activation formats; probs a valid format."""
    from ditq.config.schema import quantizer_config as qcfg

    a = run.method.attn
    unknown = sorted(set(a) - set(ATTN_KEYS))
    if unknown:
        _fail(f"method.attn has unknown key(s) {unknown}; valid: {', '.join(ATTN_KEYS)} (e.g. method.attn.qkv=true)")
    for key in ("qkv", "per_head"):
        if not isinstance(a.get(key, False), bool):
            _fail(f"method.attn.{key}={a.get(key)!r} must be true or false")
    probs = a.get("probs")
    if not a.get("qkv", False) and probs is None:
        return
    quantizes = run.bits.weight is not None or run.bits.act is not None or bool(run.bits.overrides)
    if not quantizes and not run.method.get("plan"):
        return  # a full-precision run (e.g. the FP row of a sweep): the method's quantizers are not built
    # Q/K/V follow their projections' activation format: with activations in FP (bits.act null) they stay FP
    if not {"qkv", "cross_attn"} & set(run.method.layers) and not run.method.get("plan"):
        _fail(f"method.attn quantizes inside the attentions, and method.layers={list(run.method.layers)} quantizes no "
              "q/k/v projection (roles qkv, cross_attn), so Q/K/V would have no format and nothing would switch the "
              "softmax back to full precision; add qkv to method.layers or set method.attn.qkv=false "
              "method.attn.probs=null")
    if probs is not None:
        qcfg({"granularity": "per_token", "dynamic": True}, str(probs), "act", "method.attn.probs")


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
    _check_prompt_source(d)
    conditioning = FAMILY_CONDITIONING.get(m.family)
    if conditioning == "text" and d.kind not in PROMPT_DATASET_KINDS:
        _fail(f"model={m.name} is text-to-image (family {m.family}) and dataset={d.name} (kind {d.kind}) has no "
              "prompts; use a prompt dataset: dataset=digits_captions (the embedded text-to-image model), "
              "dataset=coco_captions or dataset=hpsv2")
    if conditioning == "class" and d.kind in PROMPT_DATASET_KINDS:
        _fail(f"dataset={d.name} (kind {d.kind}) is a prompt dataset and model={m.name} is class-conditional "
              f"(family {m.family}); use dataset=digits for tiny_dit_digits, dataset=imagenet for dit_xl_*, or a "
              "text-to-image model with this dataset")
    if conditioning == "none":  # unconditional (U-Nets): an image dataset; no labels to score against
        if d.kind in PROMPT_DATASET_KINDS:
            _fail(f"dataset={d.name} (kind {d.kind}) is a prompt dataset and model={m.name} is unconditional "
                  f"(family {m.family}); use an image dataset, e.g. dataset=digits for tiny_unet_digits")
        if "cls_acc" in run.eval.metrics:
            _fail(f"eval.metrics has cls_acc, and model={m.name} is unconditional (its samples ask for no class); "
                  "drop cls_acc, e.g. eval=digits_uncond for tiny_unet_digits")
        if run.sampler.cfg_scale != 1.0:
            _fail(f"sampler.cfg_scale={run.sampler.cfg_scale} asks classifier-free guidance of model={m.name}, which "
                  "is unconditional (no null condition to guide against); set sampler.cfg_scale=1.0, e.g. "
                  "sampler=ddim25_uncond")
    elif d.kind in IMAGE_DATASET_KINDS + ("digits_captions",) and d.num_classes != m.num_classes:  # datasets with classes
        _fail(f"dataset.num_classes={d.num_classes} (dataset={d.name}) does not match model.num_classes="
              f"{m.num_classes} (model={m.name}): the model is scored against another dataset than it "
              "generates; pick the dataset of this model (e.g. dataset=digits for tiny_dit_digits, "
              "dataset=imagenet for dit_xl_*)")
    resolutions = list(d.resolutions)
    if resolutions and m.resolution not in resolutions:
        _fail(f"model.resolution={m.resolution} (model={m.name}) has no reference in dataset={d.name}: "
              f"dataset.resolutions={resolutions}; pick a model at one of them or another dataset")
    if d.kind in DIGITS_REFERENCE_KINDS and d.reference is not None:
        _fail(f"dataset.reference={d.reference!r} is ignored for dataset.kind={d.kind} (the bundled digits are "
              "the reference); set dataset.reference=null")
    if d.kind in IMAGE_DATASET_KINDS and d.kind != "digits" and not d.reference:  # prompt datasets: optional (FID)
        _fail(f"dataset.kind={d.kind} needs dataset.reference (a reference batch .npz)"
              f"{'; get it from ' + d.download_hint if d.download_hint else ''}")


def _check_prompt_source(d: DictConfig) -> None:
    """dataset.prompts / images / styles: set where the kind reads them, absent where it does not."""
    needs = {"coco_captions": "the COCO captions annotation file (captions_train2017.json or captions_val2014.json "
                              "from http://images.cocodataset.org/annotations/annotations_trainval2017.zip)",
             "hpsv2": "the directory holding the HPSv2 benchmark prompts anime.json, concept-art.json, paintings.json, "
                      "photo.json (https://huggingface.co/datasets/zhwang/HPDv2/tree/main/benchmark)",
             "prompts": "a prompt file: .txt with one prompt per line, or a .json list of strings"}
    if d.kind in needs and not (d.prompts and str(d.prompts).strip()):
        _fail(f"dataset={d.name} (kind {d.kind}) needs dataset.prompts: {needs[d.kind]}; "
              f"set dataset.prompts=/path/to/it")
    if d.kind not in needs and d.prompts is not None:
        _fail(f"dataset.prompts={d.prompts!r} is ignored for dataset.kind={d.kind} "
              f"({'its captions are built in' if d.kind == 'digits_captions' else 'not a prompt dataset'}); "
              "set dataset.prompts=null")
    if d.images is not None and d.kind != "coco_captions":
        _fail(f"dataset.images={d.images!r} only applies to dataset.kind=coco_captions (the captioned calibration "
              f"images); set dataset.images=null")
    if d.kind == "hpsv2":
        styles = list(d.styles)
        bad = [s for s in styles if s not in HPS_STYLES]
        if not styles or bad or len(set(styles)) != len(styles):
            _fail(f"dataset.styles={styles} must list distinct HPSv2 styles from {list(HPS_STYLES)}"
                  f"{' (unknown: ' + str(bad) + ')' if bad else ''}")


def _check_calib(c: DictConfig) -> None:
    _at_least("calib.seed_start", c.seed_start, 0)
    _at_least("calib.max_tokens_per_layer", c.max_tokens_per_layer, 1)
    _at_least("calib.batch_size", c.batch_size, 1)
    if c.timesteps == "ndtc":  # positions on the timestep axis: 0 = clean end, 1 = pure noise
        _in_range("calib.ndtc_mean", c.ndtc_mean, -10.0, 10.0, "PTQ4DM's NDTC uses 0.4 (towards the clean end)")
        if c.ndtc_std is None or not math.isfinite(c.ndtc_std) or c.ndtc_std <= 0:
            _fail(f"calib.ndtc_std={c.ndtc_std!r} must be a finite number > 0 (PTQ4DM's NDTC uses 0.4)")


CALIB_SOURCES = ("trajectories", "noised_data")  # ditq.calibration.noised
NOISE_TIMESTEPS = ("sampler", "raw_0_19")
NOISED_DATASET_KINDS = ("digits", "digits_captions", "coco_captions")  # where the captioned / labelled images come from


def _check_noised_calib(run: DictConfig) -> None:
    c, d = run.calib, run.dataset
    _choice("calib.source", c.source, CALIB_SOURCES)
    _choice("calib.noise_timesteps", c.noise_timesteps, NOISE_TIMESTEPS,
            " (sampler: the run's sampler steps, FP4DiT's paper; raw_0_19: raw timesteps 0..19, its public code)")
    if c.source != "noised_data":
        return
    if d.kind not in NOISED_DATASET_KINDS:
        _fail(f"calib.source=noised_data noises real images, and dataset={d.name} (kind {d.kind}) has none here; use "
              f"dataset=digits / digits_captions (the embedded models) or coco_captions with dataset.images, or "
              f"calib.source=trajectories")
    if d.kind == "coco_captions" and not d.images:
        _fail("calib.source=noised_data with dataset=coco_captions needs dataset.images: the directory of the COCO "
              "images of dataset.prompts (e.g. train2017/ or val2017/); set dataset.images=/path/to/it")


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
