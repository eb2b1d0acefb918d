"""The web page (`xmdpt serve`): upload a reference photo, give a target pose, generate, download.

`Reposer` is everything behind the page in plain Python (checks, pose sources, sampling), so it is tested without a
browser; `build_app` wires it into a Gradio `Blocks` page. Every bad upload (too big, not an image, no person in a
driving photo, a malformed keypoint file) becomes one sentence in the page's status line, never a stack trace, and
names the upload as the user named it, never by the server's temporary path; any other failure is logged on the
server and reported as an internal error. A rejected pose upload clears the previous pose, so Generate cannot go on
with a pose the user meant to replace. Requests queue one at a time (`default_concurrency_limit=1`): sampling already
uses every core, parallel requests would only slow each other.

Gradio is an optional extra: `pip install 'xmdpt[app]'`.
"""

# No `from __future__ import annotations` here: Gradio reads the handlers' annotations at run time to pass
# `gr.SelectData`, and a string annotation naming a local import cannot be resolved.
import logging
import tempfile
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from xmdpt.data.images import load_image
from xmdpt.errors import InputError
from xmdpt.examples import EXAMPLE_POSES_DIR
from xmdpt.inputs import PoseReader, fit_pose, is_keypoint_file, load_pose_file
from xmdpt.pose.keypoints import Pose
from xmdpt.pose.render import draw_skeleton

log = logging.getLogger(__name__)

MAX_UPLOAD_MB = 10
MAX_STEPS = 200
PREVIEW_SIZE = (256, 176)  # skeleton previews and gallery thumbnails, (height, width)
DISPLAY_HEIGHT = 256  # small results are shown enlarged to about this height (the download keeps the true size)
# Gradio keeps a copy of the page's state for each browser session (about 45 KiB here, the gallery's file list
# included) and forgets the least recently used beyond this many: 1000 bound it near 45 MiB, where Gradio's own
# 10000 let it grow by about 450 MiB. A session forgotten this way has lost only its picked pose.
MAX_SESSIONS = 1000


def gallery_poses(folder: Path = EXAMPLE_POSES_DIR) -> list[tuple[str, Pose]]:
    """The shipped example poses (our JSON), by file name."""
    return [(path.stem, Pose.load_json(path)) for path in sorted(folder.glob("*.json"))]


def enlarged(image: Image.Image, height: int = DISPLAY_HEIGHT) -> Image.Image:
    """`image` scaled by a whole factor (nearest neighbour: the pixels stay honest) to about `height`."""
    factor = max(1, height // image.height)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def skeleton_image(pose: Pose, size: tuple[int, int] = PREVIEW_SIZE) -> Image.Image:
    """A preview of a pose: its skeleton in a frame of `size`, the aspect kept (padded) as the model will see it."""
    return Image.fromarray(draw_skeleton(fit_pose(pose, size, "pad")))


@contextmanager
def named_as_uploaded(path: Path):
    """Input errors about the upload at `path` name it as the user did: Gradio keeps an upload under its original
    file name inside a hashed temporary folder (`/tmp/gradio/<hash>/photo.jpg`), and that folder means nothing to
    the user (and tells them about the server's disk)."""
    try:
        yield
    except InputError as err:
        text = str(err)
        for long in {str(path), str(path.absolute()), path.as_posix()}:
            text = text.replace(long, path.name)
        text = text.replace(str(path.parent), "the upload folder")  # any mention of the folder alone
        raise InputError(text) from None


@dataclass
class Reposer:
    """The page's logic: upload checks, pose sources and generation over one loaded pipeline."""

    pipe: object  # an XMDPTPipeline: it brings its own sampling settings
    num_inference_steps: int | None = None  # the page's initial steps; None: the model's
    max_upload_mb: float = MAX_UPLOAD_MB
    fit: str = "pad"
    notice: str | None = None  # shown at the top of the page (e.g. what the embedded default model cannot do)

    def __post_init__(self) -> None:
        self.poses = gallery_poses()
        self._poses = PoseReader()  # opens MediaPipe on the first driving photo and keeps it for the next ones
        self._lock = threading.Lock()  # MediaPipe's graph and the sampler are not for concurrent use
        self.out_dir = Path(tempfile.mkdtemp(prefix="xmdpt-app-"))
        if self.num_inference_steps is None:
            self.num_inference_steps = self.pipe.config.num_inference_steps

    @property
    def output_size(self) -> str:
        """The size of a generated image, as a user reads it: "48x64 pixels" (width x height)."""
        height, width = self.pipe.image_size
        return f"{width}x{height} pixels"

    # ---- uploads ------------------------------------------------------------------------------------------------
    def check_upload(self, path: str | Path | None, what: str) -> Path:
        if not path:
            raise InputError(f"upload a {what} first")
        path = Path(path)
        if not path.is_file():
            raise InputError(f"the {what} upload is gone; upload it again")
        size = path.stat().st_size
        if size > self.max_upload_mb * 1024 * 1024:
            raise InputError(f"the {what} is {size / 2**20:.1f} MB; the limit is {self.max_upload_mb:g} MB")
        return path

    def reference(self, path: str | Path | None) -> Image.Image:
        """The uploaded reference photo, checked and decoded (EXIF-rotated RGB)."""
        path = self.check_upload(path, "reference photo")
        with named_as_uploaded(path):
            return load_image(path)

    def pose_from_photo(self, path: str | Path | None) -> Pose:
        """Keypoints of the person in an uploaded driving photo."""
        path = self.check_upload(path, "driving photo")
        with named_as_uploaded(path):
            image = load_image(path)
        with self._lock:
            return self._poses.photo(image, "the driving photo")

    def pose_from_keypoints(self, path: str | Path | None) -> Pose:
        path = self.check_upload(path, "keypoint file")
        if not is_keypoint_file(path):
            raise InputError("a keypoint file is our JSON (.json) or a PIDM text file (.txt)")
        try:
            with named_as_uploaded(path):
                return load_pose_file(path)
        except InputError as err:
            reason = str(err).removeprefix(path.name + ": ")
            raise InputError(f"the keypoint file {path.name} is not valid: {reason}") from None

    def gallery_pose(self, index: int) -> Pose:
        if not 0 <= index < len(self.poses):
            raise InputError(f"there is no gallery pose {index}")
        return self.poses[index][1]

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, reference_path, pose: Pose | None, steps: int | None = None, seed: int = 0):
        """(generated image, path of its PNG for download)."""
        reference = self.reference(reference_path)
        if pose is None:
            raise InputError("give a target pose first: pick one from the gallery, or upload a photo or keypoints")
        steps = self.num_inference_steps if steps is None else int(steps)
        if not 1 <= steps <= MAX_STEPS:
            raise InputError(f"steps must lie in 1..{MAX_STEPS}")
        with self._lock:
            image = self.pipe(reference, pose, num_inference_steps=steps, seed=int(seed), fit=self.fit).images[0]
        path = self.out_dir / f"xmdpt-{uuid.uuid4().hex[:8]}.png"
        image.save(path)
        return image, path


def pose_to_state(pose: Pose) -> dict:
    return pose.to_json()


def pose_from_state(state: dict | None) -> Pose | None:
    return Pose.from_json(state, "pose") if state else None


def _message(err: Exception) -> str:
    if isinstance(err, InputError):
        return f"**Error:** {err}"
    log.exception("request failed")
    return "**Error:** internal error while processing the request (see the server log)"


def build_app(reposer: Reposer, title: str = "X-MDPT: re-pose a person"):
    """The Gradio page over `reposer`; call `.queue(...)` and `.launch(...)` on the result (see `serve`)."""
    import gradio as gr

    def on_reference(path):
        if not path:  # cleared
            return None, ""
        try:
            return reposer.reference(path), "Reference photo ready."
        except Exception as err:  # noqa: BLE001 - every failure becomes a message on the page
            return None, _message(err)

    def pose_update(make, *args):
        try:
            pose = make(*args)
        except Exception as err:  # noqa: BLE001
            # The pose asked for is refused: the previous one must not stand in for it (Generate would use it).
            return None, None, f"{_message(err)}<br>No target pose now: pick one or upload another."
        joints = int(pose.present.sum())
        return pose_to_state(pose), skeleton_image(pose), f"Target pose ready ({joints} of 18 joints)."

    def on_driving(path):
        return pose_update(reposer.pose_from_photo, path) if path else (gr.update(), gr.update(), "")

    def on_keypoints(path):
        return pose_update(reposer.pose_from_keypoints, path) if path else (gr.update(), gr.update(), "")

    def on_gallery(evt: gr.SelectData):
        return pose_update(reposer.gallery_pose, int(evt.index))

    def on_generate(reference_path, state, steps, seed, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        progress(0, desc="conditioning")
        try:
            image, path = reposer.generate(reference_path, pose_from_state(state), steps, seed)
        except Exception as err:  # noqa: BLE001
            return None, None, _message(err)
        return (
            enlarged(image),
            str(path),
            f"Done: the result is below (enlarged); download it at full size ({reposer.output_size}).",
        )

    with gr.Blocks(title=title) as page:
        gr.Markdown(
            f"# {title}\nUpload a photo of a person, give the target pose (pick one from the gallery, upload a "
            f"driving photo, or upload a keypoint file), and generate. Uploads up to {reposer.max_upload_mb:g} MB."
        )
        if reposer.notice:
            gr.Markdown(f"**Note:** {reposer.notice}", elem_id="notice")
        pose_state = gr.State(None)
        with gr.Row():
            with gr.Column():
                reference = gr.File(
                    label="Reference photo", file_types=["image"], type="filepath", elem_id="reference"
                )
                reference_preview = gr.Image(label="Reference", interactive=False, height=256, elem_id="ref-preview")
            with gr.Column():
                with gr.Tab("Gallery"):
                    gallery = gr.Gallery(
                        value=[(skeleton_image(p), name) for name, p in reposer.poses],
                        label="Example poses",
                        columns=3,
                        object_fit="contain",
                        allow_preview=False,
                        interactive=False,
                        elem_id="gallery",
                    )
                with gr.Tab("Driving photo"):
                    driving = gr.File(label="Photo of someone in the target pose", file_types=["image"],
                                      type="filepath", elem_id="driving")  # fmt: skip
                with gr.Tab("Keypoint file"):
                    keypoints = gr.File(label="Keypoints: our JSON or a PIDM .txt", file_types=[".json", ".txt"],
                                        type="filepath", elem_id="keypoints")  # fmt: skip
                pose_preview = gr.Image(label="Target pose", interactive=False, height=256, elem_id="pose-preview")
            with gr.Column():
                steps = gr.Slider(1, MAX_STEPS, value=reposer.num_inference_steps, step=1, label="Steps")
                seed = gr.Number(value=0, precision=0, label="Seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown("", elem_id="status")  # beside the button: every outcome is told here
                result = gr.Image(
                    label="Result",
                    type="pil",
                    format="png",
                    interactive=False,
                    height=DISPLAY_HEIGHT,
                    elem_id="result",
                )
                download = gr.File(
                    label=f"Download at full size ({reposer.output_size})", interactive=False, elem_id="download"
                )

        # One progress indicator per event, on the image it is making: by default Gradio puts one on every output.
        reference.change(on_reference, reference, [reference_preview, status], show_progress_on=reference_preview)
        for upload, handler in ((driving, on_driving), (keypoints, on_keypoints)):
            upload.change(handler, upload, [pose_state, pose_preview, status], show_progress_on=pose_preview)
        gallery.select(on_gallery, None, [pose_state, pose_preview, status], show_progress_on=pose_preview)
        button.click(
            on_generate, [reference, pose_state, steps, seed], [result, download, status], show_progress_on=result
        )
    return page


def queued(page, max_queue: int = 16):
    """Every event of `page` through one queue, one request at a time, at most `max_queue` waiting."""
    return page.queue(default_concurrency_limit=1, max_size=max_queue)


def launch(reposer: Reposer, host: str = "127.0.0.1", port: int = 7860, max_queue: int = 16) -> None:
    """Serve the page until interrupted: one request at a time, at most `max_queue` waiting.

    Gradio's own startup lines are silenced (`quiet`): among them is a hint to set `share=True`, a public tunnel that
    this offline server never opens. One line of ours says where the page is."""
    page = queued(build_app(reposer), max_queue)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's requests to itself while it starts
    _, local_url, _ = page.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{int(reposer.max_upload_mb * 1024)}kb",
        show_error=False,  # messages come from the handlers; nothing else leaks to the page
        share=False,
        quiet=True,
        state_session_capacity=MAX_SESSIONS,
        prevent_thread_lock=True,  # so that our line comes once the server listens
    )
    print(f"xmdpt serve: the page is at {local_url} (Ctrl+C stops it)", flush=True)
    page.block_thread()
