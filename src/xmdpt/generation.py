"""Batch generation: the one loop that turns many (reference, pose) jobs into images, for `xmdpt generate --pairs`,
evaluation, `xmdpt demo` and training's sample grids.

Each job brings its own seed, so its image does not depend on the batch it lands in, the batch size or the order of
the jobs (exactly so for the deterministic samplers; the stochastic DDPM draws its step noise from the job's own
stream too). A job whose inputs cannot be read is reported as that job's error and the others go on. Inputs may be
read by DataLoader workers (`num_workers`), while the main process samples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xmdpt.errors import InputError
from xmdpt.settings import SamplingSettings

GENERATION_FILE = "generation.json"


@dataclass
class Job:
    """One image to generate. `inputs()` gives (reference (1, 3, H, W) in [-1, 1], rendered pose (1, 3, H, W) in
    [0, 1]) and raises InputError for bad input; `noise` (1, C, h, w), when given, replaces the seed's noise."""

    name: str  # what messages call it: "pairs.csv:3", a file name
    seed: int  # the image's own seed
    inputs: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    noise: torch.Tensor | None = None


@dataclass
class Result:
    job: Job
    image: torch.Tensor | None  # (3, H, W) in [-1, 1], None when the job failed
    error: str | None = None


class _JobInputs(torch.utils.data.Dataset):
    def __init__(self, jobs: Sequence[Job]):
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int):
        try:
            return index, self.jobs[index].inputs(), None
        except InputError as err:
            return index, None, str(err)


def generate_batches(
    pipe,
    jobs: Sequence[Job],
    settings: SamplingSettings,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
    description: str = "generate",
) -> Iterator[Result]:
    """Generate `jobs` in batches of `batch_size` readable jobs with `settings` (from `pipe.sampling_settings`);
    yields one `Result` per job, in the jobs' order."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    loader = torch.utils.data.DataLoader(
        _JobInputs(jobs), batch_size=None, num_workers=num_workers, collate_fn=lambda item: item
    )
    pending: list[tuple[Job, tuple | None, str | None]] = []  # in job order, failed ones included
    with tqdm(total=len(jobs), desc=description, unit="image", disable=not progress) as bar:
        for index, inputs, error in loader:
            pending.append((jobs[index], inputs, error))
            if sum(error is None for _, _, error in pending) == batch_size:
                yield from _sample(pipe, pending, settings)
                bar.update(len(pending))
                pending = []
        if pending:
            yield from _sample(pipe, pending, settings)
            bar.update(len(pending))


def _sample(pipe, pending: list, settings: SamplingSettings) -> Iterator[Result]:
    """Sample the readable jobs of `pending` as one batch; yield every job's result in order."""
    good = [(job, inputs) for job, inputs, error in pending if error is None]
    images = iter(())
    if good:
        latents, generators = pipe.seeded_latents([job.seed for job, _ in good])
        noise = [job.noise if job.noise is not None else latents[i : i + 1] for i, (job, _) in enumerate(good)]
        references = torch.cat([reference for _, (reference, _) in good])
        poses = torch.cat([pose for _, (_, pose) in good])
        images = iter(pipe.generate(references, poses, settings, torch.cat(noise), generators))
    for job, _, error in pending:
        yield Result(job, None, error) if error is not None else Result(job, next(images))


def write_generation_record(folder: Path, record: dict) -> None:
    """`generation.json` beside generated images: every setting that decided them (atomically written)."""
    path = Path(folder) / GENERATION_FILE
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)
