"""The web page under load: `xmdpt serve` in a subprocess, many loopback clients at once, through Gradio's queue.

Each request is what a user does on the page: upload a small reference photo, pick a gallery pose (the pose lives in
the session's state on the server), press Generate. The clients speak Gradio's own HTTP queue protocol (the page's
JavaScript speaks the same): `POST /gradio_api/upload`, `POST /gradio_api/queue/join`, then the event stream of
`GET /gradio_api/queue/data`. A join that the full queue turns away (HTTP 503, `--max-queue`) is counted as refused
and not retried. Everything stays on 127.0.0.1 and stops by itself: every HTTP call has a timeout, every request a
deadline, and the whole run a deadline after which no new request starts.

Reported: completed (the status says "Done" and a PNG of the model's size was made), refused by the queue, errors
(anything else: an error status, a failed event, a timeout), and the server's RSS memory (psutil) before the load,
at its highest during it and after it.

    python bench/serve_load.py                                  # 200 requests from 20 clients, 5 steps, queue 16
    python bench/serve_load.py --requests 40 --clients 8 --json-out load.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

HOST = "127.0.0.1"
START_TIMEOUT_S = 180
HTTP_TIMEOUT_S = 30  # one HTTP call (connect, or silence on the event stream: Gradio sends heartbeats)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def reference_png(size: tuple[int, int] = (128, 96)) -> bytes:
    """A small synthetic person photo (the embedded model's own domain), as PNG bytes."""
    from xmdpt.data.synthetic import draw_figure, make_identity, random_pose

    identity = make_identity(0, 7)
    pose, front = random_pose(identity, np.random.default_rng([0, 7, 1]), size)
    buffer = io.BytesIO()
    Image.fromarray(draw_figure(identity, pose, front)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_mib(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


class Server:
    """`xmdpt serve` on a free loopback port, its output in a log file; stopped on exit."""

    def __init__(self, args, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/"
        self.log = workdir / "serve.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "GRADIO_TEMP_DIR": str(workdir / "uploads"), "PYTHONUNBUFFERED": "1"}  # fmt: skip
        command = [sys.executable, "-m", "xmdpt", "serve", "--host", HOST, "--port", str(self.port),
                   "--max-queue", str(args.max_queue)]  # fmt: skip
        if args.model:
            command += ["--model", args.model]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(self.url, timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"xmdpt serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


class Page:
    """The two events a generate request needs, found in the page's config by their handlers' names."""

    def __init__(self, url: str) -> None:
        config = httpx.get(url + "config", timeout=HTTP_TIMEOUT_S, trust_env=False).json()
        events = {d["api_name"]: d for d in config["dependencies"]}
        self.gallery, self.generate = events["on_gallery"], events["on_generate"]
        self.num_poses = next(len(c["props"]["value"]) for c in config["components"] if c["type"] == "gallery")


class Refused(Exception):
    """The queue was full (HTTP 503)."""


def run_event(client: httpx.Client, url: str, session: str, event: dict, data: list, event_data, deadline: float):
    """Join the queue with one event of `session` and read its stream to the end: the event's output data."""
    body = {"data": data, "event_data": event_data, "fn_index": event["id"], "trigger_id": event["targets"][0][0],
            "session_hash": session}  # fmt: skip
    joined = client.post(url + "gradio_api/queue/join", json=body)
    if joined.status_code == 503:
        raise Refused(joined.text)
    joined.raise_for_status()
    event_id = joined.json()["event_id"]
    with client.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if time.monotonic() > deadline:
                raise TimeoutError("the request's deadline passed")
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("event_id") not in (None, event_id):
                continue
            if message.get("msg") == "process_completed":
                if not message.get("success"):
                    raise RuntimeError(f"event failed: {str(message.get('output'))[:200]}")
                return message["output"]["data"]
            if message.get("msg") == "close_stream":
                break
    raise RuntimeError("the event stream ended without a result")


def one_request(i: int, url: str, page: Page, reference: bytes, steps: int, request_timeout: float) -> str:
    """One user's upload, pose pick and Generate: "completed WxH" (the downloaded PNG's size), "refused pose" or
    "refused generate" (the event the full queue turned away), or "error: ..."."""
    deadline = time.monotonic() + request_timeout
    session = uuid.uuid4().hex[:11]
    stage = "upload"
    try:
        with httpx.Client(timeout=HTTP_TIMEOUT_S, trust_env=False) as client:
            uploaded = client.post(
                url + "gradio_api/upload", files={"files": (f"person-{i}.png", reference, "image/png")}
            )
            uploaded.raise_for_status()
            reference_file = {"path": uploaded.json()[0], "orig_name": f"person-{i}.png",
                              "meta": {"_type": "gradio.FileData"}}  # fmt: skip
            pose = i % page.num_poses
            stage = "pose"
            out = run_event(client, url, session, page.gallery, [], {"index": pose, "value": None}, deadline)
            if "Target pose ready" not in out[-1]:
                return f"error: pose pick said {out[-1]!r}"
            stage = "generate"
            out = run_event(client, url, session, page.generate, [reference_file, None, steps, i], None, deadline)
            status = out[-1]
            if not status.startswith("Done") or not out[1]:
                return f"error: generate said {status[:120]!r}"
            download = client.get(out[1]["url"])
            download.raise_for_status()
            with Image.open(io.BytesIO(download.content)) as image:
                return "completed {}x{}".format(*image.size)
    except Refused:
        return f"refused {stage}"
    except Exception as err:  # noqa: BLE001 - every failure is counted, none stops the run
        return f"error: {type(err).__name__}: {str(err)[:160]}"


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
        flags = next(line for line in lscpu.splitlines() if line.startswith("Flags"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    amx = "AMX" if "amx_tile" in flags else "no AMX"
    bf16 = ", avx512_bf16" if "avx512_bf16" in flags else ""
    return f"{model}, {os.cpu_count()} cores ({amx}{bf16})"


def summary(outcomes: list[tuple[str, float]], seconds: float) -> dict:
    kinds = Counter(o.split(":")[0].split(" ")[0] if o.startswith(("error", "completed")) else o for o, _ in outcomes)
    latencies = sorted(t for o, t in outcomes if o.startswith("completed"))
    return {
        "completed": kinds["completed"],
        "refused": kinds["refused pose"] + kinds["refused generate"],
        "refused_at_pose_pick": kinds["refused pose"],
        "refused_at_generate": kinds["refused generate"],
        "errors": kinds["error"],
        "not_sent": kinds["not sent (deadline)"],
        "error_kinds": dict(Counter(o for o, _ in outcomes if o.startswith("error")).most_common(5)),
        "download_sizes": dict(
            Counter(o.removeprefix("completed ") for o, _ in outcomes if o.startswith("completed"))
        ),
        "seconds": round(seconds, 1),
        "completed_per_s": round(kinds["completed"] / seconds, 2),
        "completed_latency_s_median": round(latencies[len(latencies) // 2], 2) if latencies else None,
        "completed_latency_s_max": round(latencies[-1], 2) if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests per round")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of --requests against the same server")
    parser.add_argument("--steps", type=int, default=5, help="sampling steps per request")
    parser.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue")
    parser.add_argument("--model", default=None, help="pipeline folder; default: the embedded model")
    parser.add_argument("--request-timeout", type=float, default=300, help="seconds one request may take")
    parser.add_argument("--deadline", type=float, default=900, help="seconds after which no request starts")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    reference = reference_png()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "load_average_before": round(os.getloadavg()[0], 2),
        "requests_per_round": args.requests,
        "clients": args.clients,
        "steps": args.steps,
        "max_queue": args.max_queue,
        "model": args.model or "embedded default",
        "rounds": [],
    }
    with tempfile.TemporaryDirectory(prefix="xmdpt-serve-load-") as workdir:
        server = Server(args, Path(workdir))
        try:
            server.wait_ready()
            page = Page(server.url)
            time.sleep(2)  # let the server settle after startup
            result["rss_mib_before"] = round(rss_mib(server.ps), 1)
            peak = [result["rss_mib_before"]]
            running = threading.Event()
            running.set()

            def sample() -> None:
                while running.is_set():
                    try:
                        peak[0] = max(peak[0], rss_mib(server.ps))
                    except psutil.Error:
                        return
                    time.sleep(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            stop_at = time.monotonic() + args.deadline

            def task(i: int) -> tuple[str, float]:
                if time.monotonic() > stop_at:
                    return "not sent (deadline)", 0.0
                start = time.monotonic()
                outcome = one_request(i, server.url, page, reference, args.steps, args.request_timeout)
                return outcome, time.monotonic() - start

            for _ in range(args.rounds):
                started = time.monotonic()
                with ThreadPoolExecutor(max_workers=args.clients) as pool:
                    outcomes = list(pool.map(task, range(args.requests)))
                round_result = summary(outcomes, time.monotonic() - started)
                time.sleep(2)  # idle again
                round_result["rss_mib_after"] = round(rss_mib(server.ps), 1)
                round_result["rss_mib_peak"] = round(peak[0], 1)
                result["rounds"].append(round_result)
                print(json.dumps(round_result), flush=True)
            running.clear()
            sampler.join(timeout=5)
            result["server_alive_after"] = server.proc.poll() is None
        finally:
            server.stop()
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
