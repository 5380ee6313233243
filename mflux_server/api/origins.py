"""Who may reach the API from a browser: the Host it answers to, CORS, and cross-site requests that change state.

One design, three rules (docs/sharing.md, "Cross-origin requests and host names"):
- Host: a name outside --allowed-hosts (besides localhost, any IP address and --public-url's host) is a 421, so a
  page whose DNS name was rebound to this machine (DNS rebinding) cannot talk to it.
- CORS: pages from --cors-origins (by default this machine's: localhost, 127.0.0.1 and [::1] on any port, and
  `null`, a page opened from a file) may call the API, preflights included. No Allow-Credentials (the cookie
  never rides cross-origin) and no Allow-Private-Network (so Chrome keeps public websites off a local server).
- Cross-site writes: a POST, PUT, PATCH or DELETE from a browser page of any other origin is a 403, even the
  "simple" ones (form posts) that browsers send without asking first.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from flask import Flask, Response, request

from mflux_server.api.context import settings
from mflux_server.api.errors import abort_json

LOCAL_NAMES = ("localhost",)
LOCAL_ORIGIN_HOSTS = ("localhost", "127.0.0.1", "::1")
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
ALLOWED_HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID"
EXPOSED_HEADERS = "Content-Disposition, Retry-After, X-Seed, WWW-Authenticate"


def _host_name(host: str) -> str:
    """The name of a Host header without its port, lower case, IPv6 brackets removed."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str) -> bool:
    """Whether the API answers to this Host header."""
    configured = [name.lower() for name in settings().allowed_hosts or []]
    name = _host_name(host)
    public = urlsplit(settings().public_url or "").hostname
    return ("*" in configured or _is_ip(name) or name in LOCAL_NAMES or name.endswith(".localhost")
            or name in configured or name == public)


def origin_allowed(origin: str) -> bool:
    """Whether a page of this origin may call the API (CORS) and post to it."""
    configured = settings().cors_origins
    if configured is None:
        if origin == "null":
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and _host_name(parts.netloc) in LOCAL_ORIGIN_HOSTS
    return "*" in configured or origin.rstrip("/") in [entry.rstrip("/") for entry in configured]


def same_origin(origin: str) -> bool:
    """Whether the Origin header names this server as the request reached it (its own web UI)."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()


def check_request() -> None:
    """Refuse a Host this server does not answer to, and a cross-site write from a page not allowed to make it."""
    if not host_allowed(request.host):
        abort_json(421, code="host_not_allowed", field="Host",
                   message=f"this server does not answer to the name {_host_name(request.host)!r}; its operator can "
                           "add it with --allowed-hosts (names in the Host header are checked to stop DNS rebinding)")
    origin = request.headers.get("Origin")
    cross_site = request.headers.get("Sec-Fetch-Site") == "cross-site"
    if request.method in UNSAFE_METHODS and (origin is not None or cross_site):
        if origin is None or not (same_origin(origin) or origin_allowed(origin)):
            abort_json(403, code="cross_origin_refused", field="Origin",
                       message=f"a web page from {origin or 'another site'} may not send this request; the server's "
                               "operator can allow that origin with --cors-origins")


def add_cors_headers(response: Response) -> Response:
    """CORS headers for an allowed origin, on preflights and on answers alike."""
    origin = request.headers.get("Origin")
    if origin is None or same_origin(origin) or not origin_allowed(origin):
        return response
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers.add("Vary", "Origin")
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response.headers["Access-Control-Allow-Methods"] = "GET, HEAD, POST, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
    else:
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    return response


def init_app(app: Flask) -> None:
    """Check every request's Host and Origin before anything else, and answer allowed origins with CORS."""
    app.before_request(check_request)
    app.after_request(add_cors_headers)
