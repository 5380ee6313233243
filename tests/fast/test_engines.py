"""The synthetic engine and image encoding: deterministic pixels, modelled time, GIL released, stop at a step."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image

from mflux_server.core.settings import Settings
from mflux_server.worker.encoding import encode
from mflux_server.worker.engines import choose_engine, make_engine, served_models
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


def generation_data(software: str, seed: int):
    from mflux_server.worker.generation_data import GenerationData

    return GenerationData("p", None, "schnell", seed, 4, None, 320, 192, [], [], software)


@pytest.mark.parametrize("fmt, mime", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
def test_encode_each_format(fmt, mime):
    image = SyntheticEngine("schnell", step=(0, 0, 0), fixed=(0, 0)).generate(JOB, Recorder())
    data, got_mime = encode(image, fmt, 80, generation_data("mflux-server synthetic engine", 42))
    decoded = Image.open(io.BytesIO(data))
    assert got_mime == mime and decoded.format == fmt and decoded.size == (320, 192)
    if fmt == "PNG":
        assert "synthetic" in decoded.text["Software"] and decoded.text["Seed"] == "42"


def test_jpeg_quality_changes_the_bytes():
    image = SyntheticEngine("schnell", step=(0, 0, 0), fixed=(0, 0)).generate(JOB, Recorder())
    labels = generation_data("s", 1)
    assert len(encode(image, "JPEG", 20, labels)[0]) < len(encode(image, "JPEG", 95, labels)[0])


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


# Image inputs, loading and out-of-memory in the synthetic engine, and the worker's choice of model


def _picture(size=(256, 128)):
    from PIL import Image

    image = Image.linear_gradient("L").resize(size).convert("RGB")
    return image


def test_synthetic_inpaint_keeps_every_unmasked_pixel_and_repaints_the_masked_ones():
    from PIL import Image, ImageChops

    source = _picture()
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (64, 32, 192, 96))
    engine = SyntheticEngine("dev-fill", step=(0, 0, 0), fixed=(0, 0))
    out = engine.generate(Job("hat", 3, 256, 128, 2, None, image=source, mask=mask), Recorder())
    diff = ImageChops.difference(out, source).convert("L")
    outside = Image.composite(Image.new("L", source.size, 0), diff, mask)
    assert outside.getbbox() is None, "an unmasked pixel changed"
    inside = Image.composite(diff, Image.new("L", source.size, 0), mask)
    assert inside.getbbox() is not None, "nothing under the mask was repainted"


def test_synthetic_image_to_image_blends_by_strength_and_edit_shows_the_reference():
    from PIL import ImageChops, ImageStat

    source = _picture()
    engine = SyntheticEngine("dev", step=(0, 0, 0), fixed=(0, 0))

    def distance(strength):
        out = engine.generate(Job("p", 1, 256, 128, 1, None, image=source, image_strength=strength), Recorder())
        return sum(ImageStat.Stat(ImageChops.difference(out, source)).mean)

    assert distance(1.0) < distance(0.6) < distance(0.2)
    edited = engine.generate(Job("p", 1, 256, 128, 1, None, image=source), Recorder())
    centre = edited.crop((64, 32, 192, 96))
    from PIL import Image

    assert ImageChops.difference(centre, source.resize((128, 64), Image.Resampling.LANCZOS)).getbbox() is None


def test_synthetic_edit_shows_every_reference_side_by_side():
    from PIL import Image, ImageChops

    engine = SyntheticEngine("qwen-image-edit", step=(0, 0, 0), fixed=(0, 0))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    references = [Image.new("RGB", (40, 40), colour) for colour in colours]
    edited = engine.generate(Job("p", 1, 256, 128, 1, None, image=references[0], references=tuple(references[1:])),
                             Recorder())
    cell, gap = 256 // 4, (256 - 3 * (256 // 4)) // 4
    for number, colour in enumerate(colours):
        left = gap + number * (cell + gap)
        patch = edited.crop((left, 32, left + cell, 96))
        assert ImageChops.difference(patch, Image.new("RGB", patch.size, colour)).getbbox() is None


def test_synthetic_out_of_memory_breaks_the_engine_until_reset():
    from mflux_server.worker.engines.base import OutOfMemory

    engine = SyntheticEngine("schnell", step=(0, 0, 0), fixed=(0, 0), max_pixels=512 * 512)
    with pytest.raises(OutOfMemory) as raised:
        engine.generate(Job("big", 1, 1024, 1024, 1, None), Recorder())
    assert raised.value.pixels == 1024 * 1024
    with pytest.raises(RuntimeError, match="unusable after running out of memory"):
        engine.generate(Job("small", 1, 256, 256, 1, None), Recorder())  # poisoned, as MLX was on the H100
    engine.reset()
    assert engine.generate(Job("small", 1, 256, 256, 1, None), Recorder()).size == (256, 256)


def test_synthetic_load_takes_its_time_and_a_missing_folder_fails():
    import time as _time

    from mflux_server.worker.engines.base import ModelLoadFailed

    engine = SyntheticEngine(load_seconds=0.2, speed=2.0)
    started = _time.perf_counter()
    engine.load("dev")
    assert 0.09 <= _time.perf_counter() - started < 1.0 and engine.model == "dev"
    with pytest.raises(ModelLoadFailed, match="no model folder at /nonexistent/flux1-dev-4bit"):
        engine.load("/nonexistent/flux1-dev-4bit")
    assert engine.model is None


def _head(model, seq, age, images=1, priority=0, now=1000.0):
    from mflux_server.core.rows import WaitingHead

    return WaitingHead(model, priority, seq, now - age, 1, images)


def test_choose_model_keeps_the_loaded_model_while_its_work_waits():
    from mflux_server.core.scheduling import choose_model

    heads = [_head("dev", 1, 50, images=9), _head("schnell", 5, 10)]
    assert choose_model(heads, "schnell", ["schnell", "dev"], 1000.0, 120) == "schnell"


def test_choose_model_switches_for_a_task_that_waited_past_the_bound():
    from mflux_server.core.scheduling import choose_model

    heads = [_head("dev", 1, 121), _head("schnell", 5, 10)]
    assert choose_model(heads, "schnell", ["schnell", "dev"], 1000.0, 120) == "dev"
    assert choose_model(heads, "schnell", ["schnell", "dev"], 1000.0, 0) == "dev"  # 0: first in, first out


def test_a_switch_starts_early_by_the_models_load_time_so_the_task_starts_within_the_bound():
    from mflux_server.core.scheduling import choose_model

    heads = [_head("dev", 1, 106), _head("schnell", 5, 10)]  # dev's head has waited 106 s of 120
    assert choose_model(heads, "schnell", ["schnell", "dev"], 1000.0, 120) == "schnell"
    assert choose_model(heads, "schnell", ["schnell", "dev"], 1000.0, 120, {"dev": 15.0}) == "dev"
    assert choose_model(heads, "schnell", ["schnell", "dev"], 1000.0, 120, {"dev": 10.0}) == "schnell"
    # a model never loaded here is expected to load like the others measured here
    assert choose_model(heads, "schnell", ["schnell", "dev"], 1000.0, 120, {"schnell": 15.0}) == "dev"
    # a model that loads in 1 s falls due only 1 s early
    own = [_head("schnell", 1, 106), _head("dev", 5, 10)]
    assert choose_model(own, "dev", ["schnell", "dev"], 1000.0, 120, {"dev": 15.0, "schnell": 1.0}) == "dev"


def test_choose_model_loads_the_most_waiting_work_and_respects_priority_and_what_it_serves():
    from mflux_server.core.scheduling import choose_model

    heads = [_head("dev", 1, 5, images=2), _head("krea-dev", 2, 5, images=6), _head("qwen-image", 0, 500, images=50)]
    assert choose_model(heads, None, ["dev", "krea-dev"], 1000.0, 120) == "krea-dev"
    assert choose_model(heads + [_head("dev", 9, 1, priority=1)], "krea-dev", ["dev", "krea-dev"], 1000.0, 120) == "dev"
    assert choose_model([_head("qwen-image", 0, 5)], "dev", ["dev"], 1000.0, 120) is None


def test_memory_needs_reproduce_what_the_h100_ran_and_refused():
    from mflux_server.worker.engines.memory import HEADROOM, need_of, pixel_limits

    h100 = 79.6 * HEADROOM  # an 80 GB card reports 79.6 GiB
    flux = need_of("schnell")
    assert flux is not None and need_of("filipstrand/FLUX.1-Krea-dev-mflux-4bit") is flux
    assert flux.largest_pixels(h100) >= 1920 * 1920  # ran at 62.2 GiB
    assert flux.largest_pixels(h100) < 2048 * 2048  # out of memory in every configuration
    qwen = need_of("qwen-image")
    assert qwen is not None
    assert qwen.gib(1024 * 1024) == pytest.approx(64.4, abs=0.1)
    assert qwen.largest_pixels(h100) >= 1536 * 1536  # passes with the tiled decode, at 70.2 GiB
    assert qwen.largest_pixels(50) == 0  # its weights alone do not fit
    assert qwen.largest_pixels(60) < 1280 * 1280  # below the tiling threshold the untiled slope applies
    # quantization shrinks the weights: 8-bit FLUX.1 fits a 48 GiB Mac at sizes bf16 cannot
    assert flux.largest_pixels(48, quantize=8) > 2 * flux.largest_pixels(48)
    limits = pixel_limits(["schnell", "qwen-image", "fibo"], 60, None, cap=1536 * 1536)
    assert limits["schnell"] == limits["fibo"] == 1536 * 1536 and limits["qwen-image"] < 1024 * 1024
    assert pixel_limits(["qwen-image"], None, None, cap=1024 * 1024) == {"qwen-image": 1024 * 1024}


def test_latent_preview_projects_packed_flux_latents_with_the_flux_factors():
    import mlx.core as mx
    import numpy as np

    from mflux_server.worker.engines.latent_formats import FLUX
    from mflux_server.worker.engines.previews import latent_preview

    height, width = 256, 128
    channels = np.zeros((16, height // 8, width // 8), dtype=np.float32)
    channels[4] = 5.0  # one channel strongly on: every pixel is 5 × its factor row, plus the bias
    channels[4, :, : width // 16] = -5.0  # and strongly off in the left half
    # mflux's packing: (1, C, 2R, 2C) → 2×2 patches → (1, R·C, C·4), index c·4 + dy·2 + dx.
    packed = channels.reshape(16, height // 16, 2, width // 16, 2).transpose(1, 3, 0, 2, 4).reshape(1, -1, 64)
    picture = latent_preview(mx.array(packed), height, width, FLUX)
    assert picture.size == (width // 8, height // 8)
    expected = [round(min(max((5 * f + b + 1) / 2, 0), 1) * 255) for f, b in zip(FLUX.factors[4], FLUX.bias, strict=True)]
    assert all(abs(a - e) <= 1 for a, e in zip(picture.getpixel((width // 8 - 1, 0)), expected, strict=True))
    assert picture.getpixel((0, 0)) != picture.getpixel((width // 8 - 1, 0)), "the two halves differ"
    assert latent_preview(mx.zeros((1, 7, 64)), height, width, FLUX) is None, "an unknown layout gives no preview"
    assert latent_preview(mx.array(packed), height, width, None) is None, "nor does an unknown latent space"


def test_each_latent_layout_shows_the_same_picture_through_its_formats_factors():
    import mlx.core as mx
    import numpy as np

    from mflux_server.worker.engines.latent_formats import FORMATS
    from mflux_server.worker.engines.previews import latent_preview

    height, width = 128, 256
    for latent_format in FORMATS.values():
        rows, columns, depth = height // latent_format.downscale, width // latent_format.downscale, latent_format.channels
        # A random picture (so a cell out of place shows), encoded into this latent space by least squares.
        target = np.random.default_rng(7).uniform(0.1, 0.9, (rows, columns, 3)).astype(np.float32)
        factors, bias = np.array(latent_format.factors), np.array(latent_format.bias)
        grid = (target * 2 - 1 - bias) @ np.linalg.pinv(factors)  # (rows, columns, depth)
        first = grid.transpose(2, 0, 1)[None]  # (1, C, H, W)
        tokens = grid.reshape(1, rows * columns, depth)
        patched = first.reshape(1, depth, rows // 2, 2, columns // 2, 2).transpose(0, 1, 3, 5, 2, 4)
        patched_first = patched.reshape(1, depth * 4, rows // 2, columns // 2)
        layouts = {"channels first": first, "tokens": tokens, "video frame": first[:, :, None],
                   "(C, 1, H, W)": first[0][:, None], "2×2 patches, channels first": patched_first,
                   "2×2 patches as tokens": patched_first.reshape(1, depth * 4, -1).transpose(0, 2, 1)}
        for layout, latents in layouts.items():
            picture = latent_preview(mx.array(latents.astype(np.float32)), height, width, latent_format)
            assert picture is not None, (latent_format.name, layout)
            assert picture.size == (columns, rows), (latent_format.name, layout)
            shown = np.asarray(picture, dtype=np.float32) / 255
            assert np.abs(shown - target).max() < 0.02, (latent_format.name, layout)


def test_synthetic_previews_reveal_the_final_image_step_by_step():
    recorder = Recorder(previews=True)
    job = Job("reveal", 3, 512, 256, 4, None)
    image = SyntheticEngine("schnell", step=(0, 0, 0), fixed=(0, 0)).generate(job, recorder)
    halfway, nearly = recorder.previews[1], recorder.previews[2]
    assert halfway.size == (256, 128), "previews are at most 256 px on the longer side"
    final = image.reduce(2)  # 512×256 to at most 256 px: a whole factor, so a box filter
    assert halfway.crop((0, 0, 256, 60)).tobytes() == final.crop((0, 0, 256, 60)).tobytes()
    assert halfway.crop((0, 70, 256, 128)).getcolors() == [(256 * 58, (24, 24, 24))], "the rest is not drawn yet"
    assert nearly.crop((0, 0, 256, 90)).tobytes() == final.crop((0, 0, 256, 90)).tobytes()


def test_a_model_whose_weights_cannot_fit_is_refused_with_the_numbers_and_the_fix():
    from mflux_server.worker.cli import NothingFits, fitting
    from mflux_server.worker.engines.memory import refusal

    why = refusal("schnell", 20, None)
    assert why is not None
    assert "needs about 33.2 GiB at bf16" in why and "this worker has 20.0 GiB" in why
    assert "--quantize 8" in why and "--quantize 4" in why
    assert "--quantize 8" not in refusal("schnell", 12, None)  # 8-bit (16.7 GiB) does not fit 12 either
    assert "more memory" in refusal("qwen-image", 8, 4)
    assert refusal("schnell", 40, None) is None and refusal("schnell", 20, 8) is None
    assert refusal("fibo", 1, None) is None  # no measured need: --max-pixels and out-of-memory teach the rest
    assert refusal("schnell", None, None) is None  # the CPU backend reports no memory
    assert fitting(["schnell", "z-image-turbo"], 20, None) == ["z-image-turbo"]
    with pytest.raises(NothingFits):
        fitting(["schnell"], 20, None)


def test_profiles_give_each_model_its_own_costs_load_and_cold_first_image(tmp_path):
    import json

    from mflux_server.worker.engines.synthetic_profiles import read_profiles

    path = tmp_path / "profiles.json"
    path.write_text(json.dumps({"qwen-image": {"step": [0.04, 0, 0], "fixed": [0.0, 0.0], "load": 0.2, "cold": 0.1},
                                "z-image-turbo": {"step": [0.01, 0, 0], "fixed": [0.0, 0.0], "drift": 0.5}}))
    engine = make_engine(Settings(engine="synthetic", synthetic_profiles=str(path)))
    assert isinstance(engine, SyntheticEngine)

    def timed(action) -> float:
        started = time.perf_counter()
        action()
        return time.perf_counter() - started

    assert timed(lambda: engine.load("qwen-image")) >= 0.2
    first, second = (timed(lambda: engine.generate(JOB, Recorder())) for _ in range(2))
    assert first >= 0.1 + 3 * 0.04 and 3 * 0.04 <= second < first - 0.05, "only the first image after a load is cold"
    assert timed(lambda: engine.load("z-image-turbo")) < 0.1
    drifted = [timed(lambda: engine.generate(JOB, Recorder())) for _ in range(12)]
    assert max(drifted) - min(drifted) > 0.01, "one factor moves all of an image's steps together"
    engine.load("schnell")  # not in the file: the engine's own settings
    assert engine.step_coef == Settings().synthetic_step
    path.write_text(json.dumps({"qwen-image": {"step": [1, 2], "fixed": [0, 0]}}))
    with pytest.raises(ValueError, match="qwen-image.*step must be a list of 3 numbers"):
        read_profiles(str(path))
    path.write_text(json.dumps({"qwen-image": {"step": [1, 2, 3], "fixed": [0, 0], "drift": 1.5}}))
    with pytest.raises(ValueError, match=r"drift must be a number in \[0, 1\)"):
        read_profiles(str(path))


def test_the_synthetic_picture_is_drawn_on_the_workers_low_priority_thread(monkeypatch):
    """The drawing stands in for the GPU's work: at full priority, shrinking large references took CPU from the
    API on the same cores that a real engine leaves to it."""
    from mflux_server.worker.engines import synthetic

    threads = []
    real_draw = synthetic.draw
    monkeypatch.setattr(synthetic, "draw", lambda job: threads.append(threading.current_thread().name) or real_draw(job))
    engine = SyntheticEngine("dev", step=(0, 0, 0), fixed=(0, 0))
    engine.generate(JOB, Recorder())
    assert len(threads) == 1 and threads[0].startswith("low-priority") and threads[0] != threading.current_thread().name
