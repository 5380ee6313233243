"""systemd's notify protocol (sd_notify): READY=1 once a process serves, WATCHDOG=1 while its loop runs.

Without $NOTIFY_SOCKET (not under systemd with Type=notify) every call is a no-op. The units set WatchdogSec,
so a process whose loop stops pinging is restarted.
"""

from __future__ import annotations

import os
import socket
import time

WATCHDOG_EVERY = 5.0  # seconds between pings at most; the units allow 60 s without one


def notify(state: str) -> bool:
    """Send one notification to systemd; False when not running under it (or the socket is gone)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False


class Watchdog:
    """Pings WATCHDOG=1 at most every WATCHDOG_EVERY seconds, however often `ping` is called."""

    def __init__(self) -> None:
        self._last = 0.0

    def ping(self) -> None:
        """Tell systemd the loop is alive, if a ping is due."""
        now = time.monotonic()
        if now - self._last >= WATCHDOG_EVERY:
            self._last = now
            notify("WATCHDOG=1")
