"""OpenPose COCO-18 keypoints and exact conversions between the frames the field uses.

Internal convention: a `Pose` holds an (18, 2) float64 array of (x, y) pixel coordinates in the frame of an image of
`height` x `width` pixels, NaN (both coordinates) for a missing joint. Pixel coordinates index pixels (0 is the first
column's centre) as OpenPose writes them; resizing scales by new/old size, as the public GFLA/PIDM/X-MDPT code does,
so conversions are exact and invertible.

File formats:

- GFLA / PATN annotation CSV (`fasion-resize-annotation-*.csv`, `market-annotation-*.csv`): `name:ys:xs`, two JSON
  lists of 18 numbers, y first, -1 for missing, in the 256x176 frame (DeepFashion) or 128x64 frame (Market-1501).
- PIDM / NTED `pose/*.txt`: 18 rows `x y` in a 256x256 frame, the 176-wide image padded by 40 px on each side
  (so x_txt = x + 40), -1 for missing.
- Our JSON (schema ``openpose-18`` version 1)::

      {"format": "openpose-18", "version": 1, "height": 256, "width": 176,
       "keypoints": [[x, y], ..., null, ...],   # 18 entries in the order of JOINT_NAMES; null = missing
       "scores": [0.98, ..., null],              # optional: detector confidence per joint
       "joints": ["nose", "neck", ...],          # optional: the names, for people reading the file
       "image": "photo.png"}                     # optional: the image these keypoints belong to

Loading a file validates it (at most `MAX_POSE_FILE_BYTES`, 18 joints, finite numbers written as numbers, inside the
frame, at least one joint present) and raises `InputError` naming the file (and line) otherwise, whatever the file
holds; poses made in code (augmentation) may leave the frame.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmdpt.errors import InputError

JOINT_NAMES = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)
NUM_JOINTS = len(JOINT_NAMES)
# Index of each joint's mirror partner: a horizontal flip turns a person's right arm into a left arm.
FLIP_PERMUTATION = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)
DEEPFASHION_FRAME = (256, 176)  # (height, width) of the GFLA annotation frame
MARKET_FRAME = (128, 64)
PIDM_FRAME = (256, 256)
PIDM_PAD = 40  # (256 - 176) / 2: the PIDM/NTED pose files keep In-shop's white side bands
JSON_FORMAT = "openpose-18"
MAX_FRAME = 100_000  # pixels: a frame side beyond this is a malformed file, not a photo
# One pose is about 1.5 kB of our JSON or 150 bytes of PIDM text. A larger file is not a pose file, and reading and
# parsing an arbitrary one costs time and memory before it can be refused (100 MB: 80 s and 6.7 GB).
MAX_POSE_FILE_BYTES = 1_000_000
# Digits of a JSON integer: no frame side or coordinate needs more, and Python refuses to convert over 4300 anyway.
MAX_INT_DIGITS = 20
# Values quoted in messages are cut short: a bad file may hold a megabyte on one line, or lists nested 1000 deep.
_short_repr = reprlib.Repr()  # keyword arguments to Repr() need Python 3.12
_short_repr.maxlevel, _short_repr.maxlist, _short_repr.maxstring, _short_repr.maxlong = 3, 4, 40, 40
_short_repr.maxother = 40


def _quote(value: object) -> str:
    try:
        return _short_repr.repr(value)
    except ValueError:  # an int of over 4300 digits has no repr
        return f"<{type(value).__name__}>"


@dataclass(frozen=True, eq=False)
class Pose:
    """18 keypoints (x, y) in the pixel frame of a `height` x `width` image; NaN marks a missing joint."""

    xy: np.ndarray
    height: int
    width: int

    def __post_init__(self) -> None:
        xy = np.array(self.xy, dtype=np.float64).reshape(-1, 2) if np.size(self.xy) else np.zeros((0, 2))
        if xy.shape != (NUM_JOINTS, 2):
            raise ValueError(f"a pose needs {NUM_JOINTS} (x, y) joints, got shape {np.shape(self.xy)}")
        if not (1 <= self.height and 1 <= self.width):  # also refuses NaN sizes
            raise InputError(f"a pose's frame needs a positive height and width, got {self.height!r} x {self.width!r}")
        xy[np.isnan(xy).any(axis=1)] = np.nan  # half-missing joints are missing
        xy.setflags(write=False)
        object.__setattr__(self, "xy", xy)
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "width", int(self.width))

    # ---- queries ----------------------------------------------------------------------------------------------
    @property
    def present(self) -> np.ndarray:
        """Boolean (18,) mask of the joints that are there."""
        return ~np.isnan(self.xy[:, 0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pose):
            return NotImplemented
        return (self.height, self.width) == (other.height, other.width) and np.array_equal(
            self.xy, other.xy, equal_nan=True
        )

    def allclose(self, other: Pose, atol: float = 1e-6) -> bool:
        return (
            (self.height, self.width) == (other.height, other.width)
            and np.array_equal(self.present, other.present)
            and np.allclose(self.xy[self.present], other.xy[other.present], atol=atol)
        )

    def array(self, missing: float = math.nan) -> np.ndarray:
        """(18, 2) float32 (x, y), `missing` where absent: the model-side tensor contract uses NaN."""
        out = self.xy.astype(np.float32)
        out[~self.present] = missing
        return out

    # ---- geometry ---------------------------------------------------------------------------------------------
    def resized(self, height: int, width: int) -> Pose:
        """The same pose in an image resized to `height` x `width` (pure scaling, as the public code does)."""
        scale = np.array([width / self.width, height / self.height])
        return Pose(self.xy * scale, height, width)

    def cropped(self, left: float, top: float, height: int, width: int) -> Pose:
        """The pose in the window of `height` x `width` whose top-left corner is at (left, top)."""
        return Pose(self.xy - np.array([left, top]), height, width)

    def flipped(self) -> Pose:
        """Mirror horizontally: x -> width - 1 - x (pixel index mirror) and left/right joints swap names."""
        xy = self.xy.copy()
        xy[:, 0] = self.width - 1 - xy[:, 0]
        return Pose(xy[list(FLIP_PERMUTATION)], self.height, self.width)

    # ---- GFLA / PATN annotation CSV ---------------------------------------------------------------------------
    @classmethod
    def from_gfla(
        cls, ys: Sequence[float], xs: Sequence[float], frame: tuple[int, int] = DEEPFASHION_FRAME, source: str = "pose"
    ) -> Pose:
        """Parse the y and x lists of an annotation line (-1 = missing), validated against `frame`."""
        ys, xs = _number_list(ys, "y", source), _number_list(xs, "x", source)
        xy = np.stack([xs, ys], axis=1)
        missing = (xy == -1).any(axis=1)
        xy[missing] = np.nan
        return validated(xy, *frame, source)

    def to_gfla(self, frame: tuple[int, int] = DEEPFASHION_FRAME) -> tuple[list[int], list[int]]:
        """(ys, xs) integer lists in `frame`, -1 for missing; the CSV stores integers, so this rounds."""
        pose = self.resized(*frame) if (self.height, self.width) != tuple(frame) else self
        ys = [-1 if not p else int(round(y)) for (_, y), p in zip(pose.xy, pose.present, strict=True)]
        xs = [-1 if not p else int(round(x)) for (x, _), p in zip(pose.xy, pose.present, strict=True)]
        return ys, xs

    # ---- PIDM / NTED pose txt ---------------------------------------------------------------------------------
    @classmethod
    def from_pidm_text(cls, text: str, source: str = "pose.txt") -> Pose:
        """Parse a PIDM `pose/*.txt` (18 rows `x y`, 256x256 padded frame) into the 256x176 image frame."""
        rows = [line.split() for line in text.splitlines() if line.strip()]
        if len(rows) != NUM_JOINTS:
            raise InputError(f"{source}: expected {NUM_JOINTS} rows 'x y', got {len(rows)}")
        values = []
        for number, row in enumerate(rows, start=1):
            if len(row) != 2:
                raise InputError(f"{source}:{number}: expected two numbers 'x y', got {_quote(' '.join(row))}")
            try:
                values.append([float(row[0]), float(row[1])])
            except ValueError:
                raise InputError(f"{source}:{number}: not numbers: {_quote(' '.join(row))}") from None
        xy = np.array(values)
        if not np.isfinite(xy).all():
            raise InputError(f"{source}: keypoints contain NaN or infinity")
        missing = (xy == -1).any(axis=1)
        xy[missing] = np.nan
        validated(xy, *PIDM_FRAME, source)  # the file's own frame
        xy[:, 0] -= PIDM_PAD
        return Pose(xy, *DEEPFASHION_FRAME)

    @classmethod
    def from_pidm_file(cls, path: str | Path) -> Pose:
        path = Path(path)
        return cls.from_pidm_text(read_pose_text(path), str(path))

    def to_pidm_text(self) -> str:
        """PIDM rows `x y` in the padded 256x256 frame; floats are written exactly, whole numbers as integers."""
        pose = self.resized(*DEEPFASHION_FRAME) if (self.height, self.width) != DEEPFASHION_FRAME else self
        lines = []
        for (x, y), present in zip(pose.xy, pose.present, strict=True):
            lines.append("-1 -1" if not present else f"{_num(x + PIDM_PAD)} {_num(y)}")
        return "\n".join(lines) + "\n"

    # ---- our JSON ---------------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, obj: dict, source: str = "pose.json") -> Pose:
        """Parse our JSON object (schema in the module docstring)."""
        if not isinstance(obj, dict) or "keypoints" not in obj:
            raise InputError(f"{source}: not an {JSON_FORMAT} keypoint file (no 'keypoints' list)")
        if obj.get("format", JSON_FORMAT) != JSON_FORMAT:
            raise InputError(f"{source}: format is {_quote(obj.get('format'))}, expected {JSON_FORMAT!r}")
        height, width = obj.get("height"), obj.get("width")
        if not all(type(v) is int and 0 < v <= MAX_FRAME for v in (height, width)):
            raise InputError(
                f"{source}: needs integer 'height' and 'width' of the image frame in [1, {MAX_FRAME}], "
                f"got {_quote(height)} x {_quote(width)}"
            )
        points = obj["keypoints"]
        if not isinstance(points, list) or len(points) != NUM_JOINTS:
            count = len(points) if isinstance(points, list) else type(points).__name__
            raise InputError(f"{source}: 'keypoints' must list {NUM_JOINTS} joints, got {count}")
        xy = np.full((NUM_JOINTS, 2), np.nan)
        for i, point in enumerate(points):
            if point is None:
                continue
            if not (isinstance(point, list | tuple) and len(point) == 2):
                raise InputError(f"{source}: joint {i} ({JOINT_NAMES[i]}) must be [x, y] or null, got {_quote(point)}")
            # JSON numbers only: float() would also take true/false (1, 0) and "12" (a number written as a string),
            # which are typing mistakes in a hand-edited file, not coordinates.
            if not all(_is_number(v) for v in point):
                raise InputError(f"{source}: joint {i} ({JOINT_NAMES[i]}) is not two numbers: {_quote(point)}")
            try:
                xy[i] = [float(point[0]), float(point[1])]
            except OverflowError:  # an integer beyond float's range
                xy[i] = np.inf
            if not np.isfinite(xy[i]).all():
                raise InputError(f"{source}: joint {i} ({JOINT_NAMES[i]}) is NaN or infinite; write null if missing")
        return validated(xy, height, width, source)

    @classmethod
    def load_json(cls, path: str | Path) -> Pose:
        path = Path(path)
        text = read_pose_text(path, "keypoint file")
        try:
            obj = json.loads(text, parse_int=_json_int)
        except _LongNumber as err:
            raise InputError(
                f"{path}: a number of {err.args[0]:,} digits; no keypoint or frame size has that many"
            ) from None
        except RecursionError:
            raise InputError(f"{path}: JSON nested too deeply to be a keypoint file") from None
        except ValueError as err:  # json.JSONDecodeError
            raise InputError(f"{path}: not valid JSON ({str(err).splitlines()[0][:200]})") from None
        return cls.from_json(obj, str(path))

    def to_json(self, scores: Sequence[float | None] | None = None, image: str | None = None) -> dict:
        obj: dict = {"format": JSON_FORMAT, "version": 1, "height": self.height, "width": self.width}
        obj["keypoints"] = [
            [float(x), float(y)] if p else None for (x, y), p in zip(self.xy, self.present, strict=True)
        ]
        if scores is not None:
            obj["scores"] = [
                None if s is None or not p else float(s) for s, p in zip(scores, self.present, strict=True)
            ]
        obj["joints"] = list(JOINT_NAMES)
        if image is not None:
            obj["image"] = image
        return obj

    def save_json(self, path: str | Path, **kwargs) -> None:
        Path(path).write_text(json.dumps(self.to_json(**kwargs), indent=1) + "\n")


class _LongNumber(Exception):
    """Raised inside the JSON parser for an integer of too many digits (args: the digit count)."""


def _json_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS + 1:  # + a sign
        raise _LongNumber(len(text.lstrip("-")))
    return int(text)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def read_pose_text(path: Path, what: str = "pose file") -> str:
    """The text of a pose file of at most `MAX_POSE_FILE_BYTES`, read no further: a larger one (or an endless
    device) is refused before it is parsed, and every failure is one line naming the file."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_POSE_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: {what} is a folder") from None
    except PermissionError:
        raise InputError(f"{path}: cannot read the {what}: permission denied") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read the {what} ({err.strerror or type(err).__name__})") from None
    if len(data) > MAX_POSE_FILE_BYTES:
        raise InputError(
            f"{path}: {what} is over {MAX_POSE_FILE_BYTES:,} bytes; a pose file is a few kB (is it the right file?)"
        )
    try:
        return data.decode("utf-8-sig")  # a byte-order mark from a Windows editor is harmless
    except UnicodeDecodeError:
        raise InputError(f"{path}: {what} is not UTF-8 text") from None


def validated(xy: np.ndarray, height: int, width: int, source: str) -> Pose:
    """A `Pose` from file data, refusing NaN, points outside the frame and poses with no joint at all."""
    present = ~np.isnan(xy).any(axis=1)
    if not present.any():
        raise InputError(f"{source}: every joint is missing; a pose needs at least one keypoint")
    pts = xy[present]
    if not np.isfinite(pts).all():
        raise InputError(f"{source}: keypoints contain infinity")
    bad = (pts[:, 0] < 0) | (pts[:, 0] > width) | (pts[:, 1] < 0) | (pts[:, 1] > height)
    if bad.any():
        joint = int(np.flatnonzero(present)[np.argmax(bad)])
        x, y = xy[joint]
        raise InputError(
            f"{source}: joint {joint} ({JOINT_NAMES[joint]}) at x={_num(x)}, y={_num(y)} lies outside the "
            f"{height}x{width} frame (use -1 or null for a missing joint)"
        )
    return Pose(xy, height, width)


def _number_list(values: Sequence[float], axis: str, source: str) -> np.ndarray:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise InputError(f"{source}: the {axis} keypoints must be a list of {NUM_JOINTS} numbers")
    if len(values) != NUM_JOINTS:
        raise InputError(f"{source}: expected {NUM_JOINTS} {axis} values, got {len(values)}")
    if not all(_is_number(v) for v in values):  # as in our JSON: no true/false, no numbers written as strings
        raise InputError(f"{source}: the {axis} keypoints are not all numbers")
    try:
        arr = np.array([float(v) for v in values])
    except OverflowError:  # an integer beyond float's range
        raise InputError(f"{source}: the {axis} keypoints hold a number beyond any frame") from None
    if np.isnan(arr).any():
        raise InputError(f"{source}: the {axis} keypoints contain NaN (write -1 for a missing joint)")
    return arr


def _num(value: float) -> str:
    """Shortest exact text: integers without a decimal point, other floats by repr (round-trips exactly)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
