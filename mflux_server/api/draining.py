"""A stopping server process lets go of its clients at once: idle keep-alive connections close, event streams end.

gunicorn's gevent worker, told to stop, stops accepting and then waits up to its graceful timeout for every
connection's greenlet to end. A kept-alive connection waits for its next request and an event stream waits for
its next event, so one open browser tab held every stop (and restart) for the full 10 s. Requests in flight
still finish; an EventSource reconnects (to the next process, or the restarted server) from its Last-Event-ID.
"""

from __future__ import annotations

from collections.abc import Callable

_hooks: list[Callable[[], None]] = []
_draining = False


def on_drain(hook: Callable[[], None]) -> None:
    """Call hook once this process starts draining (at once, if it already has)."""
    _hooks.append(hook)
    if _draining:
        hook()


def drain() -> None:
    """The process stops: run every hook (they end waits; they must not block)."""
    global _draining
    _draining = True
    for hook in list(_hooks):
        hook()


def draining() -> bool:
    """Whether this process is stopping."""
    return _draining
