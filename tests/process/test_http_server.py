"""The production HTTP server: submissions on threads of their own, one listening socket per process, port checks."""

from __future__ import annotations

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
def read_threads_held(url: str, threads: int) -> Iterator[None]:
    """Hold every read thread of a 1-process server with GETs that never finish, and check they are held."""
    host, port = url.removeprefix("http://").split(":")
    stuck = [socket.create_connection((host, int(port))) for _ in range(threads)]
    try:
        for sock in stuck:
            sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.3)
        with pytest.raises(requests.Timeout):  # the read threads really are all taken
            requests.get(url + "/api/info", timeout=1)
        yield
    finally:
        for sock in stuck:
            sock.close()


def test_a_submission_is_answered_while_every_read_thread_is_stuck(processes):
    url = processes.server("--threads", "2", http_workers=1)
    with read_threads_held(url, 2):
        started = time.monotonic()
        response = requests.post(url + "/api/generate", json={"prompt": "through the write threads"}, timeout=10)
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 5
        deleted = requests.delete(url + f"/api/tasks/{response.json()['task_id']}", timeout=10)
        assert deleted.status_code == 200, deleted.text


def test_a_client_that_connects_and_waits_before_sending_is_served(processes):
    url = processes.server("--threads", "2", http_workers=1)
    body = b'{"prompt": "slow typist"}'
    request = (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    # Its method is unknown until it sends: it must wait on the poller, not in a read thread (all held here).
    with read_threads_held(url, 2):
        response = raw_request(url, request, pause=0.5)
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    assert b'"task_id"' in response
    assert raw_request(url, b"GET /api/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", pause=0.5).startswith(
        b"HTTP/1.1 200")


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
