"""Benchmark 7: status polling and submits while 200 event streams and 200 idle keep-alives are open; event latency."""

from __future__ import annotations

import json
import selectors
import shutil
import socket
import threading
import time

from bench.api_load import PACED_PAUSE_MS, PeakRss, full_queue, phase
from bench.results import Result, median, percentile

STREAMS = 200
IDLE = 200


class Subscribers:
    """Open event streams and idle keep-alive connections on one selector thread; time every progress event."""

    def __init__(self, url: str, streams: int, idle: int):
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.selector = selectors.DefaultSelector()
        self.latencies: list[float] = []  # seconds from the event's time (the worker's step) to its arrival here
        self.buffers: dict[socket.socket, bytes] = {}
        self.ready_at = float("inf")
        self.idle: list[socket.socket] = []
        self._stop = threading.Event()
        for _ in range(streams):
            sock = socket.create_connection(self.address)
            sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n")
            sock.setblocking(False)
            self.buffers[sock] = b""
            self.selector.register(sock, selectors.EVENT_READ)
        for _ in range(idle):
            sock = socket.create_connection(self.address)
            sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\n\r\n")
            sock.recv(65536)  # answered; the connection then stays open and idle (keep-alive)
            self.idle.append(sock)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(timeout=0.1):
                sock = key.fileobj
                arrived = time.time()
                try:
                    chunk = sock.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                data = self.buffers[sock] + chunk  # type: ignore[index]
                *messages, rest = data.split(b"\n\n")
                self.buffers[sock] = rest  # type: ignore[index]
                for message in messages:
                    if b"event: progress" not in message:
                        continue
                    line = next(part for part in message.split(b"\n") if part.startswith(b"data: "))
                    at = json.loads(line[6:]).get("at")
                    if at and at >= self.ready_at:
                        self.latencies.append(arrived - at)

    def __enter__(self) -> Subscribers:
        # Events that waited in the sockets while the idle connections were opened would time this
        # client's own delay, not the server's: count only events written from now on.
        self.ready_at = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for sock in [*self.buffers, *self.idle]:
            sock.close()


def run(smoke: bool = False) -> Result:
    """10,000 queued, a real-time worker, 200 streams of every event and 200 idle connections, then the load phases."""
    tasks, seconds, connections, streams, idle = (300, 1.0, 8, 10, 10) if smoke else (10_000, 30.0, 32, STREAMS, IDLE)
    use_wrk = shutil.which("wrk") is not None and not smoke
    result = Result("Event streams", f"make bench ARGS='--only streams'  ({tasks:,} queued, {streams} open event "
                                     f"streams of the whole queue and {idle} idle keep-alive connections, then benchmark "
                                     f"3's load for {seconds:.0f} s flat out and {seconds:.0f} s paced)")
    with full_queue(tasks, smoke) as (procs, url, ids, ids_file, _):
        with PeakRss({"API": procs.server_proc.pid}) as memory, Subscribers(url, streams, idle) as subscribers:
            time.sleep(2.0 if smoke else 5.0)
            quiet = list(subscribers.latencies)  # latency with no other load
            flat = phase(url, ids, ids_file, seconds, connections, 0, use_wrk)
            paced = phase(url, ids, ids_file, seconds, connections, PACED_PAUSE_MS, use_wrk)
            latencies = list(subscribers.latencies)
    for name, found in (("flat out", flat), ("paced", paced)):
        result.add(f"{name}: status requests per second", found["rate"], "/s", "≥ 1,000/s", found["rate"] >= 1000)
        result.add(f"{name}: status latency p99", found["p99"], "ms", "≤ 50 ms", found["p99"] <= 50)
        result.add(f"{name}: submit latency p50", found["submit_p50"], "ms", "≤ 10 ms", found["submit_p50"] <= 10)
        result.add(f"{name}: errors (non-2xx, socket, failed submits)", found["errors"], "", "0", found["errors"] == 0)
    all_ms = [x * 1000 for x in latencies]
    quiet_ms = [x * 1000 for x in quiet] or all_ms
    if not quiet_ms:  # a smoke run can end before the worker finishes a step
        result.notes.append("No progress event arrived during the run.")
        quiet_ms = all_ms = [0.0]
    result.add(f"progress events delivered ({streams} streams)", len(latencies), "")
    result.add("event latency (worker's write → subscriber), no other load, p50", median(quiet_ms), "ms")
    result.add("event latency, no other load, p99", percentile(quiet_ms, 99), "ms", "≤ 50 ms",
               percentile(quiet_ms, 99) <= 50)
    result.add("event latency during the status load, p99", percentile(all_ms, 99), "ms")
    children = [peak for label, peak in memory.peaks.items() if label.startswith("API child")]
    result.add("peak RSS of an API server process", max(children, default=0.0), "MB", "≤ 150 MB",
               max(children, default=0.0) <= 150)
    return result
