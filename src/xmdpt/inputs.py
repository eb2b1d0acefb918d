"""Input preparation for `XMDPTPipeline`: references and target poses in every form a user has them -> tensors.

A reference is a PIL image, an image path, or a tensor (3, H, W) / (B, 3, H, W) in [-1, 1]. A target pose is a
`Pose`, a keypoint file (our JSON, or a PIDM/NTED `.txt`), a driving photo (PIL image or path; MediaPipe finds the
keypoints), or an already-rendered skeleton tensor in [0, 1]. Either may be a list of those. Images and poses are
brought into the model's frame with the same geometry (`fit`: crop / pad / stretch, see `fit_window`), so the
skeleton lands on the person as the model saw it in training. Tensors are taken as they are (the caller owns them).

Whatever comes is checked before memory is spent on it: a picture too large or too thin to be a person photo, a pose
file beyond a few kB, a `Pose` or tensor holding NaN or infinity, or a `None` ends as one `InputError`.

Everything here is a pure function of its inputs; MediaPipe is opened only when a driving photo comes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xmdpt.data.images import check_image_size, load_image, to_rgb
from xmdpt.errors import InputError, require_file
from xmdpt.pose.extract import FITS, Fit, PoseExtractor, fit_image, fit_window
from xmdpt.pose.keypoints import JOINT_NAMES, MAX_FRAME, Pose
from xmdpt.pose.render import skeleton_tensor

PathLike = str | os.PathLike
ImageInput = Image.Image | PathLike | torch.Tensor
PoseInput = Pose | Image.Image | PathLike | torch.Tensor
KEYPOINT_SUFFIXES = (".json", ".txt")
REFERENCE_KINDS = "a PIL image, an image path or a (B, 3, H, W) tensor"
POSE_KINDS = "a Pose, a keypoint file, a driving photo (PIL image or path) or a skeleton tensor"
# Tensors are checked against their documented range with a little slack for resampling overshoot.
RANGE_SLACK = 1e-3
# How far, in frame sizes, a joint of a `Pose` made in code may lie outside its frame: augmentation moves joints a
# little out; a joint at 1e15 is a bug, and OpenCV cannot draw it.
POSE_MARGIN = 1.0


def as_list(items) -> list:
    """A single input or a list/tuple of inputs -> a list."""
    return list(items) if isinstance(items, list | tuple) else [items]


# ---- geometry ---------------------------------------------------------------------------------------------------
def fit_pose(pose: Pose, size: tuple[int, int], fit: Fit = "pad") -> Pose:
    """The keypoints of `pose` in the frame `fit_image(image, size, fit)` makes of its image."""
    if (pose.height, pose.width) == tuple(size):
        return pose
    left, top, win_h, win_w = fit_window(pose.height, pose.width, size, fit)
    return pose.cropped(left, top, win_h, win_w).resized(*size)


# ---- loading ----------------------------------------------------------------------------------------------------
def check_pose(pose: Pose, source: str = "pose") -> Pose:
    """`pose` when it can be drawn: a frame of sane size, at least one joint, finite joints near the frame."""
    if not (pose.height <= MAX_FRAME and pose.width <= MAX_FRAME):
        raise InputError(f"{source}: frame {pose.height}x{pose.width} is larger than any photo (at most {MAX_FRAME})")
    present = pose.present
    if not present.any():
        raise InputError(f"{source}: every joint is missing (NaN); a pose needs at least one keypoint")
    x, y = pose.xy[present].T
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError(f"{source}: keypoints contain infinity")
    far = (
        (x < -POSE_MARGIN * pose.width)
        | (x > (1 + POSE_MARGIN) * pose.width)
        | (y < -POSE_MARGIN * pose.height)
        | (y > (1 + POSE_MARGIN) * pose.height)
    )
    if far.any():
        joint = int(np.flatnonzero(present)[np.argmax(far)])
        raise InputError(
            f"{source}: joint {joint} ({JOINT_NAMES[joint]}) at x={pose.xy[joint, 0]:.6g}, y={pose.xy[joint, 1]:.6g} "
            f"lies far outside the {pose.height}x{pose.width} frame"
        )
    return pose


def check_image(image: Image.Image, source: str) -> Image.Image:
    """An in-memory picture under the same size and aspect limits as a file (`load_image`)."""
    check_image_size(image.width, image.height, source)
    return image


def _need_input(item, name: str, kinds: str) -> None:
    """Refuse `None` and other types by name: `Path(None)` or `Path(3)` would end in a TypeError traceback."""
    if not isinstance(item, Pose | Image.Image | torch.Tensor | str | os.PathLike):
        raise InputError(f"{name}: got {'None' if item is None else type(item).__name__}; give {kinds}")


def load_pose_file(path: PathLike) -> Pose:
    """A keypoint file by its suffix: `.json` (ours, any frame) or `.txt` (PIDM/NTED, 256x176 image frame)."""
    path = require_file(Path(path), "pose file")
    if path.suffix.lower() == ".json":
        return Pose.load_json(path)
    return Pose.from_pidm_file(path)


def is_keypoint_file(path: PathLike) -> bool:
    return Path(path).suffix.lower() in KEYPOINT_SUFFIXES


class PoseReader:
    """Turns one pose input into a `Pose` in its own frame; opens MediaPipe on the first driving photo and keeps it
    for the rest of the batch (opening it costs far more than one detection)."""

    def __init__(self, extractor: PoseExtractor | None = None) -> None:
        self._extractor = extractor
        self._owned = False

    def photo(self, image: Image.Image, source: str) -> Pose:
        check_image(image, source)
        if self._extractor is None:
            self._extractor, self._owned = PoseExtractor(), True
        # Detect on the full-resolution photo: MediaPipe misses people in tiny images, and the keypoints are then
        # moved into the model's frame exactly (`fit_pose`).
        return self._extractor(to_rgb(image), source).pose

    def read(self, item: Pose | Image.Image | PathLike, source: str) -> Pose:
        _need_input(item, "pose", POSE_KINDS)
        if isinstance(item, Pose):
            return check_pose(item, source)
        if isinstance(item, Image.Image):
            return self.photo(item, source)
        if is_keypoint_file(item):
            return load_pose_file(item)
        return self.photo(load_image(item), str(item))

    def close(self) -> None:
        if self._owned and self._extractor is not None:
            self._extractor.close()
        self._extractor, self._owned = None, False

    def __enter__(self) -> PoseReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- tensors ----------------------------------------------------------------------------------------------------
def image_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def _batched(tensor: torch.Tensor, name: str, low: float, high: float) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) -> (B, 3, H, W), refusing the wrong shape or a value range that is not the model's."""
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise InputError(f"{name} tensor must be (3, H, W) or (B, 3, H, W), got {tuple(tensor.shape)}")
    if not tensor.numel():
        raise InputError(f"{name} tensor is empty, shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():  # NaN compares false with the range check below, and would pass it
        raise InputError(f"{name} tensor holds NaN or infinite values")
    if tensor.min() < low - RANGE_SLACK or tensor.max() > high + RANGE_SLACK:
        raise InputError(
            f"{name} tensor values lie in [{float(tensor.min()):.3g}, {float(tensor.max()):.3g}], "
            f"expected [{low:g}, {high:g}]"
        )
    return tensor.float()


def reference_tensor(item: ImageInput, size: tuple[int, int], fit: Fit = "pad") -> torch.Tensor:
    """One reference -> (B, 3, H, W) in [-1, 1] at `size` (tensors are passed through, checked by the pipeline)."""
    _need_input(item, "reference_image", REFERENCE_KINDS)
    if isinstance(item, Pose):
        raise InputError("reference_image: got a Pose; the reference is a photo of the person")
    if isinstance(item, torch.Tensor):
        return _batched(item, "reference_image", -1.0, 1.0)
    image = check_image(item, "reference image") if isinstance(item, Image.Image) else load_image(item)
    return image_tensor(fit_image(to_rgb(image), size, fit)).unsqueeze(0)


def pose_tensor(item: PoseInput, size: tuple[int, int], fit: Fit = "pad", reader: PoseReader | None = None):
    """One target pose -> the rendered skeleton (B, 3, H, W) in [0, 1] at `size`."""
    _need_input(item, "pose", POSE_KINDS)
    if isinstance(item, torch.Tensor):
        return _batched(item, "pose_image", 0.0, 1.0)
    source = "pose" if isinstance(item, Pose) else "driving photo" if isinstance(item, Image.Image) else str(item)
    with PoseReader() if reader is None else nullcontext(reader) as r:
        pose = r.read(item, source)
    return skeleton_tensor(fit_pose(pose, size, fit)).unsqueeze(0)


def _concat(parts: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    if not parts:
        raise InputError(f"{name}: an empty list was given")
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise InputError(f"{name}: the tensors given have different sizes {sorted(shapes)}")
    return torch.cat(list(parts))


def prepare_inputs(
    references: ImageInput | Sequence[ImageInput],
    poses: PoseInput | Sequence[PoseInput],
    size: tuple[int, int],
    fit: Fit = "pad",
    reader: PoseReader | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference (B, 3, H, W) in [-1, 1], skeleton (B, 3, H, W) in [0, 1]) for one batch of requests.

    One reference with several poses is repeated for each pose (one person, a pose sequence); otherwise the
    counts must match, pair by pair. `reader` (kept open) lets many calls share one MediaPipe instance.
    """
    if fit not in FITS:
        raise InputError(f"unknown fit {fit!r}; use {', '.join(FITS)}")
    if poses is None:
        raise InputError("no target pose given")
    if references is None:
        raise InputError("no reference image given")
    reference = _concat([reference_tensor(r, size, fit) for r in as_list(references)], "reference_image")
    with PoseReader() if reader is None else nullcontext(reader) as r:
        pose = _concat([pose_tensor(p, size, fit, r) for p in as_list(poses)], "pose_image")
    if reference.shape[0] == 1 and pose.shape[0] > 1:
        reference = reference.expand(pose.shape[0], -1, -1, -1)
    return reference, pose
