"""Options of each method step (torch-free dataclasses, validated with the config)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional


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


ADAROUND_REC_LOSSES = ("brecq", "mean")  # ditq.algorithms.adaround.REC_LOSSES


@dataclass
class AdaRoundOptions:
    """AdaRound (plain or FP4DiT's scale-aware) with BRECQ block reconstruction (ditq.methods.adaround),
    on whatever grid the weight quantizers have. Defaults: AdaRound / BRECQ's (lr: AdaRound's 1e-3, as
    the FP4DiT paper states none; its public code hard-codes 1e-4 for alpha: lr=1e-4)."""

    iters: int = 2500  # per block (FP4DiT: 2500; the INT Q-Diffusion baseline: 20000)
    batch_size: int = 16  # random calibration rows per iteration
    lr: float = 1e-3  # Adam on the rounding variables (V, or alpha when scale_aware)
    reg_weight: float = 0.01  # lambda of the rounding regulariser sum(1 - |2h - 1|^beta)
    beta_start: float = 20.0  # beta annealed linearly start -> end after the warm-up
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations without the regulariser
    scale_aware: bool = False  # FP4DiT: h from sigmoid(alpha / s), s the per-element grid step
    rec_loss: str = "brecq"  # brecq: BRECQ's lp_loss (squared error summed over dim 1, mean over the rest) | mean
    seed: int = 0  # row sampling
    log_every: int = 500  # log (and record in the row) the losses every N iterations; 0: never
    roles: Optional[List[str]] = None  # roles whose weights are rounded (null: every layer with a weight quantizer)
    sequential: bool = True  # block k's inputs come from the quantized blocks 0..k-1 (else the FP model's)
    pass_batch_size: int = 32  # rows per forward of the passes that produce block inputs and FP targets
    io_budget_mb: float = 2048.0  # block inputs / targets kept in memory; beyond it, memory-mapped files

    def check(self) -> None:
        if isinstance(self.iters, bool) or self.iters <= 0:
            raise ValueError(f"iters={self.iters} must be a positive number of iterations per block "
                             "(FP4DiT: 2500, the INT Q-Diffusion baseline: 20000)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1 (BRECQ: 16 rows per iteration)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr} must be a positive learning rate (AdaRound: 1e-3; FP4DiT's code: 1e-4)")
        if not (math.isfinite(self.reg_weight) and self.reg_weight >= 0):
            raise ValueError(f"reg_weight={self.reg_weight} must be >= 0 (AdaRound / BRECQ: 0.01)")
        if not (self.beta_start > 0 and self.beta_end > 0):
            raise ValueError(f"beta_start={self.beta_start}, beta_end={self.beta_end} must be > 0 (BRECQ: 20 -> 2)")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup={self.warmup} must be a fraction of the iterations in [0, 1) (BRECQ: 0.2)")
        if self.rec_loss not in ADAROUND_REC_LOSSES:
            raise ValueError(f"rec_loss={self.rec_loss!r}; choose one of {', '.join(ADAROUND_REC_LOSSES)}")
        if self.log_every < 0:
            raise ValueError(f"log_every={self.log_every} must be >= 0 (0: no loss log)")
        if self.pass_batch_size < 2:
            raise ValueError(f"pass_batch_size={self.pass_batch_size} must be >= 2 (a row and its unconditional twin)")
        if self.io_budget_mb < 0:
            raise ValueError(f"io_budget_mb={self.io_budget_mb} must be >= 0")
        if self.roles is not None:
            from ditq.config.schema import LAYER_ROLES

            if not self.roles:
                raise ValueError("roles is empty; use null (every layer with a weight quantizer) or list roles")
            for r in self.roles:
                if r not in LAYER_ROLES:
                    raise ValueError(f"roles: unknown role {r!r}; choose among {list(LAYER_ROLES)}")


@dataclass
class RepQOptions:
    """RepQ-ViT on DiT (ditq.methods.repq): post-LN per-channel -> per-tensor scale reparameterisation
    folded into the adaLN linear and the consumers, and a log2 quantizer of the attention probabilities."""

    reparam: bool = True  # post-norm1 / post-norm3 activations: per-channel grid folded into per-tensor
    softmax: bool = True  # log-quantize the post-softmax attention probabilities (scale 1)
    softmax_bits: int | None = None  # None: the bit width of the attention's input activation quantizer
    softmax_grid: str = "log_sqrt2"  # log_sqrt2: 2^(-k/2), RepQ-ViT's values; log2: 2^-k

    def check(self) -> None:
        if self.softmax_grid not in ("log2", "log_sqrt2"):
            raise ValueError(f"softmax_grid={self.softmax_grid!r}; choose log_sqrt2 (levels 2^(-k/2), RepQ-ViT) "
                             "or log2 (levels 2^-k)")
        if self.softmax_bits is not None and not 1 <= self.softmax_bits <= 16:
            raise ValueError(f"softmax_bits={self.softmax_bits} must be in 1..16 (2^bits log2 levels) or null "
                             "(the activations' bit width)")


@dataclass
class GroupSearchOptions:
    """Q-DiT's evolutionary group-size search; its settings are the run's `search` group
    (conf/search/*.yaml), shared with `group_allocation`, so experiments override them in one place."""


SMOOTHQUANT_ROLES = ("qkv", "proj", "fc1")  # inputs whose 1/s folds exactly into the model (ditq.methods.fold)


@dataclass
class SmoothQuantOptions:
    """SmoothQuant (Xiao et al., 2023): per input channel j of a smoothed layer,
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); X / s and W * s, folded exactly into the model."""

    alpha: float = 0.5  # migration strength: 0 leaves the activation ranges alone, 1 moves them into the weights
    roles: List[str] = field(default_factory=lambda: list(SMOOTHQUANT_ROLES))  # which inputs are smoothed

    def check(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and 0 <= self.alpha <= 1):
            raise ValueError(f"alpha={self.alpha} must be in [0, 1] (the migration strength; SmoothQuant uses 0.5); "
                             "set it in the smoothquant entry of method.steps, e.g. method.steps.0.alpha=0.5")
        if not self.roles:
            raise ValueError(f"roles is empty; list at least one of {list(SMOOTHQUANT_ROLES)}")
        for r in self.roles:
            if r == "fc2":
                raise ValueError("roles: fc2 cannot be smoothed exactly (its input comes out of GELU, with no "
                                 "linear op in front to fold 1/s into, and QuantLinear has no online input "
                                 f"transform); use roles among {list(SMOOTHQUANT_ROLES)}")
            if r not in SMOOTHQUANT_ROLES:
                raise ValueError(f"roles: unknown role {r!r}; choose among {list(SMOOTHQUANT_ROLES)}")


# steps that transform the model (weights and online input transforms) rather than fit quantizers: they
# lead method.steps, and the layer inputs are recorded after them (ditq.pipeline)
MODEL_TRANSFORM_STEPS = ("rotate",)
ROTATION_FALLBACKS = ("random", "error")


@dataclass
class RotateOptions:
    """Hadamard rotations (HQ-DiT's identity transform, ditq.methods.rotate): the inputs of the layers
    of `roles` rotated online with the inverse folded into their weights; with head_rotation, V and
    the attention output projection (proj) rotated per head, folded on both sides (no online cost)."""

    roles: List[str] = field(default_factory=lambda: ["qkv", "fc1", "fc2", "adaln"])  # online-rotated inputs
    head_rotation: bool = True  # proj's input through a per-head rotation of V (free)
    random_signs: bool = True  # R = diag(+-1) H / sqrt(n); false: the plain normalised Hadamard matrix
    seed: int = 0  # signs (and a fallback matrix) per rotation from this seed and the layer's name
    fallback: str = "random"  # a width with no Hadamard construction: random (seeded random orthogonal, logged) | error

    def check(self) -> None:
        from ditq.config.schema import LAYER_ROLES

        for r in self.roles:
            if r not in LAYER_ROLES:
                raise ValueError(f"roles: unknown role {r!r}; choose among {list(LAYER_ROLES)}")
        if self.fallback not in ROTATION_FALLBACKS:
            raise ValueError(f"fallback={self.fallback!r}; choose random (a seeded random orthogonal matrix for a "
                             "width with no Hadamard construction, logged) or error")
        if not self.roles and not self.head_rotation:
            raise ValueError("roles is empty and head_rotation is false: nothing to rotate")


ALLOCATION_STRATEGIES = ("ilp", "hessian")  # ditq.methods.allocation (Q-DiT Table 5)
KNAPSACK_SOLVERS = ("auto", "milp", "bnb")  # ditq.search.knapsack


@dataclass
class GroupAllocationOptions:
    """Q-DiT Table 5's sensitivity-based alternatives to the evolutionary search: per-layer group
    sizes from per-layer sensitivities and an exact multiple-choice knapsack under the run's `search`
    constraint (choices, target_group_size, constraint, max_bitops)."""

    strategy: str = "ilp"  # ilp: measured output MSE per layer and choice | hessian: diagonal-Hessian proxy
    act_term: bool = True  # hessian: add the activation-perturbation term (see ditq.methods.allocation)
    solver: str = "auto"  # auto (scipy's MILP when importable, else branch and bound) | milp | bnb
    max_rows: int | None = None  # calibration rows per layer used for the sensitivities (null: all recorded)

    def check(self) -> None:
        if self.strategy not in ALLOCATION_STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; choose one of {', '.join(ALLOCATION_STRATEGIES)}")
        if self.solver not in KNAPSACK_SOLVERS:
            raise ValueError(f"solver={self.solver!r}; choose one of {', '.join(KNAPSACK_SOLVERS)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows={self.max_rows} must be >= 1 or null (every recorded row)")


FORMAT_SELECT_SIDES = ("weight", "act")
FORMAT_SELECT_ERRORS = ("mse", "output")  # ditq.methods.format_select


@dataclass
class FormatSelectOptions:
    """HQ-DiT's format selection (ditq.methods.format_select): per layer and side, the FP ExMy split
    and clipping ratio with the least quantization error on calibration data."""

    # "auto": every signed FP ExMy split of the side's own bit width (the side's format first); or
    # explicit formats, all of one bit width (that of the sides they are used on)
    formats: List[str] = field(default_factory=lambda: ["auto"])
    # fractions of the fitted range kept (each in (0, 1]); [1.0] = no clipping selection
    clip_ratios: List[float] = field(default_factory=lambda: [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6,
                                                              0.55, 0.5])
    sides: List[str] = field(default_factory=lambda: list(FORMAT_SELECT_SIDES))
    weight_error: str = "mse"  # mse: ||Q(W) - W||^2 | output: tr(dW H dW^T), H = X^T X / N on calibration rows
    max_rows: Optional[int] = 4096  # calibration rows per layer for the act error (and H); null: all recorded

    def check(self) -> None:
        from ditq.quant.spec import FormatError, parse_format

        hint = "set it in the format_select entry of method.steps, e.g. method.steps.0."
        if not self.formats:
            raise ValueError(f"formats is empty; use [auto] (every FP split of the side's bit width) or list "
                             f"formats of one bit width, e.g. [fp4_e2m1, fp4_e3m0]; {hint}formats=[auto]")
        if "auto" in self.formats:
            if len(self.formats) != 1:
                raise ValueError(f"formats={list(self.formats)}: 'auto' stands for every FP split of the side's "
                                 "bit width and cannot be combined with named formats; use [auto] or only names")
        else:
            widths = {}
            for f in self.formats:
                try:
                    spec = parse_format(f)
                except FormatError as err:
                    raise ValueError(f"formats: {err}") from None
                if spec.is_block:
                    raise ValueError(f"formats: {f} is a block format, which fixes its own scales; list "
                                     "element formats such as fp4_e2m1 (a side with a block format is skipped)")
                widths.setdefault(spec.bits, []).append(f)
            if len(widths) > 1:
                by = "; ".join(f"{b} bits: {', '.join(fs)}" for b, fs in sorted(widths.items()))
                raise ValueError(f"formats={list(self.formats)} mixes bit widths ({by}); a side keeps its bit "
                                 "width, so list formats of one width (or use [auto])")
            if len(set(parse_format(f).name for f in self.formats)) != len(self.formats):
                raise ValueError(f"formats={list(self.formats)} names a format twice")
        if not self.clip_ratios:
            raise ValueError(f"clip_ratios is empty; use [1.0] for no clipping selection; {hint}clip_ratios=[1.0]")
        for r in self.clip_ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
                raise ValueError(f"clip_ratios: {r!r} must lie in (0, 1] (the fraction of the fitted range kept)")
        if len(set(self.clip_ratios)) != len(self.clip_ratios):
            raise ValueError(f"clip_ratios={list(self.clip_ratios)} lists a ratio twice")
        if not self.sides:
            raise ValueError(f"sides is empty; choose among {list(FORMAT_SELECT_SIDES)}")
        for side in self.sides:
            if side not in FORMAT_SELECT_SIDES:
                raise ValueError(f"sides: unknown side {side!r}; choose among {list(FORMAT_SELECT_SIDES)}")
        if len(set(self.sides)) != len(self.sides):
            raise ValueError(f"sides={list(self.sides)} names a side twice")
        if self.weight_error not in FORMAT_SELECT_ERRORS:
            raise ValueError(f"weight_error={self.weight_error!r}; choose one of {', '.join(FORMAT_SELECT_ERRORS)} "
                             "(mse: weight error; output: layer output error on calibration inputs)")
        if self.max_rows is not None and (isinstance(self.max_rows, bool) or self.max_rows < 1):
            raise ValueError(f"max_rows={self.max_rows} must be >= 1 or null (every recorded row)")


TALORA_ROUTERS = ("learned", "fixed")  # ditq.quant.lora.Router
TALORA_ROUTER_INITS = ("partition", "random")
TALORA_LORA_INPUTS = ("quantized", "fp")


@dataclass
class TALoRAOptions:
    """MSFP's timestep-aware LoRA fine-tuning with the denoising-factor loss (ditq.methods.talora):
    `branches` LoRA branches of rank `rank` on every quantized layer, one chosen per timestep by a router,
    trained against the FP model's outputs on the calibration records, loss weighted by |gamma_t|^dfa_power.

    Defaults (the abstract states none): 4 branches of rank 4 (the 25-step samplers give each branch about
    6 timesteps; a rank-4 branch adds 8% of the embedded U-Net's and 4.5% of the embedded DiT's parameter
    count, ~0.5% per rank on 256-channel convs; all K branches are stored, at 16 bits, and counted in the
    model size; EfficientDM uses larger ranks on real U-Nets: set rank for them); a learned router initialised to the fixed
    partition (it starts from the split a fixed router would use and only moves timesteps when the loss says
    so); DFA on with power 1 (the loss scaled by gamma_t as the method states; 2 makes the weighted MSE the
    squared error reaching the next sample, which puts ~500x more weight on the first steps than the last);
    LoRA read the quantized input (what the deployed layer has) and are stored in 16 bits; Adam lr 1e-3
    (EfficientDM: 5e-4 with far more iterations); 300 iterations of 16 rows keep the embedded models' fine-tuning
    within minutes on a CPU."""

    branches: int = 4  # K (1: plain LoRA, EfficientDM's fine-tuning)
    rank: int = 4  # r of every branch
    alpha: Optional[float] = None  # scale alpha / r (null: alpha = r, scale 1)
    router: str = "learned"  # learned (STE) | fixed (contiguous equal-count intervals of the sampler's timesteps)
    router_init: str = "partition"  # learned router: fitted to the fixed partition first | random
    router_embed_dim: int = 64  # sinusoidal timestep embedding width
    router_hidden: int = 64  # MLP hidden width
    router_temperature: float = 1.0  # softmax temperature of the straight-through gradient
    router_lr: Optional[float] = None  # null: lr
    lora_input: str = "quantized"  # quantized: after the activation quantizer (deployed) | fp: before it
    lora_bits: int = 16  # storage bits of LoRA / router weights (16: rounded to fp16 after training) | 32
    dfa: bool = True  # weight the loss at t by |gamma_t|^dfa_power (false: unweighted MSE)
    dfa_power: float = 1.0
    iters: int = 300
    batch_size: int = 16  # calibration rows per iteration
    lr: float = 1e-3  # Adam on the LoRA weights
    seed: int = 0  # LoRA init and row sampling
    pass_batch_size: int = 32  # rows per forward of the FP-target and evaluation passes
    checkpoint_every: int = 100  # iterations between checkpoints (0: none)
    checkpoint: Optional[str] = None  # explicit checkpoint file (null: <cache_dir>/block_io/talora/<spec key>/)
    log_every: int = 50  # loss curve points recorded in the row (0: first / last only)

    def check(self) -> None:
        def pos_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")

        for name in ("branches", "rank", "router_embed_dim", "router_hidden", "iters", "batch_size",
                     "pass_batch_size"):
            pos_int(name)
        if self.router_embed_dim % 2:
            raise ValueError(f"router_embed_dim={self.router_embed_dim} must be even (cos and sin halves)")
        if self.router not in TALORA_ROUTERS:
            raise ValueError(f"router={self.router!r}; choose one of {', '.join(TALORA_ROUTERS)}")
        if self.router_init not in TALORA_ROUTER_INITS:
            raise ValueError(f"router_init={self.router_init!r}; choose one of {', '.join(TALORA_ROUTER_INITS)}")
        if self.lora_input not in TALORA_LORA_INPUTS:
            raise ValueError(f"lora_input={self.lora_input!r}; choose one of {', '.join(TALORA_LORA_INPUTS)}")
        if self.lora_bits not in (16, 32):
            raise ValueError(f"lora_bits={self.lora_bits}; choose 16 (fp16 storage) or 32")
        for name in ("lr", "router_temperature"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v} must be a positive number")
        if self.router_lr is not None and not (math.isfinite(self.router_lr) and self.router_lr > 0):
            raise ValueError(f"router_lr={self.router_lr} must be a positive number or null (= lr)")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha} must be a positive number or null (= rank)")
        if not (math.isfinite(self.dfa_power) and self.dfa_power >= 0):
            raise ValueError(f"dfa_power={self.dfa_power} must be >= 0 (1: the loss scaled by gamma_t)")
        if self.checkpoint_every < 0 or self.log_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} and log_every={self.log_every} must be >= 0")


MIXUP_SIGN_RULES = ("neg_ratio", "neg_mass", "both")  # ditq.methods.mixup_sign.is_anomalous
MIXUP_SIGN_ERRORS = ("mse", "output")


@dataclass
class MixupSignOptions:
    """MSFP's mixup-sign FP (ditq.methods.mixup_sign): anomalous-activation layers (AALs, a squeezed
    negative input side, e.g. after SiLU / GELU) get unsigned FP with a zero point on their inputs, the
    others signed FP; the ExMy split (and the AALs' zero point) of every layer searched by calibration MSE."""

    rule: str = "neg_ratio"  # AAL test: neg_ratio < threshold | neg_mass < mass_threshold | both
    threshold: float = 0.3  # neg_ratio = |min(x, 0)| / max|x| (exact ranges); SiLU: 0.278 / max, GELU 0.17 / max
    mass_threshold: float = 0.25  # neg_mass = sum |x| over x < 0 / sum |x| (rows); symmetric data: 0.5
    allow_unsigned: bool = True  # false: signed FP everywhere, same split search (the signed-only ablation)
    force_unsigned: bool = False  # AALs take unsigned FP even when signed FP has the lower calibration MSE
    unsigned_max_neg_ratio: float = 0.5  # forced unsigned (force_unsigned, or a ufp act format) on a larger one: error
    splits: Any = "auto"  # exponent bits tried: auto (every ExMy split ditq builds for the width) or e.g. [2, 3]
    clip_ratios: List[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5])  # act range kept
    zero_point_ratios: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25, 0.0])  # of min(x, 0)
    search_weights: bool = True  # the weights' signed FP split searched too (else they keep the bits' format)
    weight_clip_ratios: List[float] = field(default_factory=lambda: [1.0])
    weight_error: str = "mse"  # mse: ||Q(W) - W||^2 | output: tr(dW H dW^T) on calibration rows (linear layers)
    max_rows: Optional[int] = 2048  # calibration rows per layer scored (evenly spaced); null: all recorded

    def check(self) -> None:
        hint = "set it in the mixup_sign entry of method.steps, e.g. method.steps.0."
        if self.rule not in MIXUP_SIGN_RULES:
            raise ValueError(f"rule={self.rule!r}; choose one of {', '.join(MIXUP_SIGN_RULES)} (neg_ratio: "
                             "|min| / max|x| below threshold; neg_mass: negative share of sum |x| below "
                             "mass_threshold; both: the two at once)")
        for key, value, hi in (("threshold", self.threshold, 1.0), ("mass_threshold", self.mass_threshold, 0.5),
                               ("unsigned_max_neg_ratio", self.unsigned_max_neg_ratio, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= hi:
                raise ValueError(f"{key}={value!r} must lie in (0, {hi:g}]; {hint}{key}=...")
        if self.force_unsigned and not self.allow_unsigned:
            raise ValueError("force_unsigned=true with allow_unsigned=false: the first asks every AAL to take "
                             "unsigned FP, the second forbids it; drop one of them")
        if isinstance(self.splits, str):
            if self.splits != "auto":
                raise ValueError(f"splits={self.splits!r}; use auto (every ExMy split of the width) or a list of "
                                 f"exponent bit counts, e.g. [2, 3]; {hint}splits=auto")
        else:
            splits = list(self.splits) if isinstance(self.splits, (list, tuple)) else None
            if not splits or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in splits):
                raise ValueError(f"splits={self.splits!r} must be auto or a non-empty list of exponent bit counts "
                                 "(ints >= 1), e.g. [1, 2, 3]")
            if len(set(splits)) != len(splits):
                raise ValueError(f"splits={splits} lists an exponent width twice")
        for key, ratios, lo_open in (("clip_ratios", self.clip_ratios, True),
                                     ("weight_clip_ratios", self.weight_clip_ratios, True),
                                     ("zero_point_ratios", self.zero_point_ratios, False)):
            if not ratios:
                raise ValueError(f"{key} is empty; use [1.0] for no search; {hint}{key}=[1.0]")
            for r in ratios:
                ok = not isinstance(r, bool) and isinstance(r, (int, float)) and (
                    0.0 < float(r) <= 1.0 if lo_open else 0.0 <= float(r) <= 1.0)
                if not ok:
                    raise ValueError(f"{key}: {r!r} must lie in {'(0' if lo_open else '[0'}, 1]")
            if len(set(ratios)) != len(ratios):
                raise ValueError(f"{key}={list(ratios)} lists a ratio twice")
        if self.weight_error not in MIXUP_SIGN_ERRORS:
            raise ValueError(f"weight_error={self.weight_error!r}; choose one of {', '.join(MIXUP_SIGN_ERRORS)}")
        if self.max_rows is not None and (isinstance(self.max_rows, bool) or self.max_rows < 1):
            raise ValueError(f"max_rows={self.max_rows} must be >= 1 or null (every recorded row)")
