"""Logging and interpreter setup that both processes do at start."""

from __future__ import annotations

import logging
import sys

# Requests and the worker's threads release the GIL for many short sqlite and socket calls; with Python's
# default 5 ms switch interval each release can cost a thread up to 5 ms to get it back. 1 ms measured
# better tails for the API under load (bench/explanations.md).
GIL_SWITCH_INTERVAL = 0.001


def configure_logging(level: str, name: str) -> None:
    """One log format for both processes, on stderr (journald picks it up)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def shorten_gil_switch_interval() -> None:
    """Let threads that return from I/O get the GIL back sooner (see GIL_SWITCH_INTERVAL)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
