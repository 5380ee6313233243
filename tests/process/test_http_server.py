"""The production HTTP server: many held connections per process (gevent), one listening socket per process, port checks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest
import requests

from mflux_server.testing import ROOT, wait_for


def raw_request(url: str, request: bytes, pause: float = 0.0) -> bytes:
    """Send one raw HTTP/1.1 request (after an optional pause once connected) and return the whole response."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        time.sleep(pause)
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@contextmanager
def connections_held(url: str, count: int) -> Iterator[None]:
    """Hold many connections of a 1-process server open: half of them idle, half mid-request (headers unfinished)."""
    host, port = url.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port))) for _ in range(count)]
    try:
        for sock in held[::2]:
            sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\n")
        yield
    finally:
        for sock in held:
            sock.close()


def test_requests_are_answered_while_hundreds_of_connections_are_held_open(processes):
    url = processes.server(http_workers=1)
    # A thread-per-connection server with a few threads would hang here; the gevent worker holds each on a greenlet.
    with connections_held(url, 300):
        started = time.monotonic()
        response = requests.post(url + "/api/generate", json={"prompt": "past the crowd"}, timeout=10)
        assert response.status_code == 200, response.text
        assert requests.get(url + "/api/info", timeout=5).status_code == 200
        assert time.monotonic() - started < 2
        deleted = requests.delete(url + f"/api/tasks/{response.json()['task_id']}", timeout=10)
        assert deleted.status_code == 200, deleted.text


def test_a_client_that_connects_and_waits_before_sending_is_served(processes):
    url = processes.server(http_workers=1)
    body = b'{"prompt": "slow typist"}'
    request = (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with connections_held(url, 50):
        response = raw_request(url, request, pause=0.5)
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    assert b'"task_id"' in response
    assert raw_request(url, b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", pause=0.5).startswith(
        b"HTTP/1.1 200")


def test_cpu_bound_forecast_work_runs_off_the_event_loop():
    script = """
import gevent.monkey; gevent.monkey.patch_all()
import gevent
from gevent import monkey
from mflux_server.core import native
assert native.gevent_active()
real_ident = monkey.get_original("threading", "get_ident")
loop_thread, seen = real_ident(), []
native.call(lambda: seen.append(real_ident()))
native.start(lambda: seen.append(real_ident()), "rebuild")(5)
assert len(seen) == 2 and loop_thread not in seen, "native work ran on the event loop's thread"
looped = []
stop = native.daemon(lambda stop: looped.append(real_ident()) or stop.wait(30), "housekeeping")
for _ in range(100):
    if looped:
        break
    gevent.sleep(0.01)  # a daemon on a greenlet would hold the loop in stop.wait and never let this run
assert looped and looped[0] != loop_thread, "a daemon loop ran on the event loop's thread"
stop.set()
local = native.thread_local(); local.x = 1
got = []
gevent.spawn(lambda: got.append(getattr(local, "x", None))).join()
assert got == [1], "greenlets of one thread share a native thread-local"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balances connections on Linux only")
def test_every_server_process_listens_on_its_own_socket(processes):
    url = processes.server(http_workers=2)
    port = int(url.rsplit(":", 1)[1])

    def listening(proc: psutil.Process) -> list:
        return [c for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]

    # /api/info answers once one process is up; the other may still be booting.
    children = wait_for(lambda: [c for c in psutil.Process(processes.server_proc.pid).children() if listening(c)]
                        if len(psutil.Process(processes.server_proc.pid).children()) == 2 else None, what="2 processes")
    assert len(children) == 2
    assert all(len(listening(child)) == 1 for child in children)
    assert not listening(psutil.Process(processes.server_proc.pid)), "the master should not hold a shared socket"


def test_a_port_in_use_is_refused_with_a_clear_message(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "mflux_server", "--db", str(tmp_path / "q.db"), "--port", str(port)],
                                capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_ctrl_c_stops_quietly_and_the_log_says_where_it_listens(tmp_path):
    from mflux_server.testing import free_port

    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "mflux_server", "--db", str(tmp_path / "q.db"), "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return requests.get(url + "/healthz", timeout=1).ok
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a process still booting
            return False

    # Every server process booted: each new connection goes to one of their sockets (reuse_port), and one that
    # lands on a process still booting waits; ten quick answers in a row leave about one chance in a thousand.
    # (A stop during the boot is tests/fast/test_worker_boot.py's.)
    wait_for(lambda: all(answers() for _ in range(10)), what="every server process to answer")
    with requests.get(url + "/api/events", stream=True, timeout=10):  # an open stream, as the web UI holds
        # What Ctrl-C on `make run` does: SIGINT to every process of the group, then the Makefile's SIGTERM.
        os.killpg(server.pid, signal.SIGINT)
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=20)
    text = log.read_text()
    assert code == 0, text
    assert f"Listening at: {url} (" in text, text  # was "Listening at:  (pid)"
    assert "Traceback" not in text and "failed with SystemExit" not in text, text
