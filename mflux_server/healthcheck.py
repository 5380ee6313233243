"""The container's health check: an API answers /readyz; a worker has heartbeated from this host lately.

`mflux-healthcheck` runs it; with no argument it reads which of the two the container runs from PID 1's command
line, so one image's HEALTHCHECK serves both. Exit 0: healthy; 1: not, with the reason on stderr.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from mflux_server import store
from mflux_server.core.settings import load_settings

ROLES = ("api", "worker")


def role_of_pid1(cmdline: Path = Path("/proc/1/cmdline")) -> str:
    """'worker' when PID 1 runs mflux-worker (or mflux_server.worker), else 'api'."""
    try:
        words = cmdline.read_bytes().split(b"\0")
    except OSError:
        return "api"
    return "worker" if any(b"mflux-worker" in w or w == b"mflux_server.worker" for w in words) else "api"


def check_api(port: int, timeout: float = 5.0) -> str | None:
    """None when the API on this port says it is ready; else why not."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=timeout) as answer:
            return None if answer.status == 200 else f"/readyz answered {answer.status}"
    except urllib.error.HTTPError as error:
        return f"/readyz answered {error.code}: {error.read(500).decode(errors='replace')}"
    except OSError as error:
        return f"the API does not answer on port {port}: {error}"


def check_worker(db: str, stale_after: float, hostname: str) -> str | None:
    """None when a worker on this host heartbeated within stale_after seconds; else why not."""
    queue = store.connect(db)
    try:
        if any(w.hostname == hostname for w in queue.live_workers(stale_after)):
            return None
        return f"no worker on {hostname} has heartbeated within {stale_after:g} s"
    finally:
        queue.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Check the role given (api or worker), else the one PID 1 runs; settings come from the environment."""
    args = list(sys.argv[1:] if argv is None else argv)
    role = args.pop(0) if args and args[0] in ROLES else role_of_pid1()
    settings = load_settings(role, args, "mflux-healthcheck", __doc__ or "")
    try:
        problem = check_api(settings.port) if role == "api" else \
            check_worker(settings.db, settings.stale_after, socket.gethostname())
    except Exception as error:  # a health check reports any failure as unhealthy, with its reason
        problem = f"{type(error).__name__}: {error}"
    if problem:
        print(f"unhealthy ({role}): {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
