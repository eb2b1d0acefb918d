"""The demo: a model trained on the synthetic set, on identities it never saw, against the ground truth.

The synthetic set is a pure function of (seed, identity, pose index), so the held-out identities of the model's
training set (its `xmdpt_default.json`) are redrawn here, only the images the chosen pairs need, exactly as the data
set serves them (keypoints through the 256x176 annotation frame, rounded, as `CsvPairs` reads them). Scores are SSIM
(Wang et al.: Gaussian window sigma 1.5, on uint8 RGB) and PSNR against the ground truth, for the model and for the
trivial baseline that copies the reference image to the output, and the pose match: whether the output is nearer
(SSIM) to the person in the target pose than to the same person in any of 15 other poses (their data-set poses and
fresh ones from the same generator; chance is 1/16). Copying the reference never matches (it is nearest to the
reference's own pose), so the pose match measures following the pose apart from getting colours and background right.
The pattern match asks the same of the clothes: is the output's texture nearest to the target's among the same
person in the same pose, in the same colours, in each combination of shirt and trouser patterns (plain, stripes,
checks: 9 renderings, chance 1/9)? Texture is compared phase-free, as maps of local horizontal and vertical contrast
(`texture`), because at 64x48 the pattern cells are 1-3 pixels wide and their exact phase is a guess even from a
perfect view of the reference: stripes have vertical contrast only, checks both, plain garments none, so a figure in
the right colours but with the pattern washed out to a tint, or with stripes for checks, does not match.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from xmdpt.data.synthetic import (
    Identity,
    SynthConfig,
    held_out_identities,
    in_frame,
    make_identity,
    render_view,
)
from xmdpt.errors import InputError
from xmdpt.inputs import image_tensor
from xmdpt.pose.keypoints import DEEPFASHION_FRAME, Pose
from xmdpt.pose.render import draw_skeleton
from xmdpt.settings import SamplingSettings

log = logging.getLogger(__name__)
COLUMNS = ("reference", "target pose", "generated", "ground truth")
CELL_HEIGHT = 192  # small images are enlarged (nearest neighbour, pixels stay visible) to about this height
POSE_CANDIDATES = 16  # poses of the same person among which the output must be nearest to the target's
PATTERNS = ("plain", "stripes", "checks")  # the synthetic set's garment patterns


@dataclass(frozen=True)
class HeldOutPair:
    """One test pair: the reference and target images (PIL, model frame) and the target keypoints."""

    reference_name: str
    target_name: str
    reference: Image.Image
    target: Image.Image
    target_pose: Pose
    views: tuple[Image.Image, ...]  # the same person in each of their poses (the reference and target included)
    target_view: int  # the target's index in `views`
    patterns: tuple[Image.Image, ...]  # the target view in each combination of shirt and trouser patterns
    target_pattern: int  # the target's index in `patterns`


@dataclass(frozen=True)
class Scores:
    ssim: np.ndarray  # per pair
    psnr: np.ndarray
    pose_match: np.ndarray  # per pair: nearest (SSIM) to the target among the person's poses
    pattern_match: np.ndarray  # per pair: nearest (SSIM) to the target among its pattern combinations


@dataclass(frozen=True)
class DemoResult:
    pairs: list[HeldOutPair]
    generated: list[Image.Image]
    model: Scores
    copy_reference: Scores
    grid: Image.Image
    seconds: float


def choose_pairs(synth: SynthConfig, num_pairs: int, seed: int) -> list[tuple[int, int]]:
    """(identity, reference pose index) of `num_pairs` test-split ring pairs (k -> k + 1), as many distinct
    identities as possible, drawn with `seed`."""
    identities = held_out_identities(synth)
    if not identities:
        raise InputError("the model's synthetic set has no held-out identities (num_identities must be at least 2)")
    candidates = [(i, k) for i in identities for k in range(synth.poses_per_identity)]
    if num_pairs > len(candidates):
        log.warning("only %d held-out pairs exist; using all of them", len(candidates))
    order = np.random.default_rng(seed).permutation(len(candidates))
    seen: Counter = Counter()
    ranked = []
    for rank, i in enumerate(order):
        identity, k = candidates[i]
        ranked.append((seen[identity], rank, identity, k))  # first one pair per identity, then seconds, ...
        seen[identity] += 1
    return [(identity, k) for _, _, identity, k in sorted(ranked)[:num_pairs]]


def _view(
    synth: SynthConfig, identity: Identity, index: int, k: int, size: tuple[int, int]
) -> tuple[str, Image.Image, Pose]:
    """One synthetic image at the model's `size` with its keypoints, as the data set reads them back."""
    name, pixels, _, pose = render_view(synth, identity, index, k)
    image = Image.fromarray(pixels)
    # The set stores keypoints as integers in the 256x176 annotation frame; the model was trained on those.
    stored = Pose.from_gfla(*in_frame(pose).to_gfla(DEEPFASHION_FRAME), DEEPFASHION_FRAME)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    return name, image, stored.resized(*size)


def held_out_pairs(synth: SynthConfig, num_pairs: int, seed: int, size: tuple[int, int]) -> list[HeldOutPair]:
    pairs = []
    for index, k in choose_pairs(synth, num_pairs, seed):
        identity = make_identity(synth.seed, index, synth.pattern_cell)
        views = [_view(synth, identity, index, j, size) for j in range(max(synth.poses_per_identity, POSE_CANDIDATES))]
        t = (k + 1) % synth.poses_per_identity
        (ref_name, reference, _), (tgt_name, target, target_pose) = views[k], views[t]
        images = tuple(v[1] for v in views)
        combinations = [(shirt, trousers) for shirt in PATTERNS for trousers in PATTERNS]
        patterns = tuple(
            _view(synth, replace(identity, shirt_pattern=shirt, trouser_pattern=trousers), index, t, size)[1]
            for shirt, trousers in combinations
        )
        truth = combinations.index((identity.shirt_pattern, identity.trouser_pattern))
        pairs.append(HeldOutPair(ref_name, tgt_name, reference, target, target_pose, images, t, patterns, truth))
    return pairs


def _ssim(a: Image.Image, b: Image.Image) -> float:
    from skimage.metrics import structural_similarity

    a, b = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    return structural_similarity(
        a, b, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )


def texture(image: Image.Image, sigma: float = 1.5) -> np.ndarray:
    """(2, H, W): the absolute colour differences to the right and below neighbours, summed over RGB and smoothed
    (Gaussian, `sigma` pixels): where an image has horizontal and vertical contrast, whatever the pattern's phase."""
    from scipy.ndimage import gaussian_filter

    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    dx = np.abs(np.diff(x, axis=1, append=x[:, -1:])).sum(axis=2)
    dy = np.abs(np.diff(x, axis=0, append=x[-1:])).sum(axis=2)
    return np.stack([gaussian_filter(dx, sigma), gaussian_filter(dy, sigma)])


def palette_error(outputs: list[Image.Image], targets: list[Image.Image]) -> float:
    """The mean squared difference between the `local_covariance` maps (local RGB covariance over 5x5 pixels, blind
    to phase) of each output and its target, averaged over pairs: what the pattern match, blind to colour, does not
    see (a check drawn in the wrong colours). Lower is better; 0 for the target itself."""
    from xmdpt.diffusion import local_covariance

    def covariance(image: Image.Image) -> torch.Tensor:
        return local_covariance(image_tensor(image)[None])[0]  # (6, H, W)

    errors = [(covariance(o) - covariance(t)).pow(2).mean().item() for o, t in zip(outputs, targets, strict=True)]
    return float(np.mean(errors))


def score(outputs: list[Image.Image], pairs: list[HeldOutPair]) -> Scores:
    """Per pair: SSIM and PSNR of the uint8 RGB output against the target, the pose match (is the output nearer, by
    SSIM, to the person in the target pose than in each of their other poses?) and the pattern match (is its texture
    nearest to the target's among the target view in every combination of garment patterns?)."""
    try:
        from skimage.metrics import peak_signal_noise_ratio
    except ImportError as err:
        raise InputError(f"the demo's scores need scikit-image: pip install scikit-image ({err})") from None
    ssim, psnr, pose_match, pattern_match = [], [], [], []
    for output, pair in zip(outputs, pairs, strict=True):
        to_views = [_ssim(output, view) for view in pair.views]  # the target's SSIM among them
        ssim.append(to_views[pair.target_view])
        pose_match.append(int(np.argmax(to_views)) == pair.target_view)
        seen = texture(output)
        to_patterns = [np.mean((seen - texture(view)) ** 2) for view in pair.patterns]
        pattern_match.append(int(np.argmin(to_patterns)) == pair.target_pattern)
        truth = np.asarray(pair.target.convert("RGB"))
        psnr.append(peak_signal_noise_ratio(truth, np.asarray(output.convert("RGB")), data_range=255))
    return Scores(np.array(ssim), np.array(psnr), np.array(pose_match), np.array(pattern_match))


def make_grid(pairs: list[HeldOutPair], generated: list[Image.Image]) -> Image.Image:
    """Rows of (reference | target pose | generated | ground truth), enlarged, with a header naming the columns."""
    width, height = pairs[0].reference.size
    scale = max(1, CELL_HEIGHT // height)
    cell_w, cell_h, gap = width * scale, height * scale, 4
    font = ImageFont.load_default(size=max(10, min(16, cell_w // 8)))
    header = 24
    grid = Image.new("RGB", (len(COLUMNS) * (cell_w + gap) + gap, header + len(pairs) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(COLUMNS):
        draw.text((gap + c * (cell_w + gap) + cell_w / 2, header / 2), title, fill="black", font=font, anchor="mm")
    for r, (pair, output) in enumerate(zip(pairs, generated, strict=True)):
        # Drawn at the cell's size: the model's small skeleton, enlarged, is blobs; this one reads as a pose.
        skeleton = Image.fromarray(draw_skeleton(pair.target_pose, cell_h, cell_w))
        for c, image in enumerate((pair.reference, skeleton, output, pair.target)):
            cell = image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(cell, (gap + c * (cell_w + gap), header + r * (cell_h + gap)))
    return grid


def run_demo(
    pipe, synth: SynthConfig, settings: SamplingSettings, num_pairs: int = 8, seed: int = 0, progress: bool = True
) -> DemoResult:
    """Generate `num_pairs` held-out pairs in one batch with `settings` (from `pipe.sampling_settings`), score them
    and the copy-the-reference baseline, and draw the grid. The batch's noise is drawn from `seed`."""
    from xmdpt.generation import Job, generate_batches
    from xmdpt.inputs import prepare_inputs
    from xmdpt.pipeline import to_pil

    if num_pairs < 1:
        raise InputError(f"--num-pairs must be at least 1, got {num_pairs}")
    start = time.perf_counter()
    pairs = held_out_pairs(synth, num_pairs, seed, pipe.image_size)
    shape = (len(pairs), pipe.denoiser.config.in_channels, *pipe.denoiser.config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    jobs = [
        Job(
            p.reference_name,
            seed,
            lambda p=p: prepare_inputs(p.reference, p.target_pose, pipe.image_size),
            noise[i : i + 1],
        )
        for i, p in enumerate(pairs)
    ]
    results = generate_batches(pipe, jobs, settings, batch_size=len(jobs), progress=progress, description="demo")
    generated = to_pil(torch.stack([r.image for r in results]))
    model = score(generated, pairs)
    baseline = score([p.reference for p in pairs], pairs)
    grid = make_grid(pairs, generated)
    return DemoResult(pairs, generated, model, baseline, grid, time.perf_counter() - start)
