"""The worker's CPU work beside the engine runs at a lower priority than the worker (and the API beside it)."""

from __future__ import annotations

import io
import os
import sys
import threading

import pytest
from PIL import Image, ImageChops, ImageStat

from mflux_server.core.rows import InputImage
from mflux_server.worker import low_priority
from mflux_server.worker.engines.synthetic import fitted


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="niceness is per thread on Linux only")
def test_the_low_priority_thread_is_nicer_than_the_caller_and_the_caller_is_unchanged() -> None:
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    there = low_priority.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    assert there == min(own + low_priority.NICENESS, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own


def test_inputs_are_decoded_there_whole_and_by_role() -> None:
    red, mask = Image.new("RGB", (32, 16), (200, 10, 10)), Image.new("L", (32, 16), 255)
    stored = {"image": InputImage("image", "image/png", 32, 16, _png(red)),
              "mask": InputImage("mask", "image/png", 32, 16, _png(mask))}
    images = low_priority.decoded(stored)
    assert set(images) == {"image", "mask"}
    # Decoded there, not on first use on the generation thread: Pillow lets go of the source once it has loaded.
    assert images["image"].fp is None and images["mask"].fp is None
    assert images["image"].getpixel((3, 3)) == (200, 10, 10) and images["mask"].mode == "L"
    assert low_priority.decoded({}) == {}


def test_an_error_there_reaches_the_caller() -> None:
    broken = {"image": InputImage("image", "image/png", 8, 8, b"not a png")}
    with pytest.raises(OSError):
        low_priority.decoded(broken)


def test_a_large_reference_fitted_looks_as_a_full_lanczos_pass_would() -> None:
    big = Image.radial_gradient("L").resize((2048, 2048)).convert("RGB")
    quick = fitted(big, (96, 128))
    full = big.resize((96, 128), Image.Resampling.LANCZOS)
    assert quick.size == (96, 128) and quick.mode == "RGB"
    difference = ImageStat.Stat(ImageChops.difference(quick, full)).mean
    assert max(difference) < 2.0  # of 255, per channel on average
    assert fitted(big.convert("L"), (10, 10), "L").mode == "L"
