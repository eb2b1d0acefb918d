"""Training configuration: typed dataclasses, YAML files under `configs/`, `section.field=value` overrides.

The defaults are the published recipe (reference Sec. 7): X-MDPT-S/2, DINOv2 + SD-VAE, AdamW lr 1e-4, weight decay 0,
batch 32, EMA 0.9999 every step, bf16 autocast, no warm-up, no clipping, mask ratio 0.3, condition dropout 0.1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional  # noqa: UP035 - OmegaConf's structured configs need typing.Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xmdpt.errors import InputError


@dataclass
class ModelConfig:
    preset: Optional[str] = "S/2"  # noqa: UP045 - S/2, B/2, L/2, XL/2; None to give the sizes below
    hidden_size: Optional[int] = None  # noqa: UP045 - overrides the preset's width
    depth: Optional[int] = None  # noqa: UP045
    num_heads: Optional[int] = None  # noqa: UP045
    patch_size: int = 2
    learn_sigma: bool = True
    decode_layers: int = 2  # blocks after the side-interpolater (paper: 2)
    pose_map: bool = False  # beyond the paper: also add the rendered target pose to the noisy tokens (see XMDPT)
    # beyond the paper: blocks of the reference memory encoder that every block cross-attends to; 0 = off (see XMDPT)
    reference_layers: int = 0
    refine_channels: int = 0  # beyond the paper: width of a convolutional head that sees x_t; 0 = off (see XMDPT)
    # SPRINT's dense-sparse fusion around blocks [start, end), the token route's span (objective.route_ratio 0.75 is
    # SPRINT's sparsity); null = off. A model parameter: sampling runs it too (see DenseSparseFusion).
    fusion_blocks: Optional[list[int]] = None  # noqa: UP045
    # a checkpoint folder (runs/.../checkpoints/step_XXXXXXXX) whose EMA weights start this run. Modules it lacks
    # (say, reference attention added to a trained model) keep their initialisation; --resume takes precedence.
    init_from: Optional[str] = None  # noqa: UP045


@dataclass
class ConditioningConfig:
    encoder: str = "dinov2"  # "dinov2" (frozen, published) or "learned" (trained with the model, no weights needed)
    pose_encoder: str = "facebook/dinov2-base"  # Hub id or local folder
    reference_encoder: str = "facebook/dinov2-giant"
    public_quirks: bool = True  # DINOv2 inputs as the public code feeds them (no ImageNet norm, no antialias)
    learned_width: int = 128
    # beyond the paper: the learned reference encoder also sees local contrast maps (see LearnedImageEncoder)
    learned_contrast: bool = False
    codec: str = "vae"  # "vae" (SD-VAE latents) or "pixel" (lossless pixel-unshuffle)
    vae: str = "stabilityai/sd-vae-ft-mse"
    pixel_factor: int = 4


@dataclass
class DataConfig:
    layout: str = "deepfashion"  # deepfashion | market | pidm | folder | synthetic
    root: str = "data/fashion"
    size: list[int] = field(default_factory=lambda: [256, 176])  # (height, width); [256, 256] stretches as public
    scale: float = 0.05  # augmentation: random up-scale in [0, scale] and crop back
    flip: bool = True
    swap: bool = True
    num_workers: int = 4
    fail_fast: bool = False  # raise on the first bad sample instead of skipping and counting it
    # Pre-compute the frozen VAE and DINOv2 outputs once (see xmdpt/training/cache.py); needs scale=0.
    cache_features: bool = False
    cache_dir: Optional[str] = None  # noqa: UP045 - default: <root>/.xmdpt-cache/<key of encoders, codec, size>
    # layout "synthetic": the set is generated into `root` when it is not there yet
    synth_identities: int = 1000
    synth_poses: int = 4
    synth_seed: int = 0
    synth_pattern_cell: list[float] = field(default_factory=lambda: [0.025, 0.06])  # stripe/check cells, figure units


@dataclass
class ObjectiveConfig:
    prediction_type: str = "epsilon"  # epsilon (published) | v_prediction | sample
    mask_ratio: float = 0.3  # 0 disables the masked pass (and the side blocks)
    condition_dropout: float = 0.1
    texture_weight: float = 0.0  # beyond the paper: phase-blind detail term on the decoded x0 estimate (XMDPTLoss)
    palette_weight: float = 0.0  # beyond the paper: phase-blind colour-covariance term, the same way (XMDPTLoss)
    texture_lags: list[int] = field(default_factory=lambda: [1])  # the texture term's pixel distances (XMDPTLoss)
    # Training speed-ups beyond the paper, each off by default (docs/training.md, "Training faster").
    # Token routing (TREAD): this fraction of each pass's tokens skips blocks [start, end) of route_blocks; null: from
    # block 2 to depth - decode_layers. Training only; sampling runs every token.
    route_ratio: float = 0.0
    route_blocks: Optional[list[int]] = None  # noqa: UP045
    # REPA: block repa_block's tokens (through a projector) against the reference encoder's (DINOv2) features of the
    # clean target image; needs conditioning.encoder=dinov2 (with data.cache_features, the cached features)
    repa_weight: float = 0.0
    repa_block: int = 3  # 0-based: REPA aligns the 4th of SiT-B's 12 blocks
    # Self-alignment (SRA): block self_align_blocks[0] against the EMA model's deeper block self_align_blocks[1] at a
    # noise level lower by up to self_align_gap of the 1000 steps (SRA: 8 -> 20 of 28 blocks, t_max 0.2)
    self_align_weight: float = 0.0
    self_align_blocks: list[int] = field(default_factory=lambda: [3, 8])
    self_align_gap: int = 200
    align_width: int = 2048  # hidden width of the alignment projectors (REPA: 2048)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 32  # global batch per optimiser step, over all processes and accumulation steps
    grad_accum: int = 1
    grad_clip: Optional[float] = None  # noqa: UP045 - max gradient norm; None = no clipping (published)
    warmup_steps: int = 0  # linear learning-rate warm-up
    decay_steps: int = 0  # linear cool-down to 0 over the last decay_steps before max_steps (warmup-stable-decay)
    ema_decay: float = 0.9999
    ema_start: int = 0  # the EMA copies the weights until this step, then averages
    max_steps: int = 800_000
    mixed_precision: str = "bf16"  # fp32 | bf16 | fp16 (autocast; weights stay fp32)


@dataclass
class RunConfig:
    out_dir: str = "runs/xmdpt"
    seed: int = 0  # 0 .. MAX_SEED (999,999): the trainer folds it into 64-bit torch seeds
    checkpoint_every: int = 10_000
    keep_last: int = 3
    log_every: int = 50
    sample_every: int = 10_000  # a grid of EMA samples on fixed validation pairs; 0 = never
    sample_pairs: int = 8
    sample_steps: int = 50
    on_nan: str = "stop"  # stop: keep the last good checkpoint and stop; skip: drop the step and go on
    # With on_nan=skip, this many non-finite steps in a row stop the run all the same (exit 3): then the weights
    # themselves are no longer finite, and skipping would spin forever without progress or checkpoint.
    max_nan_skips: int = 20
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


CHOICES = {
    "conditioning.encoder": ("dinov2", "learned"),
    "conditioning.codec": ("vae", "pixel"),
    "data.layout": ("deepfashion", "market", "pidm", "folder", "synthetic"),
    "objective.prediction_type": ("epsilon", "v_prediction", "sample"),
    "optim.mixed_precision": ("fp32", "bf16", "fp16"),
    "run.on_nan": ("stop", "skip"),
    "run.device": ("auto", "cpu", "cuda"),
}


# The trainer folds (seed, epoch, index) and (seed, micro-batch) into single torch seeds, which must fit in 64 bits
# (`SeededItems`, `draw_seed`: seed x 1e13 and seed x 8e12); every seed up to this one does, for any epoch.
MAX_SEED = 999_999


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- `section.field=value` overrides, type-checked against the dataclasses."""
    merged = OmegaConf.structured(TrainConfig)
    where = "override: "
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: {'a folder, not a config file' if path.is_dir() else 'no such config file'}")
        merged = _merge(merged, lambda: _load_yaml(path), f"{path}: ")
        where = f"{path} with the overrides: " if overrides else f"{path}: "
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"override {item!r} must look like section.field=value, e.g. optim.lr=3e-4")
    merged = _merge(merged, lambda: OmegaConf.from_dotlist(list(overrides or [])), "override: ")
    try:  # `${...}` interpolations resolve here: a missing key, a loop or a value of the wrong type fails now
        config: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise InputError(f"{where}{str(err).splitlines()[0]}") from None
    validate(config)
    return config


def _load_yaml(path: Path):
    """The YAML file as a mapping of sections (OmegaConf also loads a top-level list, and calls a number OSError)."""
    expected = f"{path}: the top level must map sections to settings (model:, data:, optim:, ...)"
    try:
        loaded = OmegaConf.load(path)
    except PermissionError:
        raise InputError(f"{path}: cannot read the config file: permission denied") from None
    except OSError as err:  # "Invalid loaded object type: int"
        raise InputError(f"{expected}, not a single value ({err})") from None
    if not isinstance(loaded, DictConfig):
        raise InputError(f"{expected}, not a list")
    return loaded


def _merge(base, load, where: str):
    """Merge one layer, naming the layer (the file, or the command line) in a one-line error."""
    try:
        return OmegaConf.merge(base, load())
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"{where}{str(err).splitlines()[0]}") from None


def model_sizes(model: ModelConfig) -> dict[str, int]:
    """hidden_size, depth and num_heads: the preset's, each overridden where given; the ones still unknown are
    missing (a null preset needs all three)."""
    from xmdpt.models.xmdpt import XMDPT_PRESETS

    sizes = dict(XMDPT_PRESETS[model.preset]) if model.preset else {}
    for key in ("hidden_size", "depth", "num_heads"):
        if getattr(model, key) is not None:
            sizes[key] = getattr(model, key)
    return sizes


def _in_range(value: float, name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """Refuse NaN, infinity and values outside [low, high] (or (low, high] when `low_open`)."""
    if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise InputError(f"{name}={value} must be a finite number {bound}")


def validate(config: TrainConfig) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise InputError(f"{key}={value!r}: choose one of {', '.join(allowed)}")
    from xmdpt.models.xmdpt import XMDPT_PRESETS

    if config.model.preset is not None and config.model.preset not in XMDPT_PRESETS:
        raise InputError(f"model.preset={config.model.preset!r}: choose one of {', '.join(XMDPT_PRESETS)} or null")
    if config.data.layout == "synthetic":
        from xmdpt.training.build import synth_config

        synth_config(config)  # raises on bad values
    o = config.optim
    _in_range(o.lr, "optim.lr", 0, low_open=True)
    _in_range(o.weight_decay, "optim.weight_decay", 0)
    _in_range(o.ema_decay, "optim.ema_decay", 0, 1)
    if o.grad_clip is not None:
        _in_range(o.grad_clip, "optim.grad_clip", 0, low_open=True)
    if o.ema_start < 0:
        raise InputError(f"optim.ema_start={o.ema_start} must be >= 0")
    if o.max_steps < 0:
        raise InputError(f"optim.max_steps={o.max_steps} must be >= 0")
    if o.warmup_steps < 0 or not 0 <= o.decay_steps <= o.max_steps:
        raise InputError(
            f"optim.warmup_steps={o.warmup_steps} must be >= 0 and optim.decay_steps={o.decay_steps} in [0, max_steps]"
        )
    if o.batch_size < 1 or o.grad_accum < 1 or o.batch_size % o.grad_accum:
        raise InputError(f"optim.batch_size={o.batch_size} must be a positive multiple of grad_accum={o.grad_accum}")
    if len(config.data.size) != 2 or min(config.data.size) < 8:
        raise InputError(f"data.size={config.data.size} must be [height, width]")
    if config.model.refine_channels < 0:
        raise InputError(f"model.refine_channels={config.model.refine_channels} must be >= 0 (0: off)")
    if config.model.reference_layers < 0:
        raise InputError(f"model.reference_layers={config.model.reference_layers} must be >= 0 (0: off)")
    lags = config.objective.texture_lags
    if not lags or any(not isinstance(lag, int) or isinstance(lag, bool) or lag < 1 for lag in lags):
        raise InputError(f"objective.texture_lags={lags} must be a list of whole numbers of pixels >= 1")
    for name in ("texture_weight", "palette_weight"):
        if not (0 <= getattr(config.objective, name) < math.inf):
            raise InputError(f"objective.{name}={getattr(config.objective, name)} must be a number >= 0")
    if not 0 <= config.objective.mask_ratio < 1:
        raise InputError(f"objective.mask_ratio={config.objective.mask_ratio} must lie in [0, 1)")
    _validate_speedups(config)
    _in_range(config.objective.condition_dropout, "objective.condition_dropout", 0, 1)
    _in_range(config.data.scale, "data.scale", 0)
    if config.data.num_workers < 0:
        raise InputError(f"data.num_workers={config.data.num_workers} must be >= 0 (0: load in the main process)")
    r = config.run
    if not 0 <= r.seed <= MAX_SEED:
        raise InputError(f"run.seed={r.seed} must lie in [0, {MAX_SEED:,}]")
    for name in ("checkpoint_every", "log_every"):  # the trainer takes the step modulo these
        if getattr(r, name) < 1:
            raise InputError(f"run.{name}={getattr(r, name)} must be >= 1")
    if r.max_nan_skips < 1:
        raise InputError(f"run.max_nan_skips={r.max_nan_skips} must be >= 1")
    if r.sample_every < 0:
        raise InputError(f"run.sample_every={r.sample_every} must be >= 0 (0: never)")
    if r.sample_every and r.sample_pairs > 0 and r.sample_steps < 1:
        raise InputError(f"run.sample_steps={r.sample_steps} must be >= 1 (or run.sample_every=0: no samples)")
    _validate_model(config)


def _validate_model(config: TrainConfig) -> None:
    """What the denoiser and the encoders would refuse with a ValueError (a traceback) once the run builds them:
    found here, so that `--dry-run` and the start of a run refuse it in one line."""
    m, c = config.model, config.conditioning
    for key in ("hidden_size", "depth", "num_heads"):
        if getattr(m, key) is not None and getattr(m, key) < 1:
            raise InputError(f"model.{key}={getattr(m, key)} must be >= 1")
    sizes = model_sizes(m)
    missing = [k for k in ("hidden_size", "depth", "num_heads") if k not in sizes]
    if missing:
        raise InputError(f"model.preset is null: give model.{', model.'.join(missing)}")
    hidden, heads = sizes["hidden_size"], sizes["num_heads"]
    if hidden % heads:
        raise InputError(f"model.hidden_size={hidden} is not divisible by model.num_heads={heads}")
    if hidden % 4:
        raise InputError(f"model.hidden_size={hidden} must be a multiple of 4 (the 2-D sin-cos position table)")
    if m.patch_size < 1:
        raise InputError(f"model.patch_size={m.patch_size} must be >= 1")
    if m.decode_layers < 1:
        raise InputError(f"model.decode_layers={m.decode_layers} must be >= 1 (the paper: 2)")
    if c.encoder == "learned" and c.learned_width < 2:
        raise InputError(f"conditioning.learned_width={c.learned_width} must be >= 2")
    if c.codec == "pixel" and c.pixel_factor < 1:
        raise InputError(f"conditioning.pixel_factor={c.pixel_factor} must be >= 1")
    height, width = config.data.size
    step = c.pixel_factor * m.patch_size  # the VAE's factor is known once it loads (`build_denoiser` checks it)
    if c.codec == "pixel" and (height % step or width % step):
        raise InputError(
            f"data.size {height}x{width} is not divisible by conditioning.pixel_factor {c.pixel_factor} "
            f"x model.patch_size {m.patch_size}"
        )


def _validate_speedups(config: TrainConfig) -> None:
    """Token routing and the alignment terms against the model they act on (see `xmdpt.diffusion`)."""
    from xmdpt.diffusion import route_span

    o = config.objective
    sizes = model_sizes(config.model)
    depth = sizes.get("depth")
    if depth is None:  # `_validate_model` names what is missing
        return
    decode_layers = min(config.model.decode_layers, depth)
    if not 0 <= o.route_ratio < 1:
        raise InputError(f"objective.route_ratio={o.route_ratio} must lie in [0, 1) (0: off)")
    if o.route_blocks is not None and o.route_ratio == 0:
        raise InputError("objective.route_blocks is set but objective.route_ratio=0: routing is off")
    fusion = config.model.fusion_blocks
    if fusion is not None:
        try:
            route_span(fusion, depth, decode_layers)
        except ValueError as err:
            message = str(err).replace("route_blocks", "model.fusion_blocks")
            raise InputError(f"{message} (model depth {depth})") from None
        if o.route_blocks is not None and list(o.route_blocks) != list(fusion):
            raise InputError(
                f"objective.route_blocks={list(o.route_blocks)} must be model.fusion_blocks={list(fusion)} (or "
                "null): SPRINT's fusion is around the token route's span"
            )
    if o.route_ratio > 0:
        try:
            route_span(o.route_blocks if o.route_blocks is not None else fusion, depth, decode_layers)
        except ValueError as err:
            where = "objective." if str(err).startswith("route_blocks") else "objective.route_ratio > 0: "
            raise InputError(f"{where}{err} (model depth {depth})") from None
    for name in ("repa_weight", "self_align_weight"):
        _in_range(getattr(o, name), f"objective.{name}", 0)
    if o.repa_weight > 0:
        if config.conditioning.encoder != "dinov2":
            raise InputError(
                "objective.repa_weight > 0 needs a frozen encoder's features: conditioning.encoder=dinov2"
            )
        if not 0 <= o.repa_block < depth:
            raise InputError(f"objective.repa_block={o.repa_block} must lie in [0, depth={depth})")
    if o.self_align_weight > 0:
        blocks = o.self_align_blocks
        if len(blocks) != 2 or not 0 <= blocks[0] < blocks[1] < depth:
            raise InputError(
                f"objective.self_align_blocks={blocks} must be [student, teacher] with 0 <= student < teacher < "
                f"depth={depth}"
            )
        if not 1 <= o.self_align_gap <= 999:
            raise InputError(f"objective.self_align_gap={o.self_align_gap} must lie in [1, 999] (of 1000 steps)")
    if (o.repa_weight > 0 or o.self_align_weight > 0) and o.align_width < 1:
        raise InputError(f"objective.align_width={o.align_width} must be >= 1")
