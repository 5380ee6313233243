"""Real OS threads whether or not gevent has patched threading: CPU-bound work must not run on an event loop.

Under gunicorn's gevent worker, `threading.Thread` is a greenlet and `threading.local` is per greenlet. A queue
snapshot rebuild (tens of milliseconds of Python) on a greenlet would stall every open connection, and a
per-greenlet SQLite connection would be opened for every request. These helpers give the native behaviour.
"""

from __future__ import annotations

import os
import sys
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


def loop_waiter() -> Callable[[float], None] | None:
    """gevent.sleep when called on gevent's event loop (a server process's main thread), else None: what a wait
    there must use so that the loop's other connections go on meanwhile."""
    if not gevent_active():
        return None
    from gevent import sleep

    return sleep if _os_thread() == _MAIN_THREAD else None


def _os_thread() -> int:
    if gevent_active():
        from gevent import monkey

        ident: int = monkey.get_original("_thread", "get_ident")()
        return ident
    return threading.get_ident()


# This module is first imported on the main thread (the event loop's, under gevent; a fork keeps the number).
_MAIN_THREAD = _os_thread()


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


class Stop:
    """A stop signal that an OS thread can wait on while gevent's loop sets it (threading.Event is a greenlet one)."""

    def __init__(self) -> None:
        from gevent import monkey

        self._set = False
        self._lock = monkey.get_original("_thread", "allocate_lock")()  # a real lock, held until set()
        self._lock.acquire()

    def set(self) -> None:
        """Tell the loop to stop."""
        if not self._set:
            self._set = True
            self._lock.release()

    def is_set(self) -> bool:
        """Whether set() was called."""
        return self._set

    def wait(self, timeout: float) -> bool:
        """Sleep the OS thread until set() or the timeout; returns is_set()."""
        if self._lock.acquire(timeout=timeout):
            self._lock.release()
        return self._set


_pools: list[Any] = []  # the daemons' own thread pools, kept so they live as long as the process


def daemon(target: Callable[[Any], None], name: str) -> Any:
    """Run a long-lived loop, target(stop), on an OS thread of its own; returns the stop signal (set() ends it).

    Under gevent the hub's threadpool suits short jobs (a loop would hold one of its slots for good), so each
    daemon gets a pool of one real thread; its blocking SQLite calls then never stall the event loop.
    """
    if gevent_active():
        from gevent.threadpool import ThreadPool

        stop: Any = Stop()
        pool = ThreadPool(1)
        _pools.append(pool)
        pool.spawn(target, stop)
        return stop
    stop = threading.Event()
    threading.Thread(target=target, args=(stop,), name=name, daemon=True).start()
    return stop


def call(function: Callable[[], T]) -> T:
    """Run function on an OS thread and return its result; under gevent only the calling greenlet waits."""
    if gevent_active():
        from gevent import get_hub

        result: T = get_hub().threadpool.apply(function)
        return result
    return function()


_bounded: dict[str, Any] = {}


BACKGROUND_NICE = 10  # how much less CPU share a bounded pool's thread gets than the event loop (Linux)
_niced = thread_local()


def lower_thread_priority(niceness: int) -> None:
    """Run the calling OS thread `niceness` steps nicer than the process (Linux, where niceness is per thread;
    elsewhere nothing changes)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + niceness)
        except OSError:
            pass


def _yielding(function: Callable[[], T]) -> Callable[[], T]:
    """function, run at a lower CPU priority on this OS thread: where cores are few, the event loop's thread is
    scheduled first and the pool's work fills the idle time (Linux niceness is per thread)."""

    def run() -> T:
        if not getattr(_niced, "done", False):
            _niced.done = True
            lower_thread_priority(BACKGROUND_NICE)
        return function()

    return run


def call_bounded(function: Callable[[], T], name: str, size: int, niced: bool = True) -> T:
    """Like call(), on a pool of `size` OS threads of its own, run at a lower CPU priority than the event loop
    (unless not `niced`): at most `size` such jobs run at once, the rest wait (their greenlets only), so CPU-heavy
    work neither stalls the loop nor takes every core from it."""
    if gevent_active():
        from gevent.threadpool import ThreadPool

        pool = _bounded.get(name) or _bounded.setdefault(name, ThreadPool(size))
        result: T = pool.apply(_yielding(function) if niced else function)
        return result
    return function()
