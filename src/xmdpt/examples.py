"""The example poses shipped with the package, reachable by name from any folder: `--pose pose-02-front` on the
command line, `example_pose("pose-02-front")` in Python, and the web page's gallery."""

from __future__ import annotations

from pathlib import Path

from xmdpt.errors import InputError

EXAMPLE_POSES_DIR = Path(__file__).parent / "assets" / "poses"


def example_pose_names() -> list[str]:
    return sorted(path.stem for path in EXAMPLE_POSES_DIR.glob("*.json"))


def example_pose_path(name: str) -> Path:
    """The keypoint file of the shipped pose `name` (e.g. "pose-02-front")."""
    path = EXAMPLE_POSES_DIR / f"{name}.json"
    if name not in example_pose_names():
        raise InputError(f"{name}: no such example pose; the shipped ones are {', '.join(example_pose_names())}")
    return path


def example_pose(name: str):
    """The shipped pose `name` as a `Pose`, for `pipe(reference, example_pose("pose-02-front"))`."""
    from xmdpt.pose.keypoints import Pose

    return Pose.load_json(example_pose_path(name))


def pose_argument(path: Path) -> Path:
    """A pose given on the command line: the file itself, or, when no such file exists, the example pose so named."""
    if not path.exists() and str(path) in example_pose_names():
        return example_pose_path(str(path))
    return path
