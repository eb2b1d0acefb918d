"""Pair data sets: DeepFashion (GFLA/PATN CSV and PIDM/NTED layouts), Market-1501, and a folder of one's own photos.

Every data set yields, per pair, a dict of tensors (the contract with the model side):

- `reference_image`, `target_image`: float (3, H, W) in [-1, 1];
- `reference_pose`, `target_pose`: the rendered RGB skeleton, float (3, H, W) in [0, 1] (reference section 5);
- `reference_keypoints`, `target_keypoints`: float (18, 2) (x, y) pixels in the output frame, NaN = missing;
- `reference_name`, `target_name`: the image names as the pair files spell them;
- `target_mask` (only where a `masks/` folder exists, e.g. the synthetic set): float (1, H, W), 1 on the figure.

Test pairs are deterministic (a line's first source). Training applies the published augmentation, each part
switchable: random scale 0-5 % and crop back, a horizontal flip with p 0.5 (keypoints mirrored with left and right
swapped), and a reference/target swap with p 0.5. Randomness comes from torch's global generator, which DataLoader
seeds per worker, so `torch.manual_seed` makes a run repeatable. `image_size` is the output (height, width): the
native aspect (256x176, 512x352) or a square (256x256) that stretches the person as the public code does.

A bad sample (corrupt image, missing file, malformed keypoints) is skipped, counted in `skipped` and logged with its
file and reason, and the next pair is served; `fail_fast=True` raises the `InputError` instead.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from xmdpt.data.images import IMAGE_SUFFIXES, MAX_PIXELS, find_image, load_image
from xmdpt.errors import InputError
from xmdpt.pose.keypoints import DEEPFASHION_FRAME, MARKET_FRAME, Pose
from xmdpt.pose.render import skeleton_tensor

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_BAD = 50  # a data set this broken is a wrong path, not a few bad files: stop and say so


@dataclass(frozen=True)
class Augment:
    """Training augmentation of the public code; every part can be switched off."""

    scale: float = 0.05  # random up-scale in [0, scale], then a random crop back to the output size
    flip: bool = True  # horizontal flip of both views with p 0.5
    swap: bool = True  # exchange reference and target with p 0.5

    @classmethod
    def off(cls) -> Augment:
        return cls(scale=0.0, flip=False, swap=False)


@dataclass(frozen=True)
class PairRecord:
    """One line of a pair file: the target and its candidate references (sources)."""

    sources: tuple[str, ...]
    target: str
    where: str  # "file:line", for messages


@dataclass
class View:
    """One image as stored: RGB at native size, its pose in the annotation frame, an optional figure mask."""

    image: Image.Image
    pose: Pose
    mask: Image.Image | None = None


@dataclass
class PairDataset(Dataset):
    """Base class: subclasses fill `pairs` and implement `load_view(name)`."""

    image_size: tuple[int, int] = DEEPFASHION_FRAME
    train: bool = False
    augment: Augment | None = None  # None: the published augmentation when training, none otherwise
    fail_fast: bool = False
    max_pixels: int = MAX_PIXELS
    pairs: list[PairRecord] = field(default_factory=list, init=False, repr=False)
    skipped: int = field(default=0, init=False)  # bad samples met so far by this copy (each worker has one)

    def __post_init__(self) -> None:
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        if self.augment is None:
            self.augment = Augment() if self.train else Augment.off()

    # ---- subclass hooks ---------------------------------------------------------------------------------------
    def load_view(self, name: str) -> View:
        raise NotImplementedError

    # ---- Dataset ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        if not self.pairs:
            raise IndexError("empty data set")
        for attempt in range(MAX_CONSECUTIVE_BAD):
            record = self.pairs[(index + attempt) % len(self.pairs)]
            try:
                # The count travels with the item: DataLoader workers hold their own copies of `skipped`.
                return self.make_item(record) | {"skipped": attempt}
            except InputError as err:
                if self.fail_fast:
                    raise
                self.skip(f"{record.where}: {err}")
        raise InputError(f"{MAX_CONSECUTIVE_BAD} bad samples in a row from index {index}; is the data set path right?")

    def skip(self, message: str) -> None:
        self.skipped += 1
        log.warning("skipped bad sample (%d so far): %s", self.skipped, message)

    def make_item(self, record: PairRecord) -> dict:
        """Load, augment and tensorise one pair."""
        source = record.sources[int(torch.randint(len(record.sources), ()))] if self.train else record.sources[0]
        names = [source, record.target]
        aug = self.augment
        if aug.swap and torch.rand(()) < 0.5:
            names.reverse()
        flip = aug.flip and bool(torch.rand(()) < 0.5)
        item: dict = {}
        for role, name in zip(("reference", "target"), names, strict=True):
            image, pose, mask = self.transform(self.load_view(name), flip)
            item[f"{role}_image"] = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
            item[f"{role}_pose"] = skeleton_tensor(pose)
            item[f"{role}_keypoints"] = torch.from_numpy(pose.array())
            item[f"{role}_name"] = name
            if role == "target" and mask is not None:
                item["target_mask"] = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
        return item

    def transform(self, view: View, flip: bool) -> tuple[Image.Image, Pose, Image.Image | None]:
        """Resize to the output size (up-scaled by up to `augment.scale`), crop back, maybe mirror."""
        height, width = self.image_size
        scale = float(torch.rand(())) * self.augment.scale if self.augment.scale > 0 else 0.0
        big_h, big_w = int(height * (1 + scale)), int(width * (1 + scale))
        left = int(torch.randint(big_w - width + 1, ())) if big_w > width else 0
        top = int(torch.randint(big_h - height + 1, ())) if big_h > height else 0
        box = (left, top, left + width, top + height)
        image = view.image if view.image.size == (big_w, big_h) else view.image.resize((big_w, big_h), Image.BICUBIC)
        image = image.crop(box) if (big_w, big_h) != (width, height) else image
        pose = view.pose.resized(big_h, big_w).cropped(left, top, height, width)
        mask = None
        if view.mask is not None:
            mask = view.mask.resize((big_w, big_h), Image.NEAREST).crop(box)
        if flip:
            image, pose = ImageOps.mirror(image), pose.flipped()
            mask = ImageOps.mirror(mask) if mask is not None else None
        return image, pose, mask

    def validate(self) -> list[str]:
        """Load every image and pose once, without augmentation; return one message per bad one (or raise)."""
        problems = []
        for name in sorted({n for r in self.pairs for n in (*r.sources, r.target)}):
            try:
                self.load_view(name)
            except InputError as err:
                if self.fail_fast:
                    raise
                problems.append(str(err))
        return problems

    # ---- helpers for subclasses -------------------------------------------------------------------------------
    def _image(self, path: Path | None, what: str) -> Image.Image:
        if path is None:
            raise InputError(f"{what}: image file not found")
        return load_image(path, self.max_pixels)

    def _mask(self, masks_dir: Path, name: str) -> Image.Image | None:
        """The figure mask `masks/<name>.png`, if the data set has a `masks/` folder (the synthetic set does)."""
        path = masks_dir / Path(name).with_suffix(".png")
        if not masks_dir.is_dir():
            return None
        if not path.is_file():
            raise InputError(f"{path}: mask file not found")
        return load_image(path, self.max_pixels).convert("L")

    def _read_pair_csv(self, path: Path):
        """PairRecords of a `from,to` CSV (reference, target), malformed lines reported by file and line."""
        for number, row in _csv_rows(path, ",", ("from", "to")):
            if len(row) != 2 or not all(cell.strip() for cell in row):
                self._bad_line(f"{path}:{number}: expected 'from,to' (two image names), got {','.join(row)!r}")
                continue
            yield PairRecord((row[0].strip(),), row[1].strip(), f"{path}:{number}")

    def _bad_line(self, message: str) -> None:
        if self.fail_fast:
            raise InputError(message)
        self.skip(message)


# ---- GFLA / PATN CSV layout (DeepFashion, Market-1501, the synthetic set) ----------------------------------------
@dataclass
class CsvPairs(PairDataset):
    """`{prefix}-pairs-{split}.csv` (header `from,to`), `{prefix}-annotation-{split}.csv` (`name:ys:xs`), and the
    images in `root/{split}` (or `images_dir`). Keypoints are in `frame`, whatever size the images are stored at."""

    root: Path = Path(".")
    split: str = "train"
    prefix: str = "fasion-resize"
    frame: tuple[int, int] = DEEPFASHION_FRAME
    images_dir: Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.root = Path(self.root)
        self.images_dir = Path(self.images_dir) if self.images_dir else self.root / self.split
        if not self.images_dir.is_dir():
            raise InputError(f"{self.images_dir}: image folder not found")
        self.pairs = list(self._read_pair_csv(self.root / f"{self.prefix}-pairs-{self.split}.csv"))
        self.annotations = self._read_annotations(self.root / f"{self.prefix}-annotation-{self.split}.csv")
        self._poses: dict[str, Pose] = {}

    def _read_annotations(self, path: Path) -> dict[str, tuple[str, str, str]]:
        annotations = {}
        for number, row in _csv_rows(path, ":", ("name", "keypoints_y", "keypoints_x")):
            if len(row) != 3 or not row[0].strip():
                self._bad_line(f"{path}:{number}: expected 'name:[18 ys]:[18 xs]', got {':'.join(row)[:80]!r}")
                continue
            annotations[row[0].strip()] = (row[1], row[2], f"{path}:{number}")
        return annotations

    def pose(self, name: str) -> Pose:
        """The annotated keypoints of `name`, parsed (and validated) on first use."""
        if name not in self._poses:
            if name not in self.annotations:
                raise InputError(f"{name}: no keypoints in {self.prefix}-annotation-{self.split}.csv")
            ys, xs, where = self.annotations[name]
            try:
                ys, xs = json.loads(ys), json.loads(xs)
            except (ValueError, RecursionError) as err:  # not JSON, too deep, or a number of thousands of digits
                raise InputError(f"{where}: keypoint lists are not valid JSON ({str(err)[:100]})") from None
            self._poses[name] = Pose.from_gfla(ys, xs, self.frame, where)
        return self._poses[name]

    def load_view(self, name: str) -> View:
        image = self._image(find_image(self.images_dir / name), str(self.images_dir / name))
        return View(image, self.pose(name), self._mask(self.root / "masks", name))


def deepfashion_csv(root: str | Path, split: str = "train", **kwargs) -> CsvPairs:
    """DeepFashion In-shop in the GFLA/PATN layout (256x176 annotation frame)."""
    return CsvPairs(root=Path(root), split=split, **kwargs)


def market1501(root: str | Path, split: str = "train", **kwargs) -> CsvPairs:
    """Market-1501 in the PATN layout: `market-pairs-*.csv`, `market-annotation-*.csv`, 128x64 images."""
    kwargs.setdefault("image_size", MARKET_FRAME)
    return CsvPairs(root=Path(root), split=split, prefix="market", frame=MARKET_FRAME, **kwargs)


# ---- PIDM / NTED layout ----------------------------------------------------------------------------------------
@dataclass
class PidmPairs(PairDataset):
    """`{split}_pairs.txt` (target, then sources, comma-separated, paths relative to `root` such as
    `img/WOMEN/Dresses/id_00007132/04_3_back.jpg`), images under `root` (a .png stands in for a .jpg name),
    and keypoints in `root/pose/.../*.txt` (18 rows `x y`, 256x256 padded frame)."""

    root: Path = Path(".")
    split: str = "train"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.root = Path(self.root)
        path = self.root / f"{self.split}_pairs.txt"
        if not path.is_file():
            raise InputError(f"{path}: pair file not found")
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            names = [n.strip() for n in line.split(",")]
            if not line.strip():
                continue
            if len(names) < 2 or not all(names):
                self._bad_line(f"{path}:{number}: expected 'target,source[,source...]', got {line[:80]!r}")
                continue
            self.pairs.append(PairRecord(tuple(names[1:]), names[0], f"{path}:{number}"))

    @staticmethod
    def pose_path(root: Path, name: str) -> Path:
        relative = Path(name).with_suffix(".txt")
        parts = (
            relative.parts[1:] if relative.parts and relative.parts[0] in ("img", "img_highres") else relative.parts
        )
        return root.joinpath("pose", *parts)

    def load_view(self, name: str) -> View:
        image = self._image(find_image(self.root / name), str(self.root / name))
        return View(image, Pose.from_pidm_file(self.pose_path(self.root, name)), self._mask(self.root / "masks", name))


# ---- a folder of one's own images ------------------------------------------------------------------------------
@dataclass
class FolderPairs(PairDataset):
    """Images in `root`, each with keypoints in our JSON beside it (`photo.jpg` + `photo.json`, as `xmdpt pose`
    writes them). Pairs come from `root/pairs.csv` (`from,to`) if present, else every ordered pair of images."""

    root: Path = Path(".")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: folder not found")
        pairs_file = self.root / "pairs.csv"
        if pairs_file.is_file():
            self.pairs = list(self._read_pair_csv(pairs_file))
            return
        images = sorted(
            p.name
            for p in self.root.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".json").is_file()
        )
        if not images:
            raise InputError(f"{self.root}: no image with a keypoint file beside it (photo.jpg + photo.json)")
        self.pairs = [PairRecord((a,), b, f"{self.root}/{a}->{b}") for a in images for b in images if a != b]

    def load_view(self, name: str) -> View:
        path = self.root / name
        image = self._image(path if path.is_file() else None, str(path))
        pose = Pose.load_json(path.with_suffix(".json"))
        if (pose.height, pose.width) != (image.height, image.width):
            raise InputError(
                f"{path.with_suffix('.json')}: keypoints are for a {pose.height}x{pose.width} image but "
                f"{path.name} is {image.height}x{image.width}"
            )
        return View(image, pose, self._mask(self.root / "masks", name))


# ---- file helpers ----------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read ({err})") from err


def _csv_rows(path: Path, delimiter: str, header: Sequence[str]):
    """(line number, cells) of a small CSV, skipping its header line if it has one."""
    reader = csv.reader(_read_text(path).splitlines(), delimiter=delimiter)
    for number in itertools.count(1):
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # e.g. a field beyond the csv module's size limit
            raise InputError(f"{path}:{reader.line_num}: not a valid CSV line ({err})") from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if number == 1 and [c.strip() for c in row] == list(header):
            continue
        yield number, row
