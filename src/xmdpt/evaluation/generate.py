"""Generation of the test set under the protocol: every test pair, deterministically, as PNG at the evaluation size.

* **Pairs**: each line of the test pair file, with its first source as the reference (the data sets' test mode),
  in file order. A pair listed twice is generated once (logged).
* **File names**: ``<reference stem>___<target stem>.png`` (GFLA/PATN's ``from___to`` pattern without their
  ``_vis`` suffix). Stems are flat DeepFashion names: the PIDM layout's In-shop paths are mapped to their flat name,
  so both layouts of the same test set give the same files. `EvalSet.targets` maps these names to the real target
  images, which is what `PairMetrics.add_folder` takes.
* **Determinism**: a pair's initial noise, and the per-step noise of the stochastic DDPM sampler, come from its own
  CPU generator seeded by a hash of (seed, file name). A pair's image therefore does not depend on the batch size,
  the number of processes, resuming, ``--limit`` or the order of the test list. (Batched matrix products may round
  differently from unbatched ones on some hardware; the uint8 quantisation absorbs that almost always, and the tests
  check byte-identical files on the CPU.)
* **Protocol**: the model's output in [-1, 1] goes through `model_output_to_uint8` (clamp, bicubic antialiased
  resize in float to the evaluation size, x 255, truncate) and is written as a lossless PNG.
* **Distribution**: with Accelerate (``accelerate launch xmdpt evaluate ...``) process k of n takes the pairs whose
  index i has i % n == k; every process writes only its own files, so no communication is needed.
* **Resuming**: a pair whose PNG exists is skipped; a PNG is written to ``<name>.partial-<pid>`` and renamed, so an
  interrupted run never leaves a truncated image. ``generation.json`` beside the images records the settings, and a
  run with other settings refuses to add to the folder rather than mix two models' outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from xmdpt.data.deepfashion import CsvPairs, PairDataset, PidmPairs
from xmdpt.data.images import find_image
from xmdpt.data.names import inshop_to_flat
from xmdpt.errors import InputError
from xmdpt.evaluation.protocol import PROTOCOL_VERSION, format_size, model_output_to_uint8, save_png
from xmdpt.generation import GENERATION_FILE, Job, generate_batches, write_generation_record
from xmdpt.settings import SamplingSettings

logger = logging.getLogger(__name__)

#: Separator of the reference and target stems in a generated file name.
NAME_SEPARATOR = "___"
PARTIAL_SUFFIX = ".partial"


# ------------------------------------------------------------------------------------------------------ the test set


@dataclass(frozen=True)
class EvalPair:
    """One test pair: where its images are and the name of its generated file."""

    index: int  # position in the data set's pair list (what `dataset[index]` loads)
    name: str  # generated file name
    reference: str  # names as the pair file spells them
    target: str
    reference_path: Path
    target_path: Path
    mask_path: Path | None  # the target's figure mask (synthetic set), if the data set has masks


@dataclass
class EvalSet:
    """The test pairs of a data set, and the data set that loads their model inputs."""

    dataset: PairDataset
    pairs: list[EvalPair]
    total: int  # pairs in the test list before `limit`

    def targets(self) -> dict[str, Path]:
        """Generated file name -> real target image (for `PairMetrics.add_folder`)."""
        return {pair.name: pair.target_path for pair in self.pairs}

    def masks(self) -> dict[str, Path] | None:
        """Generated file name -> figure mask of the target, or None when the data set has no masks."""
        if not self.pairs or self.pairs[0].mask_path is None:
            return None
        return {pair.name: pair.mask_path for pair in self.pairs if pair.mask_path is not None}


def flat_stem(name: str) -> str:
    """File-name stem of an image name: In-shop paths become their flat DeepFashion name, other '/' become '-'."""
    if "/" in name or "\\" in name:
        try:
            name = inshop_to_flat(name)
        except InputError:
            name = name.replace("\\", "/").replace("/", "-")
    return Path(name).stem


def pair_file_name(reference: str, target: str) -> str:
    """``<reference stem>___<target stem>.png``."""
    return f"{flat_stem(reference)}{NAME_SEPARATOR}{flat_stem(target)}.png"


def eval_set_from_dataset(dataset: PairDataset, limit: int | None = None) -> EvalSet:
    """The test pairs of a CSV- or PIDM-layout data set (built with `fail_fast=True`, `train=False`)."""
    if not dataset.pairs:
        raise InputError("the test pair list is empty")
    pairs: list[EvalPair] = []
    seen: set[str] = set()
    duplicates = 0
    for index, record in enumerate(dataset.pairs):
        reference = record.sources[0]
        name = pair_file_name(reference, record.target)
        if name in seen:
            duplicates += 1
            continue
        seen.add(name)
        reference_path, target_path, mask_path = _pair_paths(dataset, reference, record.target, record.where)
        pairs.append(EvalPair(index, name, reference, record.target, reference_path, target_path, mask_path))
    if duplicates:
        logger.warning("%d test pairs are listed more than once; each is generated and scored once", duplicates)
    total = len(pairs)
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be at least 1, got {limit}")
        pairs = pairs[:limit]
    return EvalSet(dataset=dataset, pairs=pairs, total=total)


def _pair_paths(dataset: PairDataset, reference: str, target: str, where: str) -> tuple[Path, Path, Path | None]:
    """Paths of the reference image, the target image and the target's mask, checked to exist."""
    if isinstance(dataset, CsvPairs):
        image_root, masks_dir = Path(dataset.images_dir), Path(dataset.root) / "masks"
    elif isinstance(dataset, PidmPairs):
        image_root, masks_dir = Path(dataset.root), Path(dataset.root) / "masks"
    else:
        raise InputError(f"evaluation needs a data set with a test split, not a {type(dataset).__name__}")
    paths = []
    for name in (reference, target):
        path = find_image(image_root / name)
        if path is None:
            raise InputError(f"{where}: image {image_root / name} not found")
        paths.append(path)
    mask_path = None
    if masks_dir.is_dir():
        mask_path = masks_dir / Path(target).with_suffix(".png")
        if not mask_path.is_file():
            raise InputError(f"{where}: figure mask {mask_path} not found")
    return paths[0], paths[1], mask_path


# ------------------------------------------------------------------------------------------------------ generation


# Settings recorded since generation.json first existed, with the value every earlier run had.
ADDED_SETTINGS = {"precision": "fp32", "cache": "none"}


@dataclass(frozen=True)
class GenerationSettings:
    """What determines the generated images; recorded in generation.json and checked on resume."""

    model: str
    sampling: SamplingSettings  # sampler, steps, guidance scale, interval and power, as the pipeline resolved them
    seed: int
    image_size: tuple[int, int]  # evaluation size (height, width)
    model_size: tuple[int, int]  # the model's own resolution
    protocol: str = PROTOCOL_VERSION

    def as_dict(self) -> dict:
        out = {"model": self.model, **self.sampling.as_dict(), "seed": self.seed}
        out |= {"image_size": format_size(self.image_size), "model_size": format_size(self.model_size)}
        return out | {"protocol": self.protocol}


@dataclass(frozen=True)
class GenerationSummary:
    written: int  # by this process
    skipped: int  # already present (this process's share)
    share: int  # pairs assigned to this process


def pair_seed(seed: int, name: str) -> int:
    """A pair's own seed: 63 bits of sha256("<seed>:<file name>")."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generate_test_set(
    pipe,
    eval_set: EvalSet,
    out_dir: Path | str,
    settings: GenerationSettings,
    *,
    batch_size: int = 8,
    accelerator=None,
    num_workers: int = 0,
    progress: bool = True,
) -> GenerationSummary:
    """Generate this process's share of the test pairs into `out_dir` (skipping those already there).

    Args:
        pipe: an `XMDPTPipeline`, already on the accelerator's device, scheduler set to `settings.sampler`.
        eval_set: the pairs; its data set must produce model inputs at `pipe.image_size`.
        out_dir: the folder of generated PNGs.
        settings: sampling settings (steps, guidance, seed, sizes), checked against an existing generation.json.
        accelerator: an `accelerate.Accelerator`; None means one process.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if tuple(eval_set.dataset.image_size) != tuple(pipe.image_size):
        raise InputError(
            f"the data set gives {format_size(eval_set.dataset.image_size)} inputs, the model takes "
            f"{format_size(pipe.image_size)}"
        )
    out_dir = Path(out_dir)
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    _claim_folder(out_dir, settings, write=rank == 0)
    share = [pair for position, pair in enumerate(eval_set.pairs) if position % world == rank]
    todo = [pair for pair in share if not (out_dir / pair.name).is_file()]
    logger.info(
        "process %d/%d: %d of its %d pairs to generate (%d already present)",
        rank,
        world,
        len(todo),
        len(share),
        len(share) - len(todo),
    )
    dataset = eval_set.dataset
    jobs = [
        Job(pair.name, pair_seed(settings.seed, pair.name), partial(_model_inputs, dataset, pair)) for pair in todo
    ]
    results = generate_batches(
        pipe,
        jobs,
        settings.sampling,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress and rank == 0,
        description=f"generate [{rank}]",
    )
    for result in results:
        if result.error is not None:  # the protocol scores every test pair: a bad one stops the run
            raise InputError(f"{result.job.name}: {result.error}")
        image = model_output_to_uint8(result.image[None].float(), settings.image_size)[0]
        write_png_atomic(image, out_dir / result.job.name)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return GenerationSummary(written=len(todo), skipped=len(share) - len(todo), share=len(share))


def write_png_atomic(image: torch.Tensor, path: Path) -> None:
    """Write a uint8 (3, H, W) PNG via a temporary file and a rename: a file that exists is complete."""
    # The process id keeps two processes that were (mis)configured to write the same pair from colliding.
    partial = path.with_name(f"{path.name}{PARTIAL_SUFFIX}-{os.getpid()}")
    save_png(image, partial)
    os.replace(partial, path)


def _claim_folder(out_dir: Path, settings: GenerationSettings, *, write: bool) -> None:
    """Refuse a folder generated with other settings; record ours (on the main process) when it is new."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / GENERATION_FILE
    wanted = settings.as_dict()
    if record.is_file():
        try:
            found = json.loads(record.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"{record} cannot be read ({error}); delete it or use another folder") from error
        found = ADDED_SETTINGS | found  # a folder recorded before a setting existed was made at its default
        differences = [
            f"{key} {found.get(key)!r} there, {value!r} now"
            for key, value in wanted.items()
            if found.get(key) != value
        ]
        if differences:
            raise InputError(
                f"{out_dir} holds images generated with other settings ({'; '.join(differences)}): "
                "use another --out-dir or delete the folder"
            )
        return
    leftovers = list(out_dir.glob("*.png"))
    if leftovers:
        raise InputError(
            f"{out_dir} already holds {len(leftovers)} images but no {GENERATION_FILE}: not a folder this command "
            "wrote; use another --out-dir"
        )
    if write:
        write_generation_record(out_dir, wanted)


def _model_inputs(dataset: PairDataset, pair: EvalPair) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference (1, 3, H, W) in [-1, 1], skeleton (1, 3, H, W) in [0, 1]) of one test pair; `make_item` on the
    record itself, so that a bad pair raises instead of being replaced by the next one."""
    item = dataset.make_item(dataset.pairs[pair.index])
    return item["reference_image"][None], item["target_pose"][None]
