"""Requests the server makes itself (webhooks, image_url fetches): http(s) only, no private targets unless allowed.

A name is resolved once and the connection goes to the address that was checked, so a DNS answer that changes
between the check and the connect (DNS rebinding) cannot steer a request to the loopback or private network.
Redirects are not followed: a redirect could point anywhere.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEMES = {"http": 80, "https": 443}
MAX_URL_LENGTH = 2048


class TargetRefused(ValueError):
    """A URL the server will not contact; the message says why."""


class FetchFailed(OSError):
    """The target was contacted but did not give what was asked; the message says why."""


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL and the address its connection must use."""

    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent on the request line
    address: str


# IPv6 prefixes whose last 32 bits are an IPv4 address a gateway forwards to: NAT64's well-known prefix
# (RFC 6052), IPv4-compatible addresses (deprecated ::a.b.c.d); NAT64's local-use prefix is never public.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_ISATAP = (b"\x00\x00\x5e\xfe", b"\x02\x00\x5e\xfe")  # interface ids ::0:5efe:a.b.c.d and ::200:5efe:a.b.c.d


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: mapped, 6to4, Teredo, NAT64, IPv4-compatible, ISATAP."""
    found = [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour) if v4 is not None]
    found += list(ip.teredo or ())  # the Teredo server and the client behind it
    tail = ipaddress.IPv4Address(ip.packed[12:])
    if ip in _NAT64 or (ip.packed[:12] == bytes(12) and int(tail) > 1) or ip.packed[8:12] in _ISATAP:
        found.append(tail)
    return found


def private_reason(address: str) -> str | None:
    """Why an IP address is not public (loopback, private, link-local, ...), or None for a public one."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return "private"
        for v4 in embedded_ipv4(ip):  # a public-looking IPv6 form of a loopback or private IPv4 address
            reason = private_reason(str(v4))
            if reason is not None:
                return reason
        if ip.ipv4_mapped is not None or ip in _NAT64:  # these are the IPv4 address, which passed
            return None
    for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):  # specific first
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "not globally routable"


def check_url(url: str, allow_private: bool, resolve: bool = True) -> Target:
    """Parse and check a URL the server is asked to contact; TargetRefused says what is wrong with it."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise TargetRefused(f"is not a valid URL ({error})") from None
    if parts.scheme.lower() not in SCHEMES:
        raise TargetRefused(f"must be an http:// or https:// URL, got {parts.scheme + ':' if parts.scheme else 'no scheme'}")
    if not parts.hostname:
        raise TargetRefused("has no host")
    scheme = parts.scheme.lower()
    port = port or SCHEMES[scheme]
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not resolve:
        return Target(url, scheme, parts.hostname, port, path, parts.hostname)
    try:
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise TargetRefused(f"names a host that does not resolve: {parts.hostname} ({error})") from None
    addresses = [str(info[4][0]) for info in found]
    if not allow_private:
        for address in addresses:
            reason = private_reason(address)
            if reason is not None:
                raise TargetRefused(f"resolves to a {reason} address ({address}); the server only contacts public "
                                    "addresses unless the operator allows private ones")
    return Target(url, scheme, parts.hostname, port, path, addresses[0])


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with the certificate verified for the URL's host name."""

    raw_sock: socket.socket | None = None

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.raw_sock = sock
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a checked address, with the URL's host name in the Host header."""

    raw_sock: socket.socket | None = None

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = self.raw_sock = socket.create_connection((self._address, self.port), self.timeout)


def send(target: Target, method: str, body: bytes | None, headers: dict[str, str], timeout: float,
         max_bytes: int) -> tuple[int, bytes]:
    """One request to a checked target; returns the status and at most max_bytes + 1 bytes of the body.

    `timeout` bounds the whole call, not each read: a peer that trickles a byte at a time (each read well within
    any per-read timeout) has its connection cut at the deadline, so it cannot hold a sender for minutes."""
    kind = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
    connection = kind(target.host, target.address, target.port, timeout)
    deadline = time.monotonic() + timeout
    watchdog = threading.Timer(timeout, _cut, args=(connection,))
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request(method, target.path, body=body, headers={"User-Agent": "mflux-server", **headers})
        response = connection.getresponse()
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = response.read1(min(65536, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if time.monotonic() >= deadline:
            raise FetchFailed(f"took longer than {timeout:g} s")
        return response.status, b"".join(chunks)
    except (OSError, http.client.HTTPException) as error:
        if time.monotonic() >= deadline and not isinstance(error, FetchFailed):
            raise FetchFailed(f"took longer than {timeout:g} s") from None
        raise
    finally:
        watchdog.cancel()
        connection.close()


def _cut(connection: _PinnedHTTP | _PinnedHTTPS) -> None:
    """The whole-call deadline passed: shut the socket, which ends whatever read or write is blocked on it."""
    # Not connection.sock: http.client drops it once the response says the connection will close, while the
    # response goes on reading from the same socket.
    sock = connection.raw_sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def fetch(url: str, allow_private: bool, max_bytes: int, timeout: float) -> bytes:
    """GET a URL's body (an input image), within a size and time limit; TargetRefused or FetchFailed say why not."""
    target = check_url(url, allow_private)
    try:
        status, body = send(target, "GET", None, {"Accept": "image/*"}, timeout, max_bytes)
    except (OSError, http.client.HTTPException) as error:
        if isinstance(error, FetchFailed):
            raise
        raise FetchFailed(f"could not be fetched: {error}") from None
    if status != 200:
        raise FetchFailed(f"answered HTTP {status}, not 200" + (" (redirects are not followed)" if 300 <= status < 400 else ""))
    if len(body) > max_bytes:
        raise FetchFailed(f"is over {max_bytes} bytes")
    return body
