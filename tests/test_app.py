"""The web page in a real browser: `xmdpt serve` in a subprocess, driven by headless Chromium through Playwright;
and the page's logic (`Reposer`) without one.

The browser tests need Debian's `chromium` (apt-get install chromium) and `pip install 'xmdpt[app]' playwright`, and
are skipped, with that reason, where either is missing. Playwright's own browser download cannot work offline, so it
drives the system Chromium through `executable_path`. Every wait is bounded.
"""

import importlib.util
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_pipeline import SIZE, save_tiny_default

from xmdpt.data.synthetic import draw_figure, make_identity, random_pose
from xmdpt.pose.keypoints import Pose

CHROMIUM = os.environ.get("XMDPT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def missing_for_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for module, hint in (("gradio", "pip install 'xmdpt[app]'"), ("playwright", "pip install playwright")):
        if importlib.util.find_spec(module) is None:
            return f"the browser test needs {module} ({hint})"
    if not Path(CHROMIUM).is_file():
        return "the browser test needs Debian's chromium (apt-get install chromium)"
    return None


MISSING = missing_for_browser()
needs_browser = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
needs_mediapipe = pytest.mark.skipif(
    importlib.util.find_spec("mediapipe") is None, reason="pose extraction needs mediapipe 0.10.21 (xmdpt[pose])"
)
if MISSING is None:
    from playwright import sync_api

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
START_TIMEOUT_S = 120
STEP_TIMEOUT_MS = 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    identity = make_identity(0, 4)
    pose, front = random_pose(identity, np.random.default_rng([0, 4, 1]), (256, 176))
    Image.fromarray(draw_figure(identity, pose, front)[0]).save(root / "person.png")
    pose.save_json(root / "pose.json")
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image at all" * 10)
    (root / "short.json").write_text('{"height": 256, "width": 176, "keypoints": [[1, 2]]}')
    Image.new("RGB", (300, 400), (90, 140, 200)).save(root / "nobody.png")
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")
    Image.fromarray(skimage_data.astronaut()).save(root / "astronaut.png")
    (root / "huge.png").write_bytes(os.urandom(1_300_000))  # over the server's 1 MB limit
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = save_tiny_default(tmp_path_factory.mktemp("model") / "tiny", steps=3)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xmdpt",
                "serve",
                "--model",
                str(model),
                "--port",
                str(port),
                "--max-upload-mb",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"xmdpt serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=STEP_TIMEOUT_MS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(server)
    page.wait_for_selector("#reference input[type=file]", state="attached")
    yield page
    context.close()


def upload(page, elem_id: str, path: Path) -> None:
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))


def status_says(page, text: str) -> None:
    sync_api.expect(page.locator("#status")).to_contain_text(text, timeout=STEP_TIMEOUT_MS)


@needs_browser
@pytest.mark.slow
def test_upload_pick_a_pose_generate_and_download(page, files):
    upload(page, "reference", files / "person.png")
    status_says(page, "Reference photo ready")
    page.locator("#gallery button.thumbnail-item").first.click()
    status_says(page, "Target pose ready")
    sync_api.expect(page.locator("#pose-preview img")).to_have_count(1)
    page.locator("#generate").click()
    status_says(page, "Done")
    result = page.locator("#result img")
    sync_api.expect(result).to_have_count(1)
    shown = result.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert shown[0] * SIZE[0] == shown[1] * SIZE[1] and shown[1] >= SIZE[0]  # enlarged for display, same aspect
    body = page.request.get(page.locator("#download a").first.get_attribute("href")).body()
    assert Image.open(io.BytesIO(body)).size == (SIZE[1], SIZE[0])  # the download is the model's output


@needs_browser
@pytest.mark.slow
def test_keypoint_file_gives_the_pose(page, files):
    upload(page, "reference", files / "person.png")
    page.get_by_role("tab", name="Keypoint file").click()
    upload(page, "keypoints", files / "pose.json")
    joints = int(Pose.load_json(files / "pose.json").present.sum())
    status_says(page, f"Target pose ready ({joints} of 18 joints)")
    page.locator("#generate").click()
    status_says(page, "Done")
    sync_api.expect(page.locator("#result img")).to_have_count(1)


@needs_browser
@pytest.mark.slow
def test_bad_uploads_get_a_message_not_a_traceback(page, files):
    upload(page, "reference", files / "garbage.png")
    status_says(page, "not a readable image")
    page.locator("#generate").click()
    status_says(page, "not a readable image")
    page.get_by_role("tab", name="Keypoint file").click()
    upload(page, "keypoints", files / "short.json")
    status_says(page, "keypoint file is not valid: 'keypoints' must list 18 joints")
    assert "Traceback" not in page.content()


@needs_browser
@pytest.mark.slow
def test_oversized_upload_and_missing_pose(page, files):
    upload(page, "reference", files / "huge.png")
    # Gradio refuses the upload itself (max_file_size) and says so on the page
    sync_api.expect(page.get_by_text("exceed the maximum allowed size").first).to_be_visible()
    upload(page, "reference", files / "person.png")
    status_says(page, "Reference photo ready")
    page.locator("#generate").click()
    status_says(page, "give a target pose first")


@needs_browser
@needs_mediapipe
@pytest.mark.slow
@pytest.mark.parametrize("photo, message", [("astronaut.png", "Target pose ready"), ("nobody.png", "no person found")])
def test_driving_photo(page, files, photo, message):
    page.get_by_role("tab", name="Driving photo").click()
    upload(page, "driving", files / photo)
    status_says(page, message)


# ---- the page's logic without a browser --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reposer():
    from tiny_pipeline import tiny_pipeline

    from xmdpt.app import Reposer

    return Reposer(tiny_pipeline(), num_inference_steps=2, max_upload_mb=1)


def test_reposer_generates_from_a_gallery_pose(reposer, files):
    assert len(reposer.poses) >= 8
    image, path = reposer.generate(files / "person.png", reposer.gallery_pose(0), steps=2, seed=1)
    assert image.size == (SIZE[1], SIZE[0])
    assert Image.open(path).size == image.size
    again, _ = reposer.generate(files / "person.png", reposer.gallery_pose(0), steps=2, seed=1)
    assert np.array_equal(np.asarray(again), np.asarray(image))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r, f: r.reference(f / "huge.png"), "the limit is 1 MB"),
        (lambda r, f: r.reference(f / "garbage.png"), "not a readable image"),
        (lambda r, f: r.reference(None), "upload a reference photo first"),
        (lambda r, f: r.pose_from_keypoints(f / "short.json"), "keypoint file is not valid: 'keypoints' must list"),
        (lambda r, f: r.pose_from_keypoints(f / "person.png"), "our JSON (.json) or a PIDM text file"),
        (lambda r, f: r.gallery_pose(99), "no gallery pose 99"),
        (lambda r, f: r.generate(f / "person.png", None), "give a target pose first"),
        (lambda r, f: r.generate(f / "person.png", r.gallery_pose(0), steps=0), "steps must lie in"),
    ],
)
def test_reposer_turns_bad_input_into_one_sentence(reposer, files, call, message):
    from xmdpt.errors import InputError

    with pytest.raises(InputError, match=re.escape(message)):
        call(reposer, files)


def test_the_page_builds_with_a_queue_of_one(reposer):
    pytest.importorskip("gradio", reason="the web page needs Gradio: pip install 'xmdpt[app]'")
    from xmdpt.app import build_app, queued

    page = queued(build_app(reposer), max_queue=4)
    assert {fn.name for fn in page.fns.values()} >= {"on_reference", "on_driving", "on_keypoints", "on_generate"}
    assert all(fn.concurrency_limit == "default" for fn in page.fns.values())  # none opts out of the queue's 1
    assert (page._queue.default_concurrency_limit, page._queue.max_size) == (1, 4)
