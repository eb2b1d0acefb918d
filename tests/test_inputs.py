"""Input preparation: every form of reference and pose lands in the model's frame, the pose on the person."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipeline import SIZE, tiny_pipeline

from xmdpt.data.synthetic import draw_figure, make_identity, random_pose
from xmdpt.errors import InputError
from xmdpt.inputs import fit_pose, prepare_inputs, reference_tensor
from xmdpt.pose.extract import fit_image
from xmdpt.pose.keypoints import Pose
from xmdpt.pose.render import skeleton_tensor

try:
    import mediapipe  # noqa: F401

    MEDIAPIPE = True
except ImportError:
    MEDIAPIPE = False
needs_mediapipe = pytest.mark.skipif(not MEDIAPIPE, reason="mediapipe 0.10.21 is not installed (xmdpt[pose])")


def figure(size=(256, 176), index=1, k=0):
    """A synthetic person (PIL) and its keypoints in the image's frame."""
    identity = make_identity(0, index)
    pose, front = random_pose(identity, np.random.default_rng([0, index, k]), size)
    return Image.fromarray(draw_figure(identity, pose, front)[0]), pose


@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
@pytest.mark.parametrize("source", [(300, 120), (90, 200), (64, 48)])
def test_fit_pose_follows_fit_image(fit, source):
    """A marker drawn at a joint ends up where `fit_pose` puts that joint, whatever the aspect change."""
    height, width = source
    rng = np.random.default_rng(height)
    xy = np.full((18, 2), np.nan)
    xy[0] = [rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height]
    pose = Pose(xy, height, width)
    canvas = np.zeros((height, width, 3), np.uint8)
    x, y = (int(round(v)) for v in xy[0])
    canvas[y - 2 : y + 3, x - 2 : x + 3] = (255, 0, 0)  # red: told apart from the white margins of "pad"
    out = np.asarray(fit_image(Image.fromarray(canvas), (64, 44), fit)).astype(int)
    ys, xs = np.nonzero((out[..., 0] > 100) & (out[..., 0] - out[..., 1] > 60))
    moved = fit_pose(pose, (64, 44), fit)
    assert (moved.height, moved.width) == (64, 44)
    np.testing.assert_allclose(moved.xy[0], [xs.mean(), ys.mean()], atol=1.5)


def test_reference_from_pil_path_and_tensor_agree(tmp_path):
    image, _ = figure()
    image.save(tmp_path / "ref.png")
    from_pil = reference_tensor(image, SIZE)
    from_path = reference_tensor(tmp_path / "ref.png", SIZE)
    assert from_pil.shape == (1, 3, *SIZE) and from_pil.min() >= -1 and from_pil.max() <= 1
    torch.testing.assert_close(from_pil, from_path, rtol=0, atol=0)
    torch.testing.assert_close(reference_tensor(from_pil[0], SIZE), from_pil)  # (3, H, W) gains the batch axis
    with pytest.raises(InputError, match=r"expected \[-1, 1\]"):
        reference_tensor(from_pil * 255, SIZE)
    with pytest.raises(InputError, match="image file not found"):
        reference_tensor(tmp_path / "missing.png", SIZE)


def test_pose_from_keypoints_json_and_pidm_text_agree(tmp_path):
    _, pose = figure()  # 256x176, the PIDM text's frame
    pose.save_json(tmp_path / "pose.json")
    (tmp_path / "pose.txt").write_text(pose.to_pidm_text())
    image, _ = figure()
    ref, from_pose = prepare_inputs(image, pose, SIZE)
    for path in ("pose.json", "pose.txt", str(tmp_path / "pose.json")):
        _, from_file = prepare_inputs(image, tmp_path / path, SIZE)
        torch.testing.assert_close(from_file, from_pose, rtol=0, atol=0)
    assert ref.shape == from_pose.shape == (1, 3, *SIZE)
    _, same_aspect = figure((64, 48))
    _, scaled = prepare_inputs(image, same_aspect, SIZE)
    torch.testing.assert_close(scaled[0], skeleton_tensor(same_aspect.resized(*SIZE)))  # same aspect: pure scaling


def test_wrong_pose_files_are_input_errors(tmp_path):
    image, _ = figure()
    (tmp_path / "short.json").write_text('{"height": 10, "width": 10, "keypoints": [[1, 2]]}')
    (tmp_path / "short.txt").write_text("1 2\n3 4\n")
    (tmp_path / "notes.md").write_text("hello")
    for name, message in (
        ("short.json", "must list 18 joints"),
        ("short.txt", "expected 18 rows"),
        ("notes.md", "not a readable image"),
        ("missing.json", "not found"),
    ):
        with pytest.raises(InputError, match=message):
            prepare_inputs(image, tmp_path / name, SIZE)


def test_batches_broadcast_one_reference_and_refuse_mismatches():
    (a, pose_a), (b, pose_b) = figure(index=1), figure(index=2)
    ref, pose = prepare_inputs(a, [pose_a, pose_b], SIZE)
    assert ref.shape == pose.shape == (2, 3, *SIZE)
    torch.testing.assert_close(ref[0], ref[1])
    ref, pose = prepare_inputs([a, b], [pose_a, pose_b], SIZE)
    assert not torch.equal(ref[0], ref[1]) and not torch.equal(pose[0], pose[1])
    with pytest.raises(InputError, match="fit"):
        prepare_inputs(a, pose_a, SIZE, fit="zoom")


def test_pipeline_takes_images_poses_and_files_like_the_tensors(tmp_path):
    pipe = tiny_pipeline()
    (a, pose_a), (b, pose_b) = figure(index=1), figure(index=2, k=3)
    a.save(tmp_path / "a.png")
    pose_b.save_json(tmp_path / "b.json")
    ref, pose = prepare_inputs([a, b], [pose_a, pose_b], SIZE)

    def run(reference, target):
        g = torch.Generator().manual_seed(0)
        return pipe(reference, target, num_inference_steps=3, generator=g, output_type="pt", progress=False).images

    expected = run(ref, pose)
    torch.testing.assert_close(run([tmp_path / "a.png", b], [pose_a, tmp_path / "b.json"]), expected)
    images = pipe([a, b], [pose_a, pose_b], num_inference_steps=3, progress=False).images
    assert [im.size for im in images] == [(SIZE[1], SIZE[0])] * 2
    with pytest.raises(InputError, match="2 reference images but 3 poses"):
        pipe([a, b], [pose_a, pose_b, pose_a], progress=False)
    with pytest.raises(InputError, match="output_type"):
        pipe(a, pose_a, output_type="np", progress=False)


@needs_mediapipe
def test_driving_photo_gives_the_pose_of_the_person_in_it(tmp_path):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")
    photo = Image.fromarray(skimage_data.astronaut())
    photo.save(tmp_path / "astronaut.png")
    _, from_path = prepare_inputs(photo, tmp_path / "astronaut.png", (64, 44), fit="crop")
    _, from_pil = prepare_inputs(photo, photo, (64, 44), fit="crop")
    torch.testing.assert_close(from_path, from_pil, rtol=0, atol=0)
    assert from_pil.shape == (1, 3, 64, 44) and from_pil.amax() == 1.0
    # the astronaut's head is in the upper part of the picture: so is the drawn skeleton's top
    rows = torch.nonzero(from_pil[0].sum(0) > 0)[:, 0]
    assert rows.min() < 32
    Image.new("RGB", (200, 300), (120, 160, 200)).save(tmp_path / "empty.png")
    with pytest.raises(InputError, match="no person found"):
        prepare_inputs(photo, tmp_path / "empty.png", (64, 44))
