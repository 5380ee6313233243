"""Over real HTTP to gunicorn: errors found before the app runs are JSON too, and bodies obey their limits."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest
import requests

from mflux_server import store
from mflux_server.testing import wait_for
from tests.process.test_http_server import raw_request


def parsed(response: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 414, "url_too_long"),
    (b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n", 400, "bad_request"),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     400, "bad_request"),
    (b"get /api/info HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, "bad_request"),
    (b"GET /api/info HTTP/9.9\r\nHost: localhost\r\n\r\n", 400, "bad_request"),
])
def test_requests_the_server_cannot_parse_get_our_json_error(processes, request_bytes, status, code):
    url = processes.server()
    got, headers, body = parsed(raw_request(url, request_bytes))
    assert (got, body["code"]) == (status, code), body
    assert headers["content-type"] == "application/json" and body["message"]
    assert requests.get(url + "/api/info", timeout=5).status_code == 200, "the server carries on"


def test_a_chunked_body_past_the_limit_is_a_413_and_one_within_it_is_read_whole(processes):
    url = processes.server("--max-input-bytes", "1000")  # generate bodies: 1 MiB and five tiny images

    def chunks(size: int):
        yield b'{"prompt": "'
        for _ in range(size // 65536):
            yield b"a" * 65536
        yield b'"}'

    big = requests.post(url + "/api/generate", data=chunks(3 << 20), headers={"Content-Type": "application/json"},
                        timeout=30)
    assert big.status_code == 413 and big.json()["code"] == "request_too_large"
    whole = requests.post(url + "/api/generate", data=chunks(65536), headers={"Content-Type": "application/json"},
                          timeout=30)
    assert whole.status_code == 422 and "got 65536" in whole.json()["message"], "read whole: the prompt rule saw it all"


def test_head_on_an_event_stream_answers_at_once(processes):
    url = processes.server()
    response = requests.head(url + "/api/events", timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")


def test_two_hundred_stalled_or_trickling_clients_delay_no_one_and_are_cut_off_at_their_deadline(processes):
    import socket
    import time

    url = processes.server("--header-timeout", "1", "--request-timeout", "2")
    host, port = url.removeprefix("http://").split(":")
    stalled = []
    for i in range(200):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nX-Slow: a" if i % 2 else
                     b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 99\r\n\r\n{")
        stalled.append(sock)
    opened = time.monotonic()
    latencies = []
    for _ in range(20):
        started = time.monotonic()
        assert requests.post(url + "/api/generate", json={"prompt": "past the stalled"}, timeout=5).status_code == 200
        assert requests.get(url + "/api/info", timeout=5).status_code == 200
        latencies.append(time.monotonic() - started)
    assert sorted(latencies)[-2] < 0.5, f"fresh clients were held up: {sorted(latencies)}"
    answers = []
    for sock in stalled:
        sock.settimeout(10)
        chunks = b""
        while chunk := sock.recv(65536):
            chunks += chunk
        answers.append(chunks)
        sock.close()
    assert time.monotonic() - opened < 6, "every stalled connection was closed at its deadline"
    assert all(b" 408 " in answer.split(b"\r\n")[0] and b'"request_timeout"' in answer for answer in answers)


def test_a_stopping_server_lets_idle_connections_and_streams_go_at_once_and_finishes_a_request_in_flight(processes):
    url = processes.server()
    kept = requests.Session()
    assert kept.get(url + "/api/info", timeout=5).status_code == 200  # a kept-alive connection, idle from now on
    stream = requests.get(url + "/api/events", stream=True, timeout=30)
    assert stream.status_code == 200
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "sent while the server stops"}).encode()
    uploading = socket.create_connection((host, int(port)), timeout=10)
    uploading.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
    time.sleep(0.3)  # the request has begun: it is in flight, not idle
    stopping = time.monotonic()
    processes.server_proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    uploading.sendall(body[10:])
    answer = b""
    while chunk := uploading.recv(65536):  # the answer, then the server closes the connection (else a timeout)
        answer += chunk
    uploading.close()
    status, _, created = parsed(answer)
    assert status == 200 and created["task_id"], answer
    assert list(stream.iter_lines()) is not None  # the stream ends (it used to wait for its next event)
    processes.server_proc.wait(timeout=30)
    took = time.monotonic() - stopping
    log = processes.log(processes.server_proc)
    assert "graceful timeout" not in log, log[-2000:]
    assert took < 5, f"the server took {took:.1f} s to stop, as if it had waited out its 10 s graceful timeout"
    db = store.connect(processes.db_path)
    assert db.get(created["task_id"]) is not None  # acknowledged, so kept
    db.close()


@pytest.mark.parametrize("request_line", [b"GET /api//status?task_id=x", b"POST /api//generate",
                                          b"GET /api/tasks/a%2Fb", b"DELETE /api/tasks/a%2F", b"GET //api/info",
                                          b"POST /api/tasks/abc%2Fevents"])
def test_odd_paths_over_real_http_never_redirect_to_the_host_header(processes, request_line):
    url = processes.server()
    answer = raw_request(url, request_line + b" HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\n"
                                   b"Connection: close\r\n\r\n")
    got, headers, body = parsed(answer)
    # gunicorn reads a leading "//" as "/" (GET //api/info is /api/info): an answer, not a redirect.
    assert not 300 <= got < 400 and got < 500 and "location" not in headers, (got, headers)
    assert headers["content-type"] == "application/json" and body


def test_a_stopping_server_answers_every_open_synchronous_wait_with_its_task_id(processes):
    from concurrent.futures import ThreadPoolExecutor

    url = processes.server()  # no worker: every wait stays open until the server stops
    sent = threading.Barrier(51)

    def wait_for_image(number: int) -> requests.Response:
        sent.wait()
        return requests.post(f"{url}/v1/images/generations", json={"prompt": f"waiting {number}",
                                                                   "size": "256x256"}, timeout=60)

    with ThreadPoolExecutor(50) as pool:
        answers = [pool.submit(wait_for_image, number) for number in range(50)]
        sent.wait()
        wait_for(lambda: store_count(processes.db_path) == 50, what="every task queued")
        stopping = time.monotonic()
        processes.server_proc.send_signal(signal.SIGTERM)
        results = [answer.result(timeout=30) for answer in answers]
    processes.server_proc.wait(timeout=30)
    assert time.monotonic() - stopping < 5, "no wait held the stop"
    assert {r.status_code for r in results} == {503}, {r.status_code for r in results}
    db = store.connect(processes.db_path)
    for result in results:
        message = result.json()["error"]["message"]
        task_id = message.split("the task goes on as ")[1].split()[0]
        assert db.get(task_id) is not None, "the answer names a task that is kept, to be fetched later"
    db.close()


def store_count(db_path: str) -> int:
    db = store.connect(db_path)
    try:
        return sum(db.status_counts().values())
    finally:
        db.close()


def test_new_connections_are_answered_while_keep_alive_clients_submit_flat_out(processes):
    url = processes.server()
    flooding_until = time.monotonic() + 6
    submitted = []

    def flood() -> None:
        session = requests.Session()  # keep-alive: its next request is read without yielding
        while time.monotonic() < flooding_until:
            session.post(f"{url}/api/generate", json={"prompt": "flood", "width": 256, "height": 256}, timeout=30)
            submitted.append(1)

    flooders = [threading.Thread(target=flood) for _ in range(10)]
    for flooder in flooders:
        flooder.start()
    time.sleep(1)
    waits = []
    while time.monotonic() < flooding_until - 1:
        started = time.monotonic()
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # a new connection each time
        waits.append(time.monotonic() - started)
        time.sleep(0.2)
    for flooder in flooders:
        flooder.join()
    assert len(submitted) > 100, "the flood ran"
    # Before the bounded wait, a new connection's read waited for the whole flood (6 s here, 30 s in the attack).
    assert len(waits) >= 5 and max(waits) < 3, [round(wait, 2) for wait in waits]
