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
from dataclasses import dataclass
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
    (root / "broken.json").write_text('{"height": 256, "width": 176, "keypoints": [[1, 2')
    Image.new("RGB", (300, 400), (90, 140, 200)).save(root / "nobody.png")
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")
    Image.fromarray(skimage_data.astronaut()).save(root / "astronaut.png")
    (root / "huge.png").write_bytes(os.urandom(1_300_000))  # over the server's 1 MB limit
    return root


@dataclass
class Served:
    url: str
    log: Path  # the server's stdout and stderr
    uploads: Path  # Gradio's temporary folder for uploads (GRADIO_TEMP_DIR)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`xmdpt serve` with no --model: the default model, here the tiny pipeline through XMDPT_DEFAULT_MODEL, so that
    the page shows the embedded model's notice."""
    model = save_tiny_default(tmp_path_factory.mktemp("model") / "tiny", steps=3)
    uploads = tmp_path_factory.mktemp("gradio-uploads")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "XMDPT_DEFAULT_MODEL": str(model), "GRADIO_TEMP_DIR": str(uploads)}  # fmt: skip
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xmdpt", "serve", "--port", str(port), "--max-upload-mb", "1"],
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
    yield Served(url, log, uploads)
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
    page.goto(server.url)
    page.wait_for_selector("#reference input[type=file]", state="attached")
    yield page
    context.close()


def upload(page, elem_id: str, path: Path) -> None:
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))


def status_says(page, text: str) -> None:
    sync_api.expect(page.locator("#status")).to_contain_text(text, timeout=STEP_TIMEOUT_MS)


def pick_a_gallery_pose(page) -> None:
    page.locator("#gallery button.thumbnail-item").first.click()
    status_says(page, "Target pose ready")
    sync_api.expect(page.locator("#pose-preview img")).to_have_count(1)


@needs_browser
@pytest.mark.slow
def test_upload_pick_a_pose_generate_and_download(page, files):
    upload(page, "reference", files / "person.png")
    status_says(page, "Reference photo ready")
    pick_a_gallery_pose(page)
    page.locator("#generate").click()
    status_says(page, f"download it at full size ({SIZE[1]}x{SIZE[0]} pixels)")
    sync_api.expect(page.locator("#download")).to_contain_text(f"Download at full size ({SIZE[1]}x{SIZE[0]} pixels)")
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
def test_bad_uploads_get_a_message_not_a_traceback(page, files, server):
    upload(page, "reference", files / "garbage.png")
    status_says(page, "garbage.png: not a readable image")
    page.locator("#generate").click()
    status_says(page, "garbage.png: not a readable image")
    assert str(server.uploads) not in page.locator("#status").inner_text()  # Gradio's temp folder is not shown
    page.get_by_role("tab", name="Keypoint file").click()
    upload(page, "keypoints", files / "short.json")
    status_says(page, "the keypoint file short.json is not valid: 'keypoints' must list 18 joints")
    assert str(server.uploads) not in page.locator("#status").inner_text()
    assert "Traceback" not in page.content()


@needs_browser
@pytest.mark.slow
def test_a_rejected_pose_upload_clears_the_previous_pose(page, files):
    upload(page, "reference", files / "person.png")
    status_says(page, "Reference photo ready")
    pick_a_gallery_pose(page)
    page.get_by_role("tab", name="Keypoint file").click()
    upload(page, "keypoints", files / "short.json")
    status_says(page, "No target pose now")
    sync_api.expect(page.locator("#pose-preview img")).to_have_count(0)
    page.locator("#generate").click()
    status_says(page, "give a target pose first")  # not a result made with the gallery pose
    sync_api.expect(page.locator("#result img")).to_have_count(0)


@needs_browser
@pytest.mark.slow
def test_generate_shows_one_progress_bar(page, files):
    upload(page, "reference", files / "person.png")
    status_says(page, "Reference photo ready")
    pick_a_gallery_pose(page)
    # Count Gradio's progress texts ("processing | 0.1s", "2/3 steps") at every change of the page while it runs.
    page.evaluate(
        """() => { window.mostProgress = 0; window.progressOn = new Set();
        new MutationObserver(() => { const bars = document.querySelectorAll('.progress-text');
          window.mostProgress = Math.max(window.mostProgress, bars.length);
          bars.forEach(bar => window.progressOn.add((bar.closest('[id]') || {}).id)); })
        .observe(document.body, {subtree: true, childList: true, characterData: true}); }"""
    )
    page.locator("#generate").click()
    status_says(page, "Done")
    most, where = page.evaluate("() => [window.mostProgress, [...window.progressOn]]")
    assert (most, where) == (1, ["result"])


@needs_browser
@pytest.mark.slow
def test_the_embedded_model_says_what_it_is(page):
    notice = page.locator("#notice")
    sync_api.expect(notice).to_be_visible()
    sync_api.expect(notice).to_contain_text(f"trained only on synthetic {SIZE[0]}x{SIZE[1]} figures")
    sync_api.expect(notice).to_contain_text("xmdpt serve --model FOLDER")
    sync_api.expect(notice).to_contain_text("Use a real model")


@needs_browser
@pytest.mark.slow
def test_the_console_says_where_the_page_is_and_offers_no_share_link(page, server):
    log = server.log.read_text()
    assert f"the page is at {server.url}" in log
    assert "share=True" not in log and "public link" not in log
    assert "HTTP Request" not in log  # nor the requests Gradio makes to itself while it starts


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
        (lambda r, f: r.pose_from_keypoints(f / "short.json"), "keypoint file short.json is not valid: 'keypoints'"),
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


@pytest.mark.parametrize(
    "name, source, call, message",
    [
        ("photo.jpg", "garbage.png", lambda r, p: r.reference(p), "photo.jpg: not a readable image"),
        ("dance.png", "garbage.png", lambda r, p: r.pose_from_photo(p), "dance.png: not a readable image"),
        (
            "pose.json",
            "broken.json",
            lambda r, p: r.pose_from_keypoints(p),
            "the keypoint file pose.json is not valid",
        ),
    ],
)
def test_errors_name_the_upload_as_the_user_did(reposer, files, tmp_path, name, source, call, message):
    """Gradio keeps an upload as <temp folder>/<hash>/<the user's file name>; only that name may show."""
    from xmdpt.errors import InputError

    folder = tmp_path / "gradio" / "0f3c9a77e1d2b5c4a8e6f1d0b9c7a5e3d2c1b0a9"
    folder.mkdir(parents=True)
    shutil.copy(files / source, folder / name)
    with pytest.raises(InputError) as caught:
        call(reposer, folder / name)
    assert str(caught.value).startswith(message)
    assert str(tmp_path) not in str(caught.value) and folder.name not in str(caught.value)


def handler(page, name: str):
    return next(fn.fn for fn in page.fns.values() if fn.name == name)


@pytest.fixture(scope="module")
def app(reposer):
    pytest.importorskip("gradio", reason="the web page needs Gradio: pip install 'xmdpt[app]'")
    from xmdpt.app import build_app, queued

    return queued(build_app(reposer), max_queue=4)


def test_a_rejected_pose_clears_the_pose_state_and_preview(app, files):
    state, preview, status = handler(app, "on_keypoints")(str(files / "pose.json"))
    assert state is not None and preview is not None and "Target pose ready" in status
    for name, bad in (("on_keypoints", files / "short.json"), ("on_driving", files / "garbage.png")):
        state, preview, status = handler(app, name)(str(bad))
        assert (state, preview) == (None, None), name  # not gr.update(): the old pose must not stay
        assert status.startswith("**Error:**") and "No target pose now" in status


def test_each_event_shows_its_progress_once(app):
    for fn in app.fns.values():
        assert len(fn.show_progress_on or fn.outputs) == 1, fn.name  # Gradio shows progress on every output


def test_launch_offers_no_share_link(reposer, monkeypatch, capsys):
    pytest.importorskip("gradio", reason="the web page needs Gradio: pip install 'xmdpt[app]'")
    import gradio as gr

    from xmdpt import app as app_module

    calls = {}

    def fake_launch(self, **kwargs):
        calls.update(kwargs)
        return None, "http://127.0.0.1:7860/", None

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    app_module.launch(reposer, port=7860)
    # quiet: Gradio prints "To create a public link, set `share=True`" unless told to be quiet
    assert calls["share"] is False and calls["quiet"] is True
    assert calls["state_session_capacity"] == app_module.MAX_SESSIONS  # the sessions' memory is bounded
    assert capsys.readouterr().out == "xmdpt serve: the page is at http://127.0.0.1:7860/ (Ctrl+C stops it)\n"


@pytest.mark.parametrize("model", [None, "some/folder"])
def test_serve_gives_the_page_the_embedded_model_notice(monkeypatch, model):
    pytest.importorskip("gradio", reason="the web page needs Gradio: pip install 'xmdpt[app]'")
    from tiny_pipeline import tiny_pipeline

    from xmdpt import app as app_module
    from xmdpt import default_model
    from xmdpt.cli.serve import serve

    served = []
    monkeypatch.setattr(default_model, "load_pipeline", lambda model, device: tiny_pipeline())
    monkeypatch.setattr(app_module, "launch", lambda r, **kwargs: served.append(r))
    serve(model=model)
    notice = served[0].notice
    if model is None:
        assert f"trained only on synthetic {SIZE[0]}x{SIZE[1]} figures" in notice
        assert "xmdpt serve --model FOLDER" in notice and "Use a real model" in notice
    else:
        assert notice is None
    assert served[0].output_size == f"{SIZE[1]}x{SIZE[0]} pixels"
