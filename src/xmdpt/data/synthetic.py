"""A synthetic pose-transfer data set: clothed articulated figures, written in the DeepFashion CSV layout.

Each identity fixes a body (proportions, build, skin tone), hair (colour, short or long), a shirt (colours, plain /
stripes / checks, short or long sleeves), trousers (colours, pattern, long or shorts), shoes and a plain or gradient
background; each of its images draws that figure in a fresh random pose, seen from the front or the back. The target
is then fully determined by the reference and the target pose, which is what a pose-transfer model must learn.

Output (read by `xmdpt.data.deepfashion.deepfashion_csv`):

    OUT/train/*.png, OUT/test/*.png      the images (flat DeepFashion-style names, category "Synth")
    OUT/masks/*.png                      figure masks: 255 on the figure, 0 on the background
    OUT/fasion-resize-pairs-{split}.csv  from,to: every ordered pair of an identity's images (train), a ring (test)
    OUT/fasion-resize-annotation-{split}.csv  name:ys:xs in the 256x176 annotation frame, like DeepFashion
    OUT/synth.json                       the generator's settings

The last identities are held out for the test split. Everything is a pure function of (seed, identity, pose index),
so a set is reproducible and an identity looks the same whatever the set's size.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from xmdpt.errors import InputError
from xmdpt.pose.keypoints import DEEPFASHION_FRAME, NUM_JOINTS, Pose

log = logging.getLogger(__name__)

SKIN_TONES = ((255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 86), (141, 85, 54), (92, 58, 38))
HAIR_COLOURS = ((20, 16, 14), (60, 40, 25), (110, 70, 40), (190, 150, 90), (150, 60, 30), (200, 200, 200))
SKIN, HAIR, SHIRT, TROUSERS, SHOES, FACE = 1, 2, 3, 4, 5, 6  # labels of the part map
# Body proportions in units of figure height, relative to the neck (y grows downwards).
HEAD_UP, HEAD_R, TORSO, UPPER_ARM, FOREARM, THIGH, SHIN = 0.10, 0.062, 0.30, 0.165, 0.145, 0.225, 0.225


@dataclass(frozen=True)
class SynthConfig:
    """Settings of one synthetic set (saved beside it as synth.json)."""

    num_identities: int = 100
    poses_per_identity: int = 4
    size: tuple[int, int] = (64, 44)  # (height, width)
    seed: int = 0
    test_fraction: float = 0.1  # share of identities held out for the test split
    masks: bool = True
    # Range of the stripe / check cell size, figure units (a figure is 0.78-0.9 of the image height): 1.25-3.5 px
    # cells at 64x48, 5-14 px at 256x176. (0.08, 0.14) draws bold 4-8 px cells at 64x48 (see docs/data.md).
    pattern_cell: tuple[float, float] = (0.025, 0.06)

    def __post_init__(self) -> None:
        cell = ()  # a string is iterable, but not two numbers
        if not isinstance(self.pattern_cell, str | bytes):
            with contextlib.suppress(TypeError, ValueError):
                cell = tuple(float(v) for v in self.pattern_cell)  # a JSON or YAML list too
        if len(cell) != 2:
            raise InputError(f"pattern_cell must be two numbers (low, high), got {self.pattern_cell!r}")
        object.__setattr__(self, "pattern_cell", cell)
        low, high = cell
        if not 0 < low <= high < math.inf:
            raise InputError(f"pattern_cell must be a range 0 < low <= high (figure units), got {self.pattern_cell}")
        if self.seed < 0:
            raise InputError(f"the synthetic set's seed must be >= 0, got {self.seed}")
        if not 0 < self.test_fraction < 1:
            raise InputError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class Identity:
    """Everything about a figure that does not change with its pose."""

    gender: str
    height: float  # figure height as a share of the image height
    shoulder: float  # half shoulder width, figure units
    hip: float
    build: float  # limb width multiplier
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    long_hair: bool
    shirt: tuple[tuple[int, int, int], tuple[int, int, int]]
    shirt_pattern: str  # plain, stripes, checks
    long_sleeves: bool
    trousers: tuple[tuple[int, int, int], tuple[int, int, int]]
    trouser_pattern: str
    shorts: bool
    shoes: tuple[int, int, int]
    period: float  # stripe / check cell size, figure units
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # top and bottom colour (equal = plain)


def make_identity(seed: int, index: int, pattern_cell: tuple[float, float] = SynthConfig.pattern_cell) -> Identity:
    rng = np.random.default_rng([seed, index])

    def colour(low: int = 0, high: int = 256) -> tuple[int, int, int]:
        return tuple(int(v) for v in rng.integers(low, high, 3))

    shirt = (colour(), colour())
    trousers = (colour(0, 200), colour())
    top = colour(150)
    bottom = top if rng.random() < 0.5 else colour(120)
    gender = "WOMEN" if rng.random() < 0.5 else "MEN"
    return Identity(
        gender=gender,
        height=float(rng.uniform(0.78, 0.9)),
        shoulder=float(rng.uniform(0.085, 0.125)),
        hip=float(rng.uniform(0.06, 0.085)),
        build=float(rng.uniform(0.8, 1.25)),
        skin=SKIN_TONES[rng.integers(len(SKIN_TONES))],
        hair=HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))],
        long_hair=bool(rng.random() < (0.7 if gender == "WOMEN" else 0.15)),
        shirt=shirt,
        shirt_pattern=str(rng.choice(["plain", "stripes", "checks"])),
        long_sleeves=bool(rng.random() < 0.5),
        trousers=trousers,
        trouser_pattern=str(rng.choice(["plain", "plain", "stripes", "checks"])),
        shorts=bool(rng.random() < 0.3),
        shoes=colour(0, 120),
        period=float(rng.uniform(*pattern_cell)),
        background=(top, bottom),
    )


def random_pose(identity: Identity, rng: np.random.Generator, size: tuple[int, int]) -> tuple[Pose, bool]:
    """Keypoints (image pixels) of a random pose, and whether the figure faces the camera."""
    height, width = size
    unit = identity.height * height  # pixels per figure unit
    front = bool(rng.random() < 0.7)
    # Facing the camera, the person's right side is on the image's left.
    side = {"right": -1.0 if front else 1.0, "left": 1.0 if front else -1.0}
    lean = math.radians(rng.uniform(-8, 8))
    top = (height - unit * (HEAD_UP + HEAD_R + TORSO + THIGH + SHIN)) / 2
    neck = np.array([width / 2 + rng.uniform(-0.08, 0.08) * width, top + unit * (HEAD_UP + HEAD_R)])

    def at(origin: np.ndarray, length: float, angle_deg: float) -> np.ndarray:
        a = math.radians(angle_deg) + lean  # 0 degrees = straight down
        return origin + unit * length * np.array([math.sin(a), math.cos(a)])

    def across(origin: np.ndarray, half: float, sign: float) -> np.ndarray:
        return origin + unit * half * sign * np.array([math.cos(lean), -math.sin(lean)])

    xy = np.full((NUM_JOINTS, 2), np.nan)
    xy[1] = neck
    mid_hip = at(neck, TORSO, 0)
    for name, (shoulder, elbow, wrist, hip, knee, ankle) in {
        "right": (2, 3, 4, 8, 9, 10),
        "left": (5, 6, 7, 11, 12, 13),
    }.items():
        s = side[name]
        xy[shoulder] = across(neck, identity.shoulder, s)
        arm = s * rng.uniform(-25, 150)  # away from the body is positive
        xy[elbow] = at(xy[shoulder], UPPER_ARM, arm)
        xy[wrist] = at(xy[elbow], FOREARM, arm + s * rng.uniform(-20, 120))
        xy[hip] = across(mid_hip, identity.hip, s)
        leg = s * rng.uniform(-6, 28)
        xy[knee] = at(xy[hip], THIGH, leg)
        xy[ankle] = at(xy[knee], SHIN, leg + s * rng.uniform(-25, 10))
    head = at(neck, HEAD_UP, 180)
    if front:
        xy[0] = head + unit * np.array([0, 0.012])
        xy[14], xy[15] = across(head, 0.025, side["right"]), across(head, 0.025, side["left"])
        xy[14:16, 1] -= unit * 0.012
    xy[16], xy[17] = across(head, HEAD_R * 0.95, side["right"]), across(head, HEAD_R * 0.95, side["left"])
    return Pose(xy, height, width), front


def draw_figure(identity: Identity, pose: Pose, front: bool) -> tuple[np.ndarray, np.ndarray]:
    """The RGB image (H, W, 3) uint8 and the figure mask (H, W) bool of `identity` in `pose`."""
    height, width = pose.height, pose.width
    unit = identity.height * height
    labels = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(labels)
    p = {i: tuple(pose.xy[i]) for i in range(NUM_JOINTS) if pose.present[i]}

    def limb(a: tuple, b: tuple, thickness: float, label: int) -> None:
        w = max(1.0, thickness * unit * identity.build)
        draw.line([a, b], fill=label, width=max(1, round(w)))
        for x, y in (a, b):  # round caps so joints do not show gaps
            draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=label)

    neck = np.array(p[1])
    head = (np.array(p[16]) + np.array(p[17])) / 2  # the ears sit either side of the head's centre
    r = HEAD_R * unit
    if identity.long_hair:  # behind everything: falls to the shoulders
        draw.rounded_rectangle([head[0] - 1.1 * r, head[1] - r, head[0] + 1.1 * r, neck[1] + 0.6 * r], r, fill=HAIR)
    leg_label = SKIN if identity.shorts else TROUSERS
    for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
        limb(p[hip], p[knee], 0.075, TROUSERS)
        limb(p[knee], p[ankle], 0.06, leg_label)
        x, y = p[ankle]
        draw.ellipse([x - 0.035 * unit, y - 0.015 * unit, x + 0.035 * unit, y + 0.03 * unit], fill=SHOES)
    if identity.shorts:  # shorts cover 60 % of the thigh
        for hip, knee in ((8, 9), (11, 12)):
            end = np.array(p[hip]) + 0.6 * (np.array(p[knee]) - np.array(p[hip]))
            limb(p[hip], tuple(end), 0.08, TROUSERS)
    waist = [p[2], p[5], p[11], p[8]]
    draw.polygon(waist, fill=SHIRT)
    belt = [p[8], p[11], tuple(np.array(p[11]) - [0, 0.04 * unit]), tuple(np.array(p[8]) - [0, 0.04 * unit])]
    draw.polygon(belt, fill=TROUSERS)
    limb(tuple(neck), tuple(neck + (head - neck) * 0.5), 0.045, SKIN)
    draw.ellipse([head[0] - 0.85 * r, head[1] - r, head[0] + 0.85 * r, head[1] + r], fill=SKIN)
    if front:  # a hair cap on top, the face below
        draw.chord([head[0] - 0.9 * r, head[1] - 1.1 * r, head[0] + 0.9 * r, head[1] + 0.6 * r], 180, 360, fill=HAIR)
        for eye in (14, 15):
            x, y = p[eye]
            e = max(0.5, 0.008 * unit)
            draw.ellipse([x - e, y - e, x + e, y + e], fill=FACE)
    else:
        draw.ellipse([head[0] - 0.9 * r, head[1] - 1.1 * r, head[0] + 0.9 * r, head[1] + 0.9 * r], fill=HAIR)
    for shoulder, elbow, wrist in ((2, 3, 4), (5, 6, 7)):
        limb(p[shoulder], p[elbow], 0.055, SHIRT)
        limb(p[elbow], p[wrist], 0.045, SHIRT if identity.long_sleeves else SKIN)
        x, y = p[wrist]
        h = 0.028 * unit * identity.build
        draw.ellipse([x - h, y - h, x + h, y + h], fill=SKIN)
    labels = np.asarray(labels)
    return _paint(identity, labels, neck, unit), labels > 0


def _paint(identity: Identity, labels: np.ndarray, neck: np.ndarray, unit: float) -> np.ndarray:
    """Colour the part map: background gradient, flat skin/hair/shoes, patterned shirt and trousers."""
    height, width = labels.shape
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    top, bottom = (np.array(c, dtype=np.float32) for c in identity.background)
    image = np.broadcast_to((1 - t) * top + t * bottom, (height, width, 3)).astype(np.uint8).copy()
    ys, xs = np.mgrid[0:height, 0:width]
    # Patterns are anchored at the neck and scaled with the figure, so they move with the person.
    u, v = (xs - neck[0]) / (unit * identity.period), (ys - neck[1]) / (unit * identity.period)
    for label, colours, pattern in (
        (SHIRT, identity.shirt, identity.shirt_pattern),
        (TROUSERS, identity.trousers, identity.trouser_pattern),
    ):
        where = labels == label
        second = {"plain": np.zeros_like(where), "stripes": np.floor(v) % 2 == 1}.get(pattern)
        if second is None:  # checks
            second = (np.floor(u) + np.floor(v)) % 2 == 1
        image[where & ~second] = colours[0]
        image[where & second] = colours[1]
    for label, colour in ((SKIN, identity.skin), (HAIR, identity.hair), (SHOES, identity.shoes), (FACE, (30, 20, 20))):
        image[labels == label] = colour
    return image


def in_frame(pose: Pose) -> Pose:
    """The annotation of a drawn pose: joints outside the picture are missing, as a detector would report."""
    xy = pose.xy.copy()
    outside = (xy[:, 0] < 0) | (xy[:, 0] > pose.width - 1) | (xy[:, 1] < 0) | (xy[:, 1] > pose.height - 1)
    xy[outside] = np.nan
    return Pose(xy, pose.height, pose.width)


def image_name(identity: Identity, index: int, pose_index: int, front: bool) -> str:
    """A DeepFashion-style flat name, so the In-shop path mapping and the PIDM conversion work on it too."""
    return f"fashion{identity.gender}Synthid{index:08d}{pose_index + 1:02d}_1{'front' if front else 'back'}.png"


def held_out_identities(config: SynthConfig) -> range:
    """The identity indices of the test split: the last `test_fraction` of them (at least 1, never all)."""
    n = config.num_identities
    num_test = min(n - 1, max(1, round(n * config.test_fraction))) if n > 1 else 0
    return range(n - num_test, n)


def render_view(config: SynthConfig, identity: Identity, index: int, k: int):
    """Pose `k` of identity `index`: (file name, image (H, W, 3) uint8, figure mask (H, W) bool, keypoints)."""
    pose, front = random_pose(identity, np.random.default_rng([config.seed, index, k + 1]), config.size)
    image, mask = draw_figure(identity, pose, front)
    return image_name(identity, index, k, front), image, mask, pose


def generate(out_dir: str | Path, config: SynthConfig, progress: bool = True) -> dict[str, int]:
    """Write the synthetic set to `out_dir`; return the number of images and pairs per split."""
    if config.num_identities < 1 or config.poses_per_identity < 2:
        raise InputError("the synthetic set needs at least 1 identity and 2 poses per identity")
    height, width = config.size
    if height < 16 or width < 8:
        raise InputError(f"image size {height}x{width} is too small to draw a figure (at least 16x8)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if any((out / split).is_dir() for split in ("train", "test")):
        # Writing over another set would leave its images beside the new ones, and a folder listing would see both.
        raise InputError(f"{out}: already holds a data set; choose a new or empty folder")
    test = held_out_identities(config)
    splits = {"train": range(test.start), "test": test}
    counts = {}
    for split, identities in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        if config.masks:
            (out / "masks").mkdir(exist_ok=True)
        annotations, pairs = [], []
        for index in tqdm(identities, desc=f"synth {split}", disable=not progress, unit="identity"):
            identity = make_identity(config.seed, index, config.pattern_cell)
            names = []
            for k in range(config.poses_per_identity):
                name, image, mask, pose = render_view(config, identity, index, k)
                Image.fromarray(image).save(out / split / name, compress_level=1)
                if config.masks:
                    Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / name, compress_level=1)
                ys, xs = in_frame(pose).to_gfla(DEEPFASHION_FRAME)
                annotations.append((name, json.dumps(ys), json.dumps(xs)))
                names.append(name)
            n = len(names)
            if split == "train":
                pairs += [(a, b) for a in names for b in names if a != b]
            else:  # a ring: each image once as reference, deterministic and small
                pairs += [(names[i], names[(i + 1) % n]) for i in range(n)]
        _write_csv(out / f"fasion-resize-pairs-{split}.csv", ",", ("from", "to"), pairs)
        _write_csv(
            out / f"fasion-resize-annotation-{split}.csv", ":", ("name", "keypoints_y", "keypoints_x"), annotations
        )
        counts[f"{split}_images"], counts[f"{split}_pairs"] = len(annotations), len(pairs)
    settings = asdict(config) | {"format": "deepfashion-csv", **counts}  # tuples are written as JSON lists
    (out / "synth.json").write_text(json.dumps(settings, indent=1) + "\n")
    log.debug("synthetic set in %s: %s", out, ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
    return counts


def _write_csv(path: Path, delimiter: str, header: tuple[str, ...], rows: list) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\n", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(header)
        writer.writerows(rows)
