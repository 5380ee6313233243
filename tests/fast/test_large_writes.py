"""A submit that stores large input images is written on an OS thread, so the event loop goes on meanwhile."""

from __future__ import annotations

import base64
import io
import os
import threading
from collections.abc import Callable
from typing import Any

from PIL import Image

from mflux_server.api.context import LARGE_WRITE
from mflux_server.core import native


def noise_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    return out.getvalue()


def test_a_submit_storing_large_images_is_written_on_an_os_thread(client, db, monkeypatch):
    threads: list[int] = []

    bounded = native.call_bounded

    def on_a_thread(function: Callable[[], Any], name: str, size: int, niced: bool = True) -> Any:
        """native.call_bounded as under gevent for the writes: the function runs on another OS thread."""
        if name != "large-writes":
            return bounded(function, name, size, niced)
        assert (size, niced) == (1, False), "one thread, at the loop's priority"
        out: list[Any] = []
        runner = threading.Thread(target=lambda: out.append(function()))
        runner.start()
        runner.join()
        threads.append(runner.ident or 0)
        return out[0]

    monkeypatch.setattr(native, "call_bounded", on_a_thread)
    small_image = base64.b64encode(noise_png(64)).decode()
    small = client.post("/api/generate", json={"prompt": "small", "width": 256, "height": 256, "image": small_image,
                                               "image_strength": 0.5})
    assert small.status_code == 200, small.json
    assert threads == [], "a small write stays on the loop's session"

    large_image = noise_png(512)
    assert len(large_image) >= LARGE_WRITE
    for headers in ({}, {"Idempotency-Key": "large"}):
        large = client.post("/api/generate", headers=headers, json={
            "prompt": f"large {headers}", "width": 256, "height": 256, "image": base64.b64encode(large_image).decode(),
            "image_strength": 0.5})
        assert large.status_code == 200, large.json
        stored = db.inputs(large.json["task_id"])
        assert stored["image"].data == large_image, "written whole, by the thread's own session"
    assert len(threads) == 2 and threading.get_ident() not in threads
