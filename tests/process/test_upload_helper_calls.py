"""The upload helper as a real process: what runs there, what it raises, and what happens when it cannot answer."""

from __future__ import annotations

import io
import os
import threading
import time

import pytest
from flask import Flask
from PIL import Image
from werkzeug.exceptions import UnprocessableEntity

from mflux_server.api import upload_lane
from mflux_server.api.image_inputs import verify_unless_kept
from mflux_server.api.request_body import parse_json_body
from mflux_server.api.upload_lane import UPLOAD_BYTES, HelperUnavailable, UploadHelper, offloaded


@pytest.fixture
def helper():
    started = UploadHelper("warning")
    yield started
    started.kill()
    if started.helper is not None:
        started.helper.wait(timeout=10)


def picture(fmt: str, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (64, 48), 128).save(out, fmt)
    return out.getvalue()


def test_calls_run_in_the_idle_class_helper_and_raise_here_what_they_raise_there(helper):
    assert helper.call(os.getpid) == helper.helper.pid != os.getpid()
    if hasattr(os, "SCHED_IDLE"):
        assert helper.call(os.sched_getscheduler, 0) == os.SCHED_IDLE, "its calls' threads are idle-class"
    assert helper.call(parse_json_body, b'{"prompt": "x"}') == {"prompt": "x"}
    with pytest.raises(UnprocessableEntity) as refused:
        helper.call(parse_json_body, b'{"prompt": "a", "prompt": "b"}')
    assert "prompt" in refused.value.data["errors"]["json"], "the refusal names its field, as in the process"

    jpeg = picture("JPEG")
    kept = helper.call(verify_unless_kept, jpeg, 1 << 20)
    assert (kept.mime, kept.width, kept.height, kept.data) == ("image/jpeg", 64, 48, b""), "kept: not sent back"
    converted = helper.call(verify_unless_kept, picture("TIFF", "CMYK"), 1 << 20)
    assert converted.mime == "image/png" and Image.open(io.BytesIO(converted.data)).mode == "RGB"


def test_a_helper_killed_or_silent_mid_call_leaves_the_call_to_the_process(helper, monkeypatch):
    assert helper.call(os.getpid) == helper.helper.pid
    failures: list[BaseException] = []

    def sleep_there() -> None:
        try:
            helper.call(time.sleep, 30)
        except HelperUnavailable as error:
            failures.append(error)

    caller = threading.Thread(target=sleep_there)
    caller.start()
    time.sleep(0.5)
    helper.helper.kill()
    caller.join(timeout=10)
    assert len(failures) == 1 and "gone" in str(failures[0])

    first = helper.helper.pid
    # The kernel closes a killed process's sockets before it has exited: a call in between also falls back
    # (its connection is reset), but this asks what the next call does once the helper is known to be dead.
    helper.helper.wait(timeout=5)
    with pytest.raises(HelperUnavailable, match="not running"):
        helper.call(os.getpid)  # died moments ago: not started again at once
    monkeypatch.setattr(upload_lane, "RESTART_AFTER", 0.0)
    monkeypatch.setattr(upload_lane, "CALL_TIMEOUT", 0.5)
    assert helper.call(os.getpid) == helper.helper.pid != first, "started again"
    with pytest.raises(HelperUnavailable, match="too slow"):
        helper.call(time.sleep, 5)
    assert helper.helper.wait(timeout=5) is not None, "a silent helper is ended"


def test_only_large_requests_use_the_helper_and_without_one_they_run_here(helper):
    app = Flask(__name__)
    upload_lane.install(helper)
    try:
        with app.test_request_context(data=b"x" * UPLOAD_BYTES):
            assert offloaded(os.getpid, pool="test", threads=1) == helper.helper.pid
        with app.test_request_context(data=b"x" * (UPLOAD_BYTES - 1)):
            assert offloaded(os.getpid, pool="test", threads=1) == os.getpid(), "a small request stays here"
        helper.helper.kill()
        helper.helper.wait(timeout=5)
        with app.test_request_context(data=b"x" * UPLOAD_BYTES):
            assert offloaded(os.getpid, pool="test", threads=1) == os.getpid(), "no helper (it just died): here"
    finally:
        upload_lane.install(None)
