"""One real mflux network end to end: FLUX.1 schnell with random weights, through the real worker and the real API.

This is the mflux engine as users run it (mflux's Flux1, its T5, CLIP, transformer and VAE computing on MLX's
CPU backend), with two cuts so it fits CI: random weights (none can be downloaded here) and one block of each
kind (T5, CLIP, double and single transformer blocks), because MLX's CPU backend is tens of times slower than a
GPU and the full 12B-parameter model would need ~48 GiB in float32. Every kind of layer and every shape between
the networks stays real. Where Debian's OpenBLAS is installed (`make test` installs it) the worker preloads it:
MLX's Linux CPU wheel bundles the reference BLAS, ~50× slower at the same cblas calls.
"""

from __future__ import annotations

import io
import os
import threading

import pytest
import requests
from PIL import Image

from bench.random_weights import fast_blas_preload
from mflux_server.testing import read_events, wait_for

pytest.importorskip("mlx.core", reason="the real network needs MLX (make install provides the CPU build)")


@pytest.fixture
def real_worker(processes, monkeypatch):
    """mflux-worker with the mflux engine and FLUX.1 schnell, cut to one block of each kind, random weights."""
    if os.environ.get("CI") and not fast_blas_preload():
        pytest.fail("Debian's OpenBLAS is missing (make test installs libopenblas0-pthread): this test would take "
                    "tens of minutes on MLX's bundled reference BLAS")
    for name, value in {"MFLUX_RANDOM_DEPTH": "1", **fast_blas_preload()}.items():
        monkeypatch.setenv(name, value)
    url = processes.server()
    proc = processes.spawn("bench.random_weights_worker", [
        "--engine", "mflux", "--model", "schnell", "--warm-up-size", "64", "--warm-up-steps", "1",
        "--heartbeat-interval", "0.5", "--stale-after", "30"], "real-worker")
    wait_for(lambda: processes.worker_count() > 0 or proc.poll() is not None, timeout=240, interval=0.5,
             what="the real worker loaded and registered")
    assert proc.poll() is None, processes.log(proc)
    return url, proc


def test_flux1_schnell_runs_through_the_real_worker_and_api(real_worker, processes, db):
    url, proc = real_worker
    info = requests.get(f"{url}/api/info", timeout=5).json()
    assert [w["engine"] for w in info["workers"]] == ["mflux"]
    task = requests.post(f"{url}/api/generate", json={"prompt": "a red fox in the snow", "width": 128, "height": 128,
                                                      "steps": 3, "format": "PNG", "seed": 7}, timeout=10).json()
    with requests.get(f"{url}/api/tasks/{task['task_id']}/events", stream=True, timeout=240) as response:
        events = list(read_events(response))  # the stream ends by itself after done
    kinds = [event["event"] for event in events]
    assert kinds[-1] == "done", events[-1]
    steps = [event["data"]["step"] for event in events if event["event"] == "progress" and "step" in event["data"]]
    assert steps and steps == sorted(steps) and max(steps) >= 2, "mflux's loop reported its steps"
    assert "preview" in kinds, "a preview drawn from mflux's latents"
    png = requests.get(url + events[-1]["data"]["images"][0], timeout=10)
    image = Image.open(io.BytesIO(png.content))
    assert (image.format, image.size) == ("PNG", (128, 128))
    assert "mflux engine, model schnell" in image.text["Software"]
    colours = image.convert("RGB").getcolors(128 * 128)
    assert colours is not None and len(colours) > 100, "mflux's VAE decoded a picture, not a flat fill"
    stats = {(s.model, s.width, s.height, s.kind) for s in db.timing_stats()}
    assert ("schnell", 128, 128, "step") in stats, stats
    assert "schnell" in db.load_stats(), "the load with its warm-up was timed"
    log = processes.log(proc)
    assert "it/s" not in log and "%|" not in log, "mflux's progress bars stay out of the worker's log"


def test_a_running_real_generation_is_canceled_at_a_step(real_worker, processes):
    url, proc = real_worker
    task_id = requests.post(f"{url}/api/generate", json={"prompt": "a long one", "width": 128, "height": 128,
                                                         "steps": 40}, timeout=10).json()["task_id"]
    seen: list[dict] = []

    def follow() -> None:
        with requests.get(f"{url}/api/tasks/{task_id}/events", stream=True, timeout=240) as response:
            seen.extend(read_events(response))

    listener = threading.Thread(target=follow)
    listener.start()
    wait_for(lambda: any(e["event"] == "progress" and e["data"].get("step") for e in seen), timeout=120,
             what="the real generation running")
    assert requests.delete(f"{url}/api/tasks/{task_id}", timeout=10).status_code == 200
    listener.join(timeout=120)
    status = requests.get(f"{url}/api/status", params={"task_id": task_id}, timeout=5).json()
    assert status["status"] == "canceled"
    steps = [e["data"]["step"] for e in seen if e["event"] == "progress" and "step" in e["data"]]
    assert max(steps) < 40, "the generation stopped at a step boundary, not at the end"
    after = requests.post(f"{url}/api/generate", json={"prompt": "next", "width": 128, "height": 128, "steps": 1},
                          timeout=10).json()["task_id"]
    wait_for(lambda: requests.get(f"{url}/api/status", params={"task_id": after}, timeout=5).json()["status"] == "done",
             timeout=120, interval=0.2, what="the worker generating again after the cancel")
    assert proc.poll() is None
