"""Outbound requests (webhooks, image_url fetches): only http(s), only public addresses unless allowed, bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mflux_server.core import outbound


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.9", "private"),
    ("169.254.169.254", "link-local"), ("0.0.0.0", "unspecified"), ("::ffff:127.0.0.1", "loopback"),
    ("224.0.0.1", "multicast"), ("100.64.0.1", "not globally routable"), ("8.8.8.8", None),
    # IPv6 forms that embed an IPv4 address: 6to4, Teredo, NAT64, IPv4-compatible, ISATAP, mapped
    ("2002:7f00:1::", "loopback"), ("2002:a00:1::1", "private"), ("2002:808:808::1", None),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"), ("64:ff9b::127.0.0.1", "loopback"),
    ("64:ff9b::10.0.0.1", "private"), ("64:ff9b::8.8.8.8", None), ("64:ff9b:1::8.8.8.8", "private"),
    ("::127.0.0.1", "loopback"), ("::169.254.169.254", "link-local"), ("fe80::5efe:a9fe:a9fe", "link-local"),
    ("2001:db8::5efe:a00:1", "private"), ("2606:4700::5efe:7f00:1", "loopback"), ("::ffff:8.8.8.8", None),
])
def test_addresses_that_are_not_public_are_named(address, reason):
    assert outbound.private_reason(address) == reason


@pytest.mark.parametrize("url, rule", [
    ("ftp://example.com/x", "http:// or https://"), ("file:///etc/passwd", "http:// or https://"),
    ("example.com/hook", "no scheme"), ("http:///path", "no host"), ("http://[::1", "not a valid URL"),
    ("http://" + "a" * 3000, "at most 2048"), ("http://localhost:9/hook", "loopback"),
    ("http://127.0.0.1/hook", "loopback"), ("http://10.0.0.1/hook", "private"),
    ("http://no-such-host.invalid/hook", "does not resolve"),
])
def test_refused_targets_say_why(url, rule):
    with pytest.raises(outbound.TargetRefused, match=rule):
        outbound.check_url(url, allow_private=False)


def test_private_targets_pass_with_the_opt_in_and_connect_to_the_checked_address():
    target = outbound.check_url("http://localhost:8080/hook?x=1", allow_private=True)
    assert (target.host, target.port, target.path) == ("localhost", 8080, "/hook?x=1")
    assert outbound.private_reason(target.address) == "loopback"


class Scripted(BaseHTTPRequestHandler):
    """Answers GET /big with 3 MB, /redirect with a 302, anything else with a small body."""

    def do_GET(self) -> None:
        if self.path.startswith("/trickle"):  # headers at once, then a byte every 0.1 s for 20 s
            self.send_response(200)
            self.send_header("Content-Length", "200")
            self.end_headers()
            if self.path == "/trickle-headers":
                self.wfile.flush()
            for _ in range(200):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
            return
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/")
            self.end_headers()
            return
        body = b"x" * (3 << 20) if self.path == "/big" else b"small"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # a quick shutdown
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_fetch_keeps_to_its_size_limit_and_follows_no_redirect(origin):
    assert outbound.fetch(origin + "/small", allow_private=True, max_bytes=1000, timeout=5) == b"small"
    with pytest.raises(outbound.FetchFailed, match="over 1000 bytes"):
        outbound.fetch(origin + "/big", allow_private=True, max_bytes=1000, timeout=5)
    with pytest.raises(outbound.FetchFailed, match="302.*redirects are not followed"):
        outbound.fetch(origin + "/redirect", allow_private=True, max_bytes=1000, timeout=5)
    with pytest.raises(outbound.TargetRefused, match="loopback"):
        outbound.fetch(origin + "/small", allow_private=False, max_bytes=1000, timeout=5)


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers"])
def test_a_peer_that_trickles_is_cut_off_at_the_whole_call_deadline(origin, path):
    target = outbound.check_url(origin + path, allow_private=True)
    started = time.monotonic()
    with pytest.raises(outbound.FetchFailed, match="took longer than 0.5 s"):
        outbound.send(target, "GET", None, {}, timeout=0.5, max_bytes=4096)
    assert time.monotonic() - started < 1, "each read came within the timeout; the whole call may not"
