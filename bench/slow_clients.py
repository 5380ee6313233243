"""Benchmark 8: 200 stalled and trickling clients while others poll and submit; each slow one cut at its deadline."""

from __future__ import annotations

import shutil
import socket
import threading
import time

from bench.api_load import PACED_PAUSE_MS, add_beside, full_queue, phase
from bench.results import Result

SLOW = 200
HEADER_TIMEOUT, REQUEST_TIMEOUT = 5.0, 10.0  # shorter than the defaults (10 s, 60 s), so cut-offs land in the run


class SlowClients:
    """A quarter stall mid-header, a quarter mid-body, and half trickle one byte a second; records when each closes."""

    def __init__(self, url: str, count: int):
        host, port = url.removeprefix("http://").split(":")
        self.opened = time.monotonic()
        self.sockets: list[tuple[str, socket.socket]] = []
        for i in range(count):
            sock = socket.create_connection((host, int(port)))
            kind = ("header", "body", "trickle", "trickle")[i % 4]
            if kind == "header":
                sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")
            elif kind == "body":
                sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 400\r\n\r\n{")
            else:
                sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 4000\r\n\r\n")
            self.sockets.append((kind, sock))
        self.closed_after: dict[str, list[float]] = {"header": [], "body": [], "trickle": []}
        self.answered_408 = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        """Send one byte a second on each trickling connection, noticing when the server closes any of them."""
        open_ = dict(enumerate(self.sockets))
        while open_ and not self._stop.is_set():
            for index, (kind, sock) in list(open_.items()):
                sock.settimeout(0.001)
                try:
                    answer = sock.recv(65536)
                except TimeoutError:
                    answer = None
                except OSError:
                    answer = b""
                if answer is not None:  # an answer (a 408) or a close
                    self.answered_408 += b" 408 " in answer.split(b"\r\n")[0]
                    self.closed_after[kind].append(time.monotonic() - self.opened)
                    del open_[index]
                    sock.close()
                elif kind == "trickle":
                    try:
                        sock.sendall(b"a")
                    except OSError:
                        pass
            time.sleep(1.0)

    def close(self) -> None:
        """Stop trickling and close what is still open."""
        self._stop.set()
        self._thread.join()
        for _, sock in self.sockets:
            sock.close()


def run(smoke: bool = False) -> Result:
    """10,000 queued and a real-time worker; 200 slow clients opened, then benchmark 3's paced load beside them."""
    tasks, seconds, connections, slow = (300, 2.0, 8, 20) if smoke else (10_000, 20.0, 32, SLOW)
    use_wrk = shutil.which("wrk") is not None and not smoke
    result = Result("Slow clients", f"make bench ARGS='--only slow'  ({tasks:,} queued; {slow} slow clients: a quarter "
                                    f"stalled mid-header, a quarter mid-body, half trickling 1 byte/s; --header-timeout "
                                    f"{HEADER_TIMEOUT:g} --request-timeout {REQUEST_TIMEOUT:g}; benchmark 3's paced load for "
                                    f"{seconds:.0f} s alone, then beside them)")
    with full_queue(tasks, smoke, ("--header-timeout", str(HEADER_TIMEOUT), "--request-timeout",
                                   str(REQUEST_TIMEOUT))) as (procs, url, ids, ids_file, _):
        alone = phase(url, ids, ids_file, seconds, connections, PACED_PAUSE_MS, use_wrk)  # this machine's own tail
        clients = SlowClients(url, slow)
        paced = phase(url, ids, ids_file, seconds, connections, PACED_PAUSE_MS, use_wrk)
        deadline = time.monotonic() + REQUEST_TIMEOUT + 5
        while sum(map(len, clients.closed_after.values())) < slow and time.monotonic() < deadline:
            time.sleep(0.5)
        clients.close()
    add_beside(result, alone, paced)
    closed = sum(map(len, clients.closed_after.values()))
    result.add("slow clients closed by their deadline", closed, "", f"{slow}", closed == slow)
    result.add("of them answered with a JSON 408", clients.answered_408, "", f"{slow}", clients.answered_408 == slow)
    for kind, limit in (("header", HEADER_TIMEOUT), ("body", REQUEST_TIMEOUT), ("trickle", REQUEST_TIMEOUT)):
        latest = max(clients.closed_after[kind], default=float("nan"))
        result.add(f"stalled {kind}: latest close after opening", latest, " s", f"≤ {limit + 2:g} s", latest <= limit + 2)
    return result
