"""Pose images: the X-MDPT RGB skeleton (reference section 5) and 18-channel Gaussian heatmaps.

The skeleton is drawn with OpenCV itself (filled `circle`, `ellipse2Poly` + `fillConvexPoly`, `addWeighted`) because
the released weights saw exactly those rasterisations; a re-implementation would differ by edge pixels. Coordinates are
truncated with `int()` before drawing, as the public code does.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from xmdpt.pose.keypoints import NUM_JOINTS, Pose

# OpenPose colours, handed to OpenCV as BGR, so joint 0 (255, 0, 0) ends up blue in the RGB result.
COLORS_BGR = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)
# Limbs as 0-based joint pairs (OpenPose's 1-based list minus one); only the first 17 are drawn.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
    (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
DRAWN_LIMBS = 17
JOINT_RADIUS = 4
STICK_WIDTH = 4  # the ellipse's half-minor axis
HEATMAP_SIGMA = 6.0  # pixels at 256x176 (GFLA, DPTN)


def _frame(pose: Pose, height: int | None, width: int | None) -> Pose:
    height, width = height or pose.height, width or pose.width
    return pose if (pose.height, pose.width) == (height, width) else pose.resized(height, width)


def draw_skeleton(pose: Pose, height: int | None = None, width: int | None = None) -> np.ndarray:
    """The skeleton as a uint8 (H, W, 3) RGB image, before the normalisation by its maximum."""
    pose = _frame(pose, height, width)
    canvas = np.zeros((pose.height, pose.width, 3), dtype=np.uint8)
    present = pose.present
    for i in range(NUM_JOINTS):
        if present[i]:
            x, y = pose.xy[i]
            cv2.circle(canvas, (int(x), int(y)), JOINT_RADIUS, COLORS_BGR[i], thickness=-1)
    for i, (a, b) in enumerate(LIMBS[:DRAWN_LIMBS]):
        if not (present[a] and present[b]):
            continue
        (xa, ya), (xb, yb) = pose.xy[a], pose.xy[b]
        length = math.hypot(xa - xb, ya - yb)
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        centre = (int((xa + xb) / 2), int((ya + yb) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        # Each limb is painted on a copy and blended back: overlapping limbs mix instead of overwriting.
        limb = canvas.copy()
        cv2.fillConvexPoly(limb, polygon, COLORS_BGR[i])
        canvas = cv2.addWeighted(canvas, 0.4, limb, 0.6, 0)
    return np.ascontiguousarray(canvas[:, :, ::-1])  # BGR -> RGB


def skeleton_tensor(pose: Pose, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The model's pose input: float (3, H, W) in [0, 1], divided by its maximum (all zeros for an empty canvas)."""
    image = torch.from_numpy(draw_skeleton(pose, height, width)).permute(2, 0, 1).float() / 255.0
    peak = image.max()
    return image / peak if peak > 0 else image


def heatmaps(
    pose: Pose, height: int | None = None, width: int | None = None, sigma: float | None = None
) -> np.ndarray:
    """18 Gaussian heatmaps, float32 (18, H, W); sigma defaults to 6 px at height 256, scaled with the height."""
    pose = _frame(pose, height, width)
    sigma = HEATMAP_SIGMA * pose.height / 256 if sigma is None else sigma
    ys = np.arange(pose.height, dtype=np.float32)[:, None]
    xs = np.arange(pose.width, dtype=np.float32)[None, :]
    out = np.zeros((NUM_JOINTS, pose.height, pose.width), dtype=np.float32)
    for i in np.flatnonzero(pose.present):
        x, y = pose.xy[i]
        out[i] = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return out
