"""The synthetic engine and image encoding: deterministic pixels, modelled time, GIL released, stop at a step."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image

from mflux_server.core.settings import Settings
from mflux_server.worker.encoding import encode
from mflux_server.worker.engines import served_models, choose_engine, make_engine
from mflux_server.worker.engines.base import Job
from mflux_server.worker.engines.synthetic import SyntheticEngine
from tests.conftest import Recorder, StopHere

JOB = Job("a red fox", 42, 320, 192, 3, 3.5)


def test_same_prompt_and_seed_give_the_same_pixels():
    engine = SyntheticEngine("schnell", step=(0, 0, 0), fixed=(0, 0))
    first = engine.generate(JOB, Recorder())
    second = engine.generate(JOB, Recorder())
    other_seed = engine.generate(Job("a red fox", 43, 320, 192, 3, 3.5), Recorder())
    other_prompt = engine.generate(Job("a blue fox", 42, 320, 192, 3, 3.5), Recorder())
    assert first.size == (320, 192) and first.mode == "RGB"
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != other_seed.tobytes() and first.tobytes() != other_prompt.tobytes()


def test_reports_loop_start_then_every_step():
    recorder = Recorder()
    SyntheticEngine("schnell", step=(0, 0, 0), fixed=(0, 0)).generate(JOB, recorder)
    assert recorder.events == ["loop", (1, 3), (2, 3), (3, 3)]


def test_takes_at_least_the_modelled_time_divided_by_speed():
    engine = SyntheticEngine("schnell", step=(0.1, 0.0, 0.0), fixed=(0.1, 0.1), speed=2.0)
    started = time.perf_counter()
    engine.generate(JOB, Recorder())
    assert time.perf_counter() - started >= (0.1 + 3 * 0.1 + 0.1) / 2 - 0.005


def test_step_cost_grows_with_pixels_as_configured():
    engine = SyntheticEngine("schnell", step=(0.1, 0.5, 0.25))
    assert engine.step_seconds(1024, 1024) == pytest.approx(0.85)
    assert engine.step_seconds(2048, 1024) == pytest.approx(0.1 + 1.0 + 1.0)


def test_waiting_releases_the_gil():
    engine = SyntheticEngine("schnell", step=(0.1, 0.0, 0.0), fixed=(0.0, 0.0))
    counter = 0
    done = threading.Event()

    def spin() -> None:
        nonlocal counter
        while not done.is_set():
            counter += 1

    thread = threading.Thread(target=spin)
    thread.start()
    engine.generate(JOB, Recorder())
    done.set()
    thread.join()
    assert counter > 100_000  # a busy-wait holding the GIL would leave this near zero


def test_raising_from_a_step_stops_generation_there():
    recorder = Recorder(stop_at=2)
    with pytest.raises(StopHere):
        SyntheticEngine("schnell", step=(0, 0, 0), fixed=(0, 0)).generate(JOB, recorder)
    assert recorder.events == ["loop", (1, 3), (2, 3)]


def test_noise_varies_durations_within_the_fraction():
    engine = SyntheticEngine("schnell", noise=0.05)
    samples = [engine._seconds(1.0) for _ in range(200)]
    assert 0.95 <= min(samples) < max(samples) <= 1.05


@pytest.mark.parametrize("fmt, mime", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
def test_encode_each_format(fmt, mime):
    image = SyntheticEngine("schnell", step=(0, 0, 0), fixed=(0, 0)).generate(JOB, Recorder())
    data, got_mime = encode(image, fmt, 80, "mflux-server synthetic engine", 42)
    decoded = Image.open(io.BytesIO(data))
    assert got_mime == mime and decoded.format == fmt and decoded.size == (320, 192)
    if fmt == "PNG":
        assert "synthetic" in decoded.text["Software"] and decoded.text["Seed"] == "42"


def test_jpeg_quality_changes_the_bytes():
    image = SyntheticEngine("schnell", step=(0, 0, 0), fixed=(0, 0)).generate(JOB, Recorder())
    assert len(encode(image, "JPEG", 20, "s", 1)[0]) < len(encode(image, "JPEG", 95, "s", 1)[0])


def test_auto_picks_synthetic_without_a_gpu_and_says_so(caplog):
    assert choose_engine("auto") == "synthetic"  # no Metal or CUDA on the test machines
    assert choose_engine("mflux") == "mflux"
    with caplog.at_level("WARNING"):
        engine = make_engine(Settings(engine="auto", model="dev-krea"))
    assert served_models(Settings(model="dev-krea", models=["schnell", "filipstrand/FLUX.1-Krea-dev-mflux-4bit"])) == [
        "krea-dev", "schnell", "filipstrand/FLUX.1-Krea-dev-mflux-4bit"]
    engine.load("krea-dev")
    assert engine.name == "synthetic" and engine.model == "krea-dev"
    assert "SYNTHETIC" in caplog.text
    assert "synthetic test image, not model output" in engine.software
