"""OpenPose-18 keypoints from a photo with MediaPipe Pose, fully offline.

mediapipe 0.10.21 is the last release whose wheel ships the pose models; `model_complexity=1` uses the bundled
`pose_landmark_full.tflite` (0 and 2 download at run time and fail offline). It pins numpy < 2, which coexists with
torch, diffusers, transformers and scikit-image, so it is an optional extra of this package rather than a separate
interpreter. Its 33 BlazePose landmarks map to COCO-18 as in reference section 12; the neck, which BlazePose lacks, is
the midpoint of the shoulders.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from xmdpt.data.images import load_image
from xmdpt.errors import InputError
from xmdpt.pose.keypoints import NUM_JOINTS, Pose

MEDIAPIPE_VERSION = "0.10.21"
# COCO-18 joint -> BlazePose landmark (None: the neck, computed from both shoulders).
BLAZEPOSE_TO_COCO18 = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
NECK, RIGHT_SHOULDER, LEFT_SHOULDER = 1, 2, 5
Fit = Literal["crop", "pad", "stretch"]
FITS = ("crop", "pad", "stretch")
# "pad" builds a white canvas around the photo before resizing it; for a large photo whose aspect is far from the
# frame's, that canvas is many times the photo (a 50-megapixel panorama padded into a portrait frame: over 2 GB).
# Beyond this many canvas pixels the photo is first shrunk by a whole factor (a box filter), which moves nothing in
# the model's frame by more than a small fraction of a pixel; photos of ordinary size keep the exact result.
MAX_PAD_CANVAS = 16_000_000


class MissingDependencyError(InputError):
    """An optional dependency is not installed; the CLI reports it as one line like any bad input."""


@dataclass(frozen=True)
class Detection:
    """Keypoints of one photo plus the per-joint confidence (MediaPipe's landmark visibility)."""

    pose: Pose
    scores: tuple[float | None, ...]


def fit_window(height: int, width: int, size: tuple[int, int], fit: Fit) -> tuple[int, int, int, int]:
    """The window (left, top, window_height, window_width) of a `height` x `width` image that `fit_image` resizes
    to `size`: inside the image for "crop", around it (white margins) for "pad", the whole image for "stretch"."""
    out_h, out_w = size
    if fit == "crop":
        if width * out_h > height * out_w:  # too wide: cut the sides
            new_w = round(height * out_w / out_h)
            return (width - new_w) // 2, 0, height, new_w
        new_h = round(width * out_h / out_w)
        return 0, (height - new_h) // 2, new_h, width
    if fit == "pad":
        new_w, new_h = max(width, round(height * out_w / out_h)), max(height, round(width * out_h / out_w))
        return -((new_w - width) // 2), -((new_h - height) // 2), new_h, new_w
    if fit == "stretch":
        return 0, 0, height, width
    raise InputError(f"unknown fit {fit!r}; use {', '.join(FITS)}")


def fit_image(image: Image.Image, size: tuple[int, int] | None, fit: Fit = "crop") -> Image.Image:
    """Bring a photo into the model's frame `size` = (height, width).

    "crop" cuts the centre to the frame's aspect, "pad" extends the shorter side with white (keeps the whole person,
    like DeepFashion's studio backdrop), "stretch" resizes alone, as the public code does for squares.
    """
    if size is None:
        return image
    left, top, win_h, win_w = fit_window(image.height, image.width, size, fit)  # `fit_pose` moves keypoints alike
    if fit == "crop":
        image = image.crop((left, top, left + win_w, top + win_h))
    elif fit == "pad":
        if win_w * win_h > MAX_PAD_CANVAS:
            image = image.reduce(math.ceil(math.sqrt(win_w * win_h / MAX_PAD_CANVAS)))
            left, top, win_h, win_w = fit_window(image.height, image.width, size, fit)
        canvas = Image.new("RGB", (win_w, win_h), (255, 255, 255))
        canvas.paste(image, (-left, -top))
        image = canvas
    return image.resize((size[1], size[0]), Image.BICUBIC)


_silence_lock = threading.Lock()
_silence_state = {"depth": 0, "saved": -1}  # shared by threads: the first in redirects, the last out restores


@contextlib.contextmanager
def native_stderr_silenced():
    """MediaPipe's C++ side (TFLite, absl logging) writes to file descriptor 2 directly, ignoring Python's logging
    and GLOG_minloglevel; around its calls only, that descriptor points at the null device. Python exceptions still
    propagate and are reported after it is restored."""
    with _silence_lock:
        if _silence_state["depth"] == 0:
            sys.stderr.flush()
            _silence_state["saved"] = os.dup(2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        _silence_state["depth"] += 1
    try:
        yield
    finally:
        with _silence_lock:
            _silence_state["depth"] -= 1
            if _silence_state["depth"] == 0:
                os.dup2(_silence_state["saved"], 2)
                os.close(_silence_state["saved"])


class PoseExtractor:
    """MediaPipe Pose (static images, complexity 1); reuse one instance for many photos."""

    def __init__(self, min_visibility: float = 0.5) -> None:
        self.min_visibility = min_visibility
        os.environ.setdefault("GLOG_minloglevel", "2")  # what of MediaPipe's logging still honours it
        try:
            import mediapipe as mp
        except ImportError as err:
            raise MissingDependencyError(
                f"pose extraction needs mediapipe {MEDIAPIPE_VERSION} (the last release that bundles its pose "
                f"models): pip install 'xmdpt[pose]' or pip install mediapipe=={MEDIAPIPE_VERSION} ({err})"
            ) from err
        with native_stderr_silenced():
            self._pose = mp.solutions.pose.Pose(
                static_image_mode=True, model_complexity=1, enable_segmentation=False, min_detection_confidence=0.5
            )
            # The graph opens its models on its own threads after the constructor returns, and they log as they do
            # (TFLite's XNNPACK line, absl's warnings), racing whatever runs next. A first detection waits until
            # every model is open, so those lines land here, in the silence; static_image_mode keeps no state.
            self._pose.process(np.full((8, 8, 3), 255, np.uint8))

    def close(self) -> None:
        with native_stderr_silenced():
            self._pose.close()

    def __enter__(self) -> PoseExtractor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, image: Image.Image, source: str = "image") -> Detection:
        """Keypoints of the most prominent person in `image` (RGB), in its pixel frame."""
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        height, width = rgb.shape[:2]
        with native_stderr_silenced():
            result = self._pose.process(rgb)
        if result.pose_landmarks is None:
            raise InputError(f"{source}: no person found in the image")
        marks = result.pose_landmarks.landmark
        xy = np.full((NUM_JOINTS, 2), np.nan)
        scores: list[float | None] = [None] * NUM_JOINTS
        for joint, index in enumerate(BLAZEPOSE_TO_COCO18):
            if index is None:
                continue
            mark = marks[index]
            # MediaPipe extrapolates hidden joints, sometimes outside the picture: keep only visible, in-frame ones.
            x, y = mark.x * width, mark.y * height
            if mark.visibility >= self.min_visibility and 0 <= x <= width and 0 <= y <= height:
                xy[joint] = (x, y)
                scores[joint] = float(mark.visibility)
        if not np.isnan(xy[[RIGHT_SHOULDER, LEFT_SHOULDER]]).any():
            xy[NECK] = xy[[RIGHT_SHOULDER, LEFT_SHOULDER]].mean(axis=0)
            scores[NECK] = min(scores[RIGHT_SHOULDER], scores[LEFT_SHOULDER])
        if np.isnan(xy).all():
            raise InputError(f"{source}: a person was found but no joint is visible enough")
        return Detection(Pose(xy, height, width), tuple(scores))


def extract_file(
    path: str | Path, extractor: PoseExtractor, size: tuple[int, int] | None = None, fit: Fit = "crop"
) -> tuple[Image.Image, Detection]:
    """Load a photo safely, bring it into the frame `size`, detect its keypoints in that frame."""
    image = fit_image(load_image(path), size, fit)
    return image, extractor(image, str(path))
