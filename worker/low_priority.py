"""The worker's CPU work beside the engine (decoding a task's input images, writing them for mflux), run on a
thread of lower CPU priority: where cores are few and the API shares them, its event loops are scheduled first."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from PIL import Image

from mflux_server.core import native
from mflux_server.core.rows import InputImage

T = TypeVar("T")
NICENESS = 10  # steps below the worker's own priority (Linux niceness is per thread)

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def run(function: Callable[[], T]) -> T:
    """function's result, computed on the low-priority thread; the calling thread waits for it."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="low-priority",
                                       initializer=native.lower_thread_priority, initargs=(NICENESS,))
    return _pool.submit(function).result()


def decoded(stored: Mapping[str, InputImage]) -> dict[str, Image.Image]:
    """Each stored input image opened and its pixels decoded, on the low-priority thread."""

    def decode() -> dict[str, Image.Image]:
        images: dict[str, Image.Image] = {}
        for role, image in stored.items():
            opened = Image.open(io.BytesIO(image.data))
            opened.load()
            images[role] = opened
        return images

    return run(decode) if stored else {}
