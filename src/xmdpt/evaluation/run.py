"""`xmdpt evaluate` as a library call: open the test set, generate it, score it, write the report.

Per layout (the test split, its real training set for FID, the default evaluation size, which scores):

* ``deepfashion`` (GFLA/PATN CSV layout, `xmdpt data prepare-deepfashion`): test pairs from
  ``fasion-resize-pairs-test.csv``; images from ``test/`` and ``train/`` at 256x176, or from ``test_512x352/`` and
  ``train_512x352/`` when evaluating at 512x352 and those folders exist. FID (torchvision Inception-v3 against every
  image of the training folder, or of ``--real-list``), SSIM, SSIM_256, LPIPS, PSNR, L1; the TF-Inception FID too
  when its weights are given.
* ``pidm`` (PIDM/NTED layout): test pairs from ``test_pairs.txt``; FID's real set is every image named in
  ``train_pairs.txt``. Same scores.
* ``market``: Market-1501 in the PATN layout, 128x64. Same scores.
* ``synthetic`` (`xmdpt data synth`, the DeepFashion CSV layout plus ``masks/``): the held-out identities, at the
  set's own size, fully offline: SSIM_256, PSNR, L1, colour fidelity on the figure (and SSIM when the images are at
  least 51 pixels a side). FID and LPIPS only when asked for (``fid=True``, ``lpips=True``).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from xmdpt.data.deepfashion import PidmPairs, deepfashion_csv, market1501
from xmdpt.data.images import IMAGE_SUFFIXES, find_image
from xmdpt.default_model import resolve_device
from xmdpt.errors import InputError
from xmdpt.evaluation.fid import (
    FeatureExtractor,
    FeatureStats,
    InceptionV3Features,
    StatsKey,
    TFInceptionFeatures,
    default_stats_path,
    fingerprint_names,
    real_set_stats,
)
from xmdpt.evaluation.generate import (
    EvalSet,
    GenerationSettings,
    GenerationSummary,
    eval_set_from_dataset,
    generate_test_set,
)
from xmdpt.evaluation.metrics import EvaluationResult, LPIPSMetric, PairMetrics
from xmdpt.evaluation.protocol import EVAL_SIZES, PROTOCOL_VERSION, format_size, read_rgb
from xmdpt.pose.keypoints import DEEPFASHION_FRAME, MARKET_FRAME

logger = logging.getLogger(__name__)

LAYOUTS = ("deepfashion", "synthetic", "pidm", "market")


@dataclass(frozen=True)
class EvalConfig:
    """Everything `xmdpt evaluate` is told. None means the layout's or the model's default."""

    data_root: Path
    layout: str
    out_dir: Path
    image_size: tuple[int, int] | None = None
    model: str | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_interval: tuple[float, float] | None = None  # (0, 1000) guides every step
    sampler: str | None = None
    seed: int = 0
    batch_size: int = 8
    precision: str | None = None  # fp32, bf16, fp16 or auto; None: the model's
    cache: str | None = None  # none, fora:N or teacache:D; None: the model's
    limit: int | None = None
    workers: int = 0
    generated: Path | None = None  # score this folder instead of generating
    fid: bool | None = None
    lpips: bool | None = None
    inception_weights: Path | None = None
    tf_inception_weights: Path | None = None
    alexnet_weights: Path | None = None
    stats_cache: Path | None = None
    real_stats: Path | None = None  # the torchvision-FID statistics file to use (checked against the set)
    real_list: Path | None = None
    progress: bool = True


@dataclass
class EvalOutcome:
    result: EvaluationResult
    run_info: dict
    files: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ data sets


def check_data_root(root: Path, layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        hint = " (make it with `xmdpt data synth`)" if layout == "synthetic" else ""
        raise InputError(f"data root {root} does not exist{hint}")


def default_eval_size(root: Path, layout: str) -> tuple[int, int]:
    """256x176 for DeepFashion, 128x64 for Market, the set's own size for the synthetic set."""
    if layout == "market":
        return MARKET_FRAME
    if layout != "synthetic":
        return DEEPFASHION_FRAME
    settings = root / "synth.json"
    if settings.is_file():
        try:
            height, width = json.loads(settings.read_text())["size"]
            return int(height), int(width)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"{settings} cannot be read ({error})") from error
    first = next(iter(sorted(_images_in(root / "test"))), None)
    if first is None:
        raise InputError(f"{root / 'test'} holds no images: not a synthetic set")
    width, height = read_rgb(first).size
    return height, width


def split_folder(root: Path, split: str, size: tuple[int, int]) -> Path:
    """The image folder of a CSV-layout split at `size`: `{split}_{H}x{W}` if prepared, else `{split}`."""
    sized = root / f"{split}_{format_size(size)}"
    return sized if sized.is_dir() else root / split


def open_dataset(root: Path, layout: str, split: str, model_size: tuple[int, int], eval_size: tuple[int, int]):
    """The split as a data set giving model inputs at `model_size`; bad samples raise instead of being skipped."""
    common = dict(image_size=model_size, train=False, fail_fast=True)
    if layout == "pidm":
        return PidmPairs(root=root, split=split, **common)
    if layout == "market":
        return market1501(root, split, **common)
    return deepfashion_csv(root, split, images_dir=split_folder(root, split, eval_size), **common)


def open_eval_set(
    root: Path, layout: str, model_size: tuple[int, int], eval_size: tuple[int, int], limit: int | None
) -> EvalSet:
    return eval_set_from_dataset(open_dataset(root, layout, "test", model_size, eval_size), limit=limit)


def real_set_paths(
    root: Path, layout: str, eval_size: tuple[int, int], real_list: Path | None
) -> tuple[list[Path], Path]:
    """The FID real set (the whole training split) and the root its names are taken relative to."""
    if layout == "pidm":
        base = root
        names = _listed_names(real_list) if real_list else _pidm_train_names(root)
    else:
        base = split_folder(root, "train", eval_size)
        if not base.is_dir():
            raise InputError(f"training image folder {base} does not exist (FID's real set is the training split)")
        if real_list is None:
            return sorted(_images_in(base)), base
        names = _listed_names(real_list)
    paths = []
    for name in names:
        path = find_image(base / name)
        if path is None:
            raise InputError(f"real-set image {base / name} not found")
        paths.append(path)
    if not paths:
        raise InputError("FID's real set is empty")
    return paths, base


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _listed_names(path: Path) -> list[str]:
    """Names of a `train.lst`-style file: one image name per line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise InputError(f"real-set list {path} cannot be read ({error})") from error
    return [line.strip() for line in lines if line.strip()]


def _pidm_train_names(root: Path) -> list[str]:
    dataset = PidmPairs(root=root, split="train", fail_fast=True)
    return sorted({name for record in dataset.pairs for name in (*record.sources, record.target)})


# ------------------------------------------------------------------------------------------------------- scoring


def build_fid_extractors(config: EvalConfig) -> dict[str, FeatureExtractor]:
    """The protocol's Inception-v3, plus the TF-Inception one when its weights are given."""
    extractors: dict[str, FeatureExtractor] = {"fid": InceptionV3Features(weights=config.inception_weights)}
    if config.tf_inception_weights is not None:
        extractors["fid_tf"] = TFInceptionFeatures(weights=config.tf_inception_weights)
    return extractors


@dataclass
class Scorer:
    """The scoring side of a run, set up before generation so that a wrong weights file, a missing training
    folder or a foreign statistics file fails in seconds, not after hours of sampling."""

    config: EvalConfig
    eval_size: tuple[int, int]
    device: torch.device
    lpips: LPIPSMetric | None
    fid_extractors: dict[str, FeatureExtractor]
    real_paths: list[Path] = field(default_factory=list)
    real_base: Path | None = None
    real_stats: dict[str, FeatureStats] = field(default_factory=dict)

    @classmethod
    def prepare(
        cls,
        config: EvalConfig,
        eval_size: tuple[int, int],
        device: torch.device,
        lpips: LPIPSMetric | None,
        fid_extractors: Mapping[str, FeatureExtractor] | None,
    ) -> Scorer:
        use_fid = config.fid if config.fid is not None else config.layout != "synthetic"
        use_lpips = config.lpips if config.lpips is not None else config.layout != "synthetic"
        if use_fid and fid_extractors is None:
            fid_extractors = build_fid_extractors(config)
        if use_lpips and lpips is None:
            lpips = LPIPSMetric(alexnet_weights=config.alexnet_weights)
        scorer = cls(
            config=config,
            eval_size=tuple(eval_size),
            device=device,
            lpips=lpips if use_lpips else None,
            fid_extractors=dict(fid_extractors or {}) if use_fid else {},
        )
        if scorer.fid_extractors:
            root = Path(config.data_root)
            scorer.real_paths, scorer.real_base = real_set_paths(root, config.layout, eval_size, config.real_list)
            scorer.load_real_statistics(compute=False)
        return scorer

    def stats_path(self, label: str, extractor: FeatureExtractor) -> Path | None:
        """The statistics file of a label: --real-stats for the protocol's FID, else the cache's file for the key
        (set, file list, size, network, protocol)."""
        if label == "fid" and self.config.real_stats is not None:
            return Path(self.config.real_stats)
        if self.config.stats_cache is None:
            return None
        names = [path.relative_to(self.real_base).as_posix() for path in self.real_paths]
        key = StatsKey(self.set_name, fingerprint_names(names), self.eval_size, extractor.identity)
        return default_stats_path(self.config.stats_cache, key)

    @property
    def set_name(self) -> str:
        return f"{self.config.layout}-train"

    @property
    def score_batch_size(self) -> int:
        """Images per batch of the feature networks: scoring holds no denoiser, so at least 16."""
        return max(self.config.batch_size, 16)

    def load_real_statistics(self, compute: bool) -> None:
        """Real-set statistics per FID label: read (and checked) where a file exists, else computed if `compute`."""
        for label, extractor in self.fid_extractors.items():
            if label in self.real_stats:
                continue
            path = self.stats_path(label, extractor)
            if not compute and (path is None or not path.exists()):
                continue
            self.real_stats[label] = real_set_stats(
                self.real_paths,
                set_name=self.set_name,
                image_size=self.eval_size,
                extractor=extractor.to(self.device),
                cache_path=path,
                root=self.real_base,
                batch_size=self.score_batch_size,
                num_workers=self.config.workers,
                progress=self.config.progress,
            )

    def score(self, eval_set: EvalSet, generated_dir: Path) -> EvaluationResult:
        """Score the generated folder against the test targets (colour fidelity on the synthetic set)."""
        self.load_real_statistics(compute=True)
        scorer = PairMetrics(self.eval_size, lpips=self.lpips, fid_extractors=self.fid_extractors, device=self.device)
        masks = None
        if self.config.layout == "synthetic":
            masks = eval_set.masks()
            if masks is None:
                raise InputError("colour fidelity needs the figure masks, and this data set has no masks/ folder")
        targets, batch, progress = eval_set.targets(), self.score_batch_size, self.config.progress
        scorer.add_folder(generated_dir, targets, masks=masks, batch_size=batch, progress=progress)
        return scorer.result(self.real_stats if self.fid_extractors else None)


# ---------------------------------------------------------------------------------------------------- the command


@dataclass
class Generation:
    """What the generation step did (None fields when an existing folder was scored)."""

    folder: Path
    settings: GenerationSettings | None = None
    summary: GenerationSummary | None = None
    num_processes: int = 1
    main_process: bool = True


def evaluate(
    config: EvalConfig,
    *,
    pipe=None,
    lpips: LPIPSMetric | None = None,
    fid_extractors: Mapping[str, FeatureExtractor] | None = None,
    accelerator=None,
) -> EvalOutcome | None:
    """Generate (unless `config.generated`), score and report. Returns None on the non-main processes.

    `pipe` (from `xmdpt.default_model.load_pipeline`), `lpips` and `fid_extractors` may be given
    directly (tests pass tiny networks); otherwise they are built from `config`.
    """
    from xmdpt.evaluation.report import write_report

    started = time.monotonic()
    root = Path(config.data_root)
    check_data_root(root, config.layout)
    if config.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.workers < 0:
        raise InputError(f"--workers must be >= 0, got {config.workers}")
    eval_size = config.image_size or default_eval_size(root, config.layout)
    if config.layout in ("deepfashion", "pidm") and format_size(eval_size) not in EVAL_SIZES:
        logger.warning("evaluation size %s is not one of the protocol's (%s)", format_size(eval_size), EVAL_SIZES)
    # The test list is read (and its files checked) before a model is loaded: bad data fails in a second.
    eval_set = open_eval_set(root, config.layout, eval_size, eval_size, config.limit)
    masks = eval_set.masks() if config.layout == "synthetic" else None
    if masks:  # colour fidelity compares at the masks' size: refuse another size now, not after generating it all
        from PIL import Image

        first = next(iter(masks.values()))
        with Image.open(first) as mask:
            if (mask.height, mask.width) != tuple(eval_size):
                raise InputError(
                    f"evaluation size {format_size(eval_size)}: this data set's figure masks are "
                    f"{mask.height}x{mask.width} ({first}); evaluate at that size"
                )
    if config.generated is None:
        from accelerate import Accelerator

        accelerator = accelerator or Accelerator()
    device = accelerator.device if accelerator is not None else resolve_device(None)
    main_process = accelerator is None or accelerator.is_main_process
    if config.generated is None:
        pipe, settings = _load_model(config, eval_size, pipe, accelerator)
    scorer = Scorer.prepare(config, eval_size, device, lpips, fid_extractors) if main_process else None
    if config.generated is None:
        generation = _generate(config, eval_set, pipe, settings, accelerator)
    else:
        generation = Generation(folder=Path(config.generated))
    if not generation.main_process:
        return None
    generated_seconds = time.monotonic() - started
    result = scorer.score(eval_set, generation.folder)
    run_info = _run_info(config, eval_set, scorer, generation, result, device)
    run_info["seconds"] = {"generation": round(generated_seconds, 1), "total": round(time.monotonic() - started, 1)}
    files = write_report(Path(config.out_dir), result, run_info, eval_set, progress=config.progress)
    return EvalOutcome(result=result, run_info=run_info, files=files)


def _load_model(config: EvalConfig, eval_size, pipe, accelerator) -> tuple:
    """The pipeline (loaded unless given) on the accelerator's device, and the generation settings."""
    if pipe is None:
        from xmdpt.default_model import load_pipeline

        pipe = load_pipeline(config.model, accelerator.device)
        model_label = _model_label(config.model)
    else:
        model_label = config.model or f"in-memory {type(pipe).__name__}"
    return pipe, _generation_settings(config, pipe, eval_size, model_label)


def _generate(config: EvalConfig, eval_set: EvalSet, pipe, settings: GenerationSettings, accelerator) -> Generation:
    """Generate this process's share of the test set into OUT/generated."""
    if tuple(pipe.image_size) != settings.image_size:  # the model takes its inputs at its own size
        # Only the data set's input size changes: the same test list, so the pairs (and their indices) stand.
        root, model_size, size = Path(config.data_root), tuple(pipe.image_size), settings.image_size
        eval_set = replace(eval_set, dataset=open_dataset(root, config.layout, "test", model_size, size))
    folder = Path(config.out_dir) / "generated"
    summary = generate_test_set(
        pipe,
        eval_set,
        folder,
        settings,
        batch_size=config.batch_size,
        accelerator=accelerator,
        num_workers=config.workers,
        progress=config.progress,
    )
    return Generation(folder, settings, summary, accelerator.num_processes, accelerator.is_main_process)


def _run_info(
    config: EvalConfig,
    eval_set: EvalSet,
    scorer: Scorer,
    generation: Generation,
    result: EvaluationResult,
    device: torch.device,
) -> dict:
    """The "run" block of metrics.json: how the numbers were made."""
    return {
        "layout": config.layout,
        "data_root": str(config.data_root),
        "generated_dir": str(generation.folder),
        "generated_here": config.generated is None,
        "generation": None if generation.settings is None else generation.settings.as_dict(),
        "generation_main_process": None if generation.summary is None else asdict(generation.summary),
        "num_processes": generation.num_processes,
        "image_size": format_size(scorer.eval_size),
        "test_pairs": eval_set.total,
        "scored_pairs": result.count,
        "limit": config.limit,
        "real_set_images": len(scorer.real_paths),
        "fid_networks": {label: extractor.identity for label, extractor in scorer.fid_extractors.items()},
        "lpips": None if scorer.lpips is None else "alexnet (lpips v0.1)",
        "protocol": PROTOCOL_VERSION,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _model_label(model: str | None) -> str:
    """What generation.json records as the model: an absolute folder, a Hub id, or the default's folder."""
    if model is None:
        from xmdpt.default_model import default_model_path

        return str(default_model_path().resolve())
    return str(Path(model).resolve()) if Path(model).exists() else model


def _generation_settings(config: EvalConfig, pipe, eval_size: tuple[int, int], model: str) -> GenerationSettings:
    """The model's own sampling settings with the command's overrides."""
    if config.sampler is not None:
        pipe.set_sampler(config.sampler)
    sampling = pipe.sampling_settings(
        num_inference_steps=config.steps,
        guidance_scale=config.guidance,
        guidance_interval=config.guidance_interval,
        precision=config.precision,
        cache=config.cache,
    )
    return GenerationSettings(
        model=model,
        sampling=sampling,
        seed=config.seed,
        image_size=tuple(eval_size),
        model_size=tuple(pipe.image_size),
    )
