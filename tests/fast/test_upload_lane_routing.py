"""Which requests the upload lane takes, and the request it hands its helper (the helper itself: tests/process)."""

from __future__ import annotations

import io

from mflux_server.api import upload_lane
from mflux_server.api.upload_lane import UPLOAD_BYTES, UploadLane, request_head
from mflux_server.core.settings import Settings


def environ(**extra: object) -> dict[str, object]:
    return {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/generate", "QUERY_STRING": "", "RAW_URI": "/api/generate",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(UPLOAD_BYTES), "wsgi.input": io.BytesIO(),
            **extra}


def test_the_helper_gets_the_request_as_parsed_with_one_connection_s_headers_of_its_own():
    head = request_head(environ(PATH_INFO="/api/tasks/a b/é", QUERY_STRING="x=1", HTTP_HOST="localhost:8000",
                                HTTP_AUTHORIZATION="Bearer k", HTTP_IDEMPOTENCY_KEY="one", HTTP_CONNECTION="keep-alive",
                                HTTP_EXPECT="100-continue", HTTP_TRANSFER_ENCODING="chunked",
                                HTTP_CONTENT_LENGTH="5"), 1234).decode("latin-1")
    lines = head.split("\r\n")
    assert lines[0] == "POST /api/tasks/a%20b/%E9?x=1 HTTP/1.1", "the path as this server read it, quoted again"
    assert head.endswith("\r\n\r\n")
    names = [line.split(":")[0].lower() for line in lines[1:] if line]
    assert {"host", "authorization", "idempotency-key", "content-type"} <= set(names)
    assert "expect" not in names and "transfer-encoding" not in names
    assert names.count("content-length") == 1 and "Content-Length: 1234" in lines
    assert names.count("connection") == 1 and "Connection: close" in lines


def test_only_large_posts_within_the_limit_go_to_the_helper(monkeypatch):
    lane = UploadLane(Settings(), limit=10 * UPLOAD_BYTES)
    assert lane.takes(environ())
    assert not lane.takes(environ(CONTENT_LENGTH=str(UPLOAD_BYTES - 1))), "small bodies stay in the process"
    assert not lane.takes(environ(CONTENT_LENGTH=str(10 * UPLOAD_BYTES + 1))), "over the limit: refused in place"
    assert not lane.takes(environ(CONTENT_LENGTH="")), "a chunked body has no length to check"
    assert not lane.takes(environ(CONTENT_LENGTH="12x"))
    assert not lane.takes(environ(REQUEST_METHOD="PUT"))
    monkeypatch.setattr(upload_lane.draining, "draining", lambda: True)
    assert not lane.takes(environ()), "a stopping process starts nothing new in its helper"
    assert not lane.path, "no folder is made before a helper is needed"
