"""The X-MDPT skeleton rendering, pinned on known poses, and the Gaussian heatmaps."""

import hashlib
import math

import numpy as np
import torch

from xmdpt.pose.keypoints import Pose
from xmdpt.pose.render import COLORS_BGR, LIMBS, draw_skeleton, heatmaps, skeleton_tensor


def pose_with(points: dict[int, tuple[float, float]], height=256, width=176) -> Pose:
    xy = np.full((18, 2), np.nan)
    for i, p in points.items():
        xy[i] = p
    return Pose(xy, height, width)


def rgb(i: int) -> np.ndarray:
    return np.array(COLORS_BGR[i][::-1])  # the table is BGR; the output is RGB


def test_single_joint_is_a_radius_4_midpoint_circle_of_49_pixels():
    canvas = draw_skeleton(pose_with({1: (50, 100)}))
    lit = canvas.sum(axis=2) > 0
    # OpenCV's filled circle of radius 4: row half-widths 4,3,3,2,0 from the centre row outwards (9+14+14+10+2)
    assert lit.sum() == 49
    assert [int(lit[100 + d].sum()) for d in range(5)] == [9, 7, 7, 5, 1]
    assert (canvas[lit] == rgb(1)).all()  # neck colour (255, 85, 0) BGR -> RGB (0, 85, 255)
    assert canvas.sum() == 49 * (85 + 255)


def test_limb_blend_colours_at_joints_and_midpoint():
    canvas = draw_skeleton(pose_with({1: (50, 100), 2: (90, 100)}))  # neck - right shoulder: limb 0
    limb = rgb(0)  # (0, 0, 255)
    # joints: 0.4 * joint colour + 0.6 * limb colour; the midpoint: 0.6 * limb colour over black
    assert canvas[100, 50].tolist() == np.rint(0.4 * rgb(1) + 0.6 * limb).tolist() == [0, 34, 255]
    assert canvas[100, 90].tolist() == np.rint(0.4 * rgb(2) + 0.6 * limb).tolist() == [0, 68, 255]
    assert canvas[100, 70].tolist() == [0, 0, 153]
    # a horizontal ellipse with half-axes (20, 4) around (70, 100)
    assert np.flatnonzero(canvas[:, 70].sum(axis=1)).tolist() == list(range(96, 105))
    row = np.flatnonzero(canvas[100].sum(axis=1))
    assert row.min() == 50 - 4 and row.max() == 90 + 4  # the joint circles stick out past the ellipse ends
    tensor = skeleton_tensor(pose_with({1: (50, 100), 2: (90, 100)}))
    assert tensor.shape == (3, 256, 176) and tensor.dtype == torch.float32 and tensor.max() == 1
    assert torch.allclose(tensor[:, 100, 70], torch.tensor([0, 0, 153 / 255]))


def test_limbs_need_both_joints_and_only_17_are_drawn():
    # joints 2 and 16 form limb 17 (not drawn): only the two circles appear
    canvas = draw_skeleton(pose_with({2: (40, 40), 16: (80, 40)}))
    assert (canvas.sum(axis=2) > 0).sum() == 2 * 49
    assert LIMBS[17] == (2, 16)


def test_empty_pose_gives_a_black_tensor():
    assert skeleton_tensor(pose_with({})).abs().sum() == 0


FULL = {
    0: (88, 41), 1: (88, 62), 2: (68, 62), 3: (62, 98), 4: (60, 130), 5: (108, 63), 6: (113, 99),
    7: (116, 131), 8: (76, 128), 9: (74, 178), 10: (72, 224), 11: (100, 129), 12: (102, 180), 13: (104, 226),
    14: (84, 36), 15: (92, 37), 16: (78, 39), 17: (99, 40),
}  # fmt: skip


def independent_drawing(pose: Pose) -> np.ndarray:
    """The same recipe drawn without OpenCV: disc and rotated-ellipse inequalities, float blending."""
    ys, xs = np.mgrid[0 : pose.height, 0 : pose.width]
    canvas = np.zeros((pose.height, pose.width, 3))
    for i in range(18):
        x, y = (int(v) for v in pose.xy[i])
        canvas[(xs - x) ** 2 + (ys - y) ** 2 <= 4.5**2] = rgb(i)
    for i, (a, b) in enumerate(LIMBS[:17]):
        (xa, ya), (xb, yb) = pose.xy[a], pose.xy[b]
        cx, cy = int((xa + xb) / 2), int((ya + yb) / 2)
        half = int(math.hypot(xa - xb, ya - yb) / 2)
        t = math.radians(int(math.degrees(math.atan2(ya - yb, xa - xb))))
        u = (xs - cx) * math.cos(t) + (ys - cy) * math.sin(t)
        v = -(xs - cx) * math.sin(t) + (ys - cy) * math.cos(t)
        inside = (u / (half + 0.5)) ** 2 + (v / 4.5) ** 2 <= 1
        canvas[inside] = 0.4 * canvas[inside] + 0.6 * rgb(i)
    return canvas


def test_full_pose_matches_an_independent_drawing_and_is_pinned():
    pose = pose_with(FULL)
    canvas = draw_skeleton(pose)
    reference = independent_drawing(pose)
    lit, ref_lit = canvas.sum(axis=2) > 0, reference.sum(axis=2) > 0
    assert (lit & ref_lit).sum() / (lit | ref_lit).sum() > 0.93  # same shapes up to rasterisation at the edges
    close = np.abs(canvas.astype(float) - reference).max(axis=2) <= 2
    assert close[lit & ref_lit].mean() > 0.9  # and the same blended colours inside
    # Regression pin of the exact OpenCV rasterisation (changes only if the drawing recipe changes).
    assert hashlib.sha256(canvas.tobytes()).hexdigest()[:16] == PINNED_SHA


PINNED_SHA = "73cdcd28787eec4c"


def test_rendering_follows_the_output_size():
    pose = pose_with(FULL)
    big = draw_skeleton(pose, 512, 352)
    assert big.shape == (512, 352, 3)
    assert big[82, 176].tolist() == draw_skeleton(pose.resized(512, 352))[82, 176].tolist() != [0, 0, 0]


def test_heatmaps_peak_at_joints_with_sigma_scaled_by_height():
    pose = pose_with({0: (88, 41), 4: (60.5, 130.5)})
    maps = heatmaps(pose)
    assert maps.shape == (18, 256, 176) and maps.dtype == np.float32
    assert maps[0, 41, 88] == 1 and maps[[1, 2, 3]].max() == 0
    assert maps[0, 41, 94] == np.float32(math.exp(-0.5))  # one sigma (6 px) away
    big = heatmaps(pose, 512, 352)
    assert big[0, 82, 176 + 12] == np.float32(math.exp(-0.5))  # sigma 12 px at 512x352
    assert np.unravel_index(maps[4].argmax(), maps[4].shape) in {(130, 60), (130, 61), (131, 60), (131, 61)}
