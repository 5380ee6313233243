"""Who is asking: the API key of a request (Authorization: Bearer), checked before every view but the open ones.

With no key in the database the server is open, as on a laptop; once one exists (or with --auth required)
every request needs a live key. Keys are looked up by hash on every request, so a revocation holds at once in
every server process.
"""

from __future__ import annotations

import hmac
import math
import time

import marshmallow as ma
from flask import Flask, g, request
from marshmallow import fields

from mflux_server import store
from mflux_server.api.context import db, forecaster, settings
from mflux_server.api.errors import abort_json
from mflux_server.api.rate_counts import RateCounts
from mflux_server.core import api_keys, native
from mflux_server.core.rows import ApiKey

# Endpoints anyone may reach: the docs, the web UI's files, and the health checks.
OPEN_ENDPOINTS = {"web_ui", "web_assets", "swagger_assets", "api-docs.openapi_json", "api-docs.openapi_swagger_ui",
                  "health.healthz", "health.readyz", "static"}
COOKIE = "mflux_key"  # the web UI's copy of its key, for EventSource and <img>, which cannot send headers
TOUCH_EVERY = 60.0  # seconds between writes of a key's last use, per process
_touched: dict[int, float] = {}


def current_key() -> ApiKey | None:
    """The request's key; None when the server runs without keys."""
    key: ApiKey | None = g.get("api_key")
    return key


def owner_filter() -> int | None:
    """The key whose tasks a request may see, or None when it may see all (an admin key, or no keys)."""
    key = current_key()
    return None if key is None or key.admin else key.id


def may_see(task_key_id: int | None) -> bool:
    """Whether the request's key may see a task owned by this key id."""
    owner = owner_filter()
    return owner is None or task_key_id == owner


def presented_token() -> str | None:
    """The key a request carries: the Authorization header, or for reads the web UI's cookie."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if request.method in ("GET", "HEAD") and request.cookies.get(COOKIE):
        # Reads only: a cookie rides along on cross-site requests, so it never authorizes a change (CSRF).
        g.by_cookie = True
        return request.cookies[COOKIE]
    return None


def by_cookie() -> bool:
    """Whether the request's key came from the web UI's cookie, which may read but never change anything."""
    return bool(g.get("by_cookie"))


def deletes() -> bool:
    """Whether this image fetch asks to consume the image (delete, by default true), read as the view reads it."""
    try:
        return bool(fields.Boolean().deserialize(request.args.get("delete", "true")))
    except ma.ValidationError:
        return True  # the view refuses it; until then assume the harmful reading


def signed_image_link() -> bool:
    """Whether this is an image fetch carrying a valid link signature (links in answers and webhooks); the
    signature covers the delete choice, and a link signed before it did only opens without deleting."""
    if request.endpoint not in ("generation.image", "original-paths.image"):
        return False
    sig, task_id = request.args.get("sig", ""), request.args.get("task_id", "")
    index = request.args.get("index", "0")
    if not sig or not index.isdigit():
        return False
    delete = deletes()
    if hmac.compare_digest(sig, api_keys.link_signature(link_secret(), task_id, int(index), delete)):
        return True
    return not delete and hmac.compare_digest(sig, api_keys.link_signature(link_secret(), task_id, int(index)))


def link_secret() -> str:
    """The secret image links are signed with, kept in the queue (one for every server process)."""
    from flask import current_app

    found: str | None = current_app.extensions.get("mflux_link_secret")
    if found is None:
        found = db().secret(api_keys.LINKS_SECRET, api_keys.new_link_secret)
        current_app.extensions["mflux_link_secret"] = found
    return found


def rate_counts() -> RateCounts:
    """This process's batched per-key request counts (rate_counts.py), written to the queue file."""
    from flask import current_app

    found: RateCounts | None = current_app.extensions.get("mflux_rate_counts")
    if found is None:
        path = settings().db
        local = native.thread_local()

        def add(key_id: int, minute: int, n: int) -> int:
            if store.capabilities_of(path).pooled:  # greenlets sharing one session would interleave transactions
                borrowed = store.connect(path, pooled=True)
                try:
                    return borrowed.count_requests(key_id, minute, n)
                finally:
                    borrowed.close()
            # Its own session per thread: the count may be written from any request's thread.
            own: store.Store | None = getattr(local, "db", None)
            if own is None:
                own = local.db = store.connect(path)
            return own.count_requests(key_id, minute, n)

        found = current_app.extensions["mflux_rate_counts"] = RateCounts(add)
    return found


def keys_exist() -> bool:
    """Whether a key was ever created; once true it stays true (revoked keys count), so it is read until then
    (on PostgreSQL, again after each NOTIFY, which a new key sends)."""
    from flask import current_app

    if not current_app.extensions.get("mflux_keys_exist"):
        queue = db()
        current_app.extensions["mflux_keys_exist"] = forecaster().reads.get(
            queue, ("keys_exist",), lambda: queue.keys_exist())
    return bool(current_app.extensions["mflux_keys_exist"])


def authenticate() -> None:
    """Find the request's key, or refuse with a 401 (in the surface's own envelope) when one is needed."""
    g.api_key = None
    if request.endpoint in OPEN_ENDPOINTS or request.method == "OPTIONS":
        return
    token = presented_token()
    required = settings().auth == "required" or keys_exist()
    if token is None:
        if required and not signed_image_link():
            abort_json(401, code="unauthorized", field="Authorization", headers={"WWW-Authenticate": "Bearer"},
                       message="this server needs an API key: send Authorization: Bearer <key>")
        return
    key = db().key_by_hash(api_keys.key_hash(token))
    if key is None:
        if not required:
            return  # a server without keys ignores whatever a client sends (OpenAI clients always send one)
        abort_json(401, code="invalid_key", field="Authorization", headers={"WWW-Authenticate": "Bearer"},
                   message="the API key is not valid (unknown or revoked)")
    g.api_key = key
    limit = settings().rate_limit
    if limit is not None:
        within, left = rate_counts().count(key.id, limit)
        if not within:
            abort_json(429, code="too_many_requests", field=None, headers={"Retry-After": str(max(1, math.ceil(left)))},
                       message=f"the key {key.name!r} made over {limit} requests this minute "
                               f"(--rate-limit); retry in {math.ceil(left)} s")
    now = time.time()
    if now - _touched.get(key.id, 0.0) > TOUCH_EVERY:
        _touched[key.id] = now
        db().touch_key(key.id, now)


def init_app(app: Flask) -> None:
    """Check every request's key before its view."""
    app.before_request(authenticate)
