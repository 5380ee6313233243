"""Real OS threads whether or not gevent has patched threading: CPU-bound work must not run on an event loop.

Under gunicorn's gevent worker, `threading.Thread` is a greenlet and `threading.local` is per greenlet. A queue
snapshot rebuild (tens of milliseconds of Python) on a greenlet would stall every open connection, and a
per-greenlet SQLite connection would be opened for every request. These helpers give the native behaviour.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def gevent_active() -> bool:
    """True when gevent has monkey-patched threading in this process (the API's server processes)."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("threading"))


def thread_local() -> Any:
    """A threading.local that is per OS thread even under gevent (all greenlets of the loop share it)."""
    if gevent_active():
        from gevent import monkey

        return monkey.get_original("threading", "local")()
    return threading.local()


def start(target: Callable[[], None], name: str) -> Callable[[float], Any]:
    """Run target on an OS thread; returns a function that waits for it, at most the given seconds."""
    if gevent_active():
        from gevent import get_hub

        done = get_hub().threadpool.spawn(target)
        return lambda timeout: done.wait(timeout)
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread.join


def call(function: Callable[[], T]) -> T:
    """Run function on an OS thread and return its result; under gevent only the calling greenlet waits."""
    if gevent_active():
        from gevent import get_hub

        result: T = get_hub().threadpool.apply(function)
        return result
    return function()
