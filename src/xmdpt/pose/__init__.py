"""Poses: OpenPose COCO-18 keypoints and their file formats, rendering, and extraction from photos."""

from xmdpt.pose.keypoints import FLIP_PERMUTATION, JOINT_NAMES, NUM_JOINTS, Pose
from xmdpt.pose.render import draw_skeleton, heatmaps, skeleton_tensor

__all__ = ["FLIP_PERMUTATION", "JOINT_NAMES", "NUM_JOINTS", "Pose", "draw_skeleton", "heatmaps", "skeleton_tensor"]
