"""Every served model through MfluxEngine and mflux's own classes and generate_image, networks stood in for.

tests/mflux_networks.py replaces only the neural networks, at mflux's weight-loading level. So what runs here is
mflux's real initializer for each family, its prompt handling and tokenizer shapes, latent creation, schedulers,
callbacks and image pre- and post-processing, driven by our adapter, step bridge, previews, cancel, decode-path
choice and tiling. A family whose mflux code our adapter drives wrongly fails here; none of this runs a network.
"""

from __future__ import annotations

import json

import pytest

mx = pytest.importorskip("mlx.core", reason="the engine tests need MLX (make install provides the CPU build)")

from PIL import Image  # noqa: E402

from mflux_server.core import catalog  # noqa: E402
from mflux_server.worker.engines.base import Control, Job, ModelLoadFailed  # noqa: E402
from mflux_server.worker.engines.families import family_named  # noqa: E402
from mflux_server.worker.engines.mflux import TILE_DECODE_ABOVE_PIXELS, TILED_DECODE, MfluxEngine  # noqa: E402
from tests import mflux_networks  # noqa: E402
from tests.conftest import Recorder, StopHere  # noqa: E402

pytestmark = pytest.mark.engine

# The stand-ins hold no weights: a peak above this means a real network ran somewhere (a full-size one needs GiBs).
PEAK_BOUND = 512 * 2**20


@pytest.fixture(scope="module", autouse=True)
def networks_stood_in():
    with mflux_networks.installed():
        yield


@pytest.fixture
def peaks(monkeypatch) -> list[float]:
    """MLX's peak memory of each generation (the engine reads and resets it after each one)."""
    from mflux_server.worker.engines import mflux as engine_module

    seen: list[float] = []
    real = engine_module.take_peak_gib
    monkeypatch.setattr(engine_module, "take_peak_gib", lambda: seen.append(real()) or seen[-1])
    return seen


class PromptSpy:
    """A callback in mflux's own registry: records the prompt each generation encoded."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def call_before_loop(self, seed, prompt, latents, config, canny_image=None, depth_image=None,
                         control_images=None) -> None:
        self.prompts.append(prompt)


def jobs_for(info: catalog.ModelInfo) -> list[tuple[str, Job]]:
    """One job per input kind the model accepts, each at a size no other job uses."""
    can = info.capabilities
    picture, mask = Image.new("RGB", (256, 192), "red"), Image.new("L", (256, 192), 0)
    mask.paste(255, (64, 48, 192, 144))
    jobs = []
    if can.text_to_image:
        jobs.append(("text", Job("a red fox", 5, 128, 256, 3, None)))
        if can.guidance:
            jobs.append(("guidance", Job("a red fox", 5, 256, 128, 3, 2.5)))
        if can.negative_prompt:
            jobs.append(("negative prompt", Job("a red fox", 5, 192, 128, 3, None, negative_prompt="blurry")))
    if can.image_to_image:
        jobs.append(("image-to-image", Job("a red fox", 5, 256, 192, 4, None, image=picture, image_strength=0.5)))
    if can.edit:
        jobs.append(("edit", Job("make it blue", 5, 256, 192, 3, None, image=picture)))
        if info.max_reference_images > 1:
            others = tuple(Image.new("RGB", (128, 128), colour) for colour in ("green", "blue", "white"))
            jobs.append(("edit, several references",
                         Job("put them together", 5, 256, 192, 3, None, image=picture,
                             references=others[:info.max_reference_images - 1])))
    if can.inpaint and not can.try_on:
        jobs.append(("inpaint", Job("a hat", 5, 256, 192, 3, None, image=picture, mask=mask)))
    if can.try_on:
        garment = Image.new("RGB", (128, 160), "blue")
        jobs.append(("try-on", Job("a blue shirt", 5, 256, 192, 3, None, image=picture, mask=mask,
                                   references=(garment,), try_on=True)))
    if can.variation:
        others = (Image.new("RGB", (128, 128), "blue"),)
        jobs.append(("variation", Job("a red fox", 5, 256, 192, 3, None, image=picture, variation=True)))
        jobs.append(("variation, two images with strengths",
                     Job("a red fox", 5, 192, 192, 3, None, image=picture, references=others, variation=True,
                         strengths=(0.8, 0.3))))
    if can.upscale:  # twice the picture's size, from 96×64 (FLUX.1's upscaler needs multiples of 16)
        small = picture.resize((96, 64))
        jobs.append(("upscale", Job("a red fox", 5, 192, 128, 3, None, image=small, upscale=True)))
    if can.control:
        assert info.control is not None
        photo = Image.new("RGB", (320, 240), "white")
        photo.paste((20, 20, 20), (80, 60, 240, 180))  # a dark square: edges for Canny, a near object for depth
        strength = info.control.default_strength
        for number, kind in enumerate(info.control.types):
            jobs.append((f"{kind} control from a photo", Job("a red fox", 5, 192 + 16 * number, 256, 3, None,
                                                             control=Control(photo, kind, strength))))
        if info.control.maps:
            jobs.append(("control from a map", Job("a red fox", 5, 128, 192, 3, None,
                                                   control=Control(photo.convert("L"), info.control.types[0],
                                                                   strength, preprocess=False))))
    return jobs


def encoded(calls: list[str]) -> bool:
    """Whether an image went into a network's encoder (the VAE's, or a vision encoder's) during these calls."""
    return any(".encode" in call or "Vision" in call or "Image" in call.split(".")[0] for call in calls)


@pytest.mark.parametrize("info", catalog.models(), ids=lambda info: info.name)
def test_mflux_generates_every_input_kind_the_model_accepts(info, capfd, peaks):
    engine = MfluxEngine(info.name)
    family = family_named(info.family)
    models = [engine.adapter.model] + ([engine.adapter.edit_model] if engine.adapter.edit_model else [])
    assert type(models[0]) is family.load_class(), "the engine built mflux's own class"
    spy = PromptSpy()
    for model in models:
        model.callbacks.register(spy)
    for kind, job in jobs_for(info):
        recorder = Recorder(previews=True)
        mflux_networks.CALLS.clear()
        image = engine.generate(job, recorder)
        calls = list(mflux_networks.CALLS)
        assert image.size == (job.width, job.height), kind
        assert recorder.events[0] == "loop", kind
        steps = recorder.events[1:]
        total = steps[-1][1]
        assert steps == [(done, total) for done in range(1, total + 1)], f"{kind}: the bridge saw every step"
        assert any(preview is not None for preview in recorder.previews) or family.latent_format == "none", \
            f"{kind}: a preview was drawn"
        assert any("__call__" in call or "forward" in call for call in calls), f"{kind}: the denoiser ran: {calls}"
        assert any(".decode" in call or "Decoder" in call for call in calls) or family.latent_format == "pixels", \
            f"{kind}: mflux decoded the latents: {calls}"
        if job.image is not None or job.control is not None:
            assert encoded(calls), f"{kind}: mflux read the input image: {calls}"
        if job.image_strength is not None:
            assert total < job.steps, "image-to-image starts part-way through the schedule"
        if job.upscale:
            assert "TransformerControlnet.__call__" in calls, f"{kind}: the upscaler's ControlNet ran: {calls}"
        if job.control is not None:  # mflux's own preprocessors: Canny (OpenCV) in ControlnetUtil, Depth Pro
            if job.control.kind == "canny":
                assert any("controlnet" in call.lower() for call in calls), f"{kind}: the ControlNet ran: {calls}"
            if job.control.kind == "depth":
                assert ("DepthProModel.__call__" in calls) == job.control.preprocess, f"{kind}: {calls}"
    assert peaks and max(peaks) < PEAK_BOUND / 2**30, "no real network was evaluated"
    assert "it/s" not in capfd.readouterr().err, "mflux's progress bars are silenced"
    assert spy.prompts


@pytest.mark.parametrize("name", [info.name for info in catalog.models() if info.capabilities.text_to_image][::4])
def test_cancel_at_a_step_stops_mflux_there_and_the_model_runs_on(name):
    engine = MfluxEngine(name)
    recorder = Recorder(stop_at=2)
    with pytest.raises(StopHere):
        engine.generate(Job("a red fox", 1, 128, 128, 4, None), recorder)
    assert recorder.events == ["loop", (1, 4), (2, 4)]
    assert engine.generate(Job("a red fox", 1, 128, 128, 2, None), Recorder()).size == (128, 128)


@pytest.mark.parametrize("name", sorted({info.name for info in catalog.models() if info.family in TILED_DECODE
                                         and info.capabilities.text_to_image}))
def test_large_images_of_tiled_families_decode_in_tiles(name):
    engine = MfluxEngine(name)
    side = 1296  # just above TILE_DECODE_ABOVE_PIXELS
    assert side * side > TILE_DECODE_ABOVE_PIXELS
    mflux_networks.CALLS.clear()
    assert engine.generate(Job("a red fox", 1, side, side, 1, None), Recorder()).size == (side, side)
    decodes = [call for call in mflux_networks.CALLS if call.endswith(".decode")]
    assert len(decodes) > 1, "mflux decoded tile by tile"
    assert engine.adapter.model.tiling_config is None, "tiling is set for the large image only"
    mflux_networks.CALLS.clear()
    engine.generate(Job("a red fox", 1, 256, 256, 1, None), Recorder())
    assert len([call for call in mflux_networks.CALLS if call.endswith(".decode")]) == 1


def test_the_vae_decode_path_is_chosen_for_the_families_that_offer_one():
    engine = MfluxEngine("z-image-turbo")
    assert engine.adapter.model.vae.decode_mode == "legacy"  # MLX reports no memory limit on CPU: plenty
    engine = MfluxEngine("z-image-turbo", vae_decode="low_memory")
    assert engine.adapter.model.vae.decode_mode == "low_memory"
    assert engine.generate(Job("a red fox", 1, 128, 128, 1, None), Recorder()).size == (128, 128)


@pytest.mark.parametrize("name,key", [("fibo", "prompt"), ("fibo-edit", "edit_instruction")])
def test_fibo_gets_plain_text_wrapped_in_its_json_prompt_and_json_as_it_is(name, key):
    engine = MfluxEngine(name)  # loading warms up with a plain prompt: mflux json.loads every FIBO prompt
    spy = PromptSpy()
    engine.adapter.model.callbacks.register(spy)
    image = Image.new("RGB", (128, 128), "red") if name == "fibo-edit" else None
    engine.generate(Job("a red fox", 1, 128, 128, 2, None, image=image), Recorder())
    assert json.loads(spy.prompts[-1])[key] == "a red fox"
    structured = {key: "a fox", "style_medium": "photograph", "lighting": {"conditions": "golden hour"}}
    engine.generate(Job(json.dumps(structured), 1, 128, 128, 2, None, image=image), Recorder())
    assert json.loads(spy.prompts[-1]) == structured


def test_quantized_loading_runs_mflux_quantization_on_the_stand_ins():
    engine = MfluxEngine("schnell", quantize=4)
    assert engine.adapter.model.bits == 4
    import mlx.nn as nn

    assert any(isinstance(module, nn.QuantizedLinear) for _, module in engine.adapter.model.transformer.named_modules())
    assert engine.generate(Job("a red fox", 1, 128, 128, 2, None), Recorder()).size == (128, 128)


def test_a_jobs_lora_set_reaches_mfluxs_lora_loader_and_another_set_reloads_the_model(monkeypatch, tmp_path):
    # Applying a LoRA bakes it into the full-size weights (gigabytes): that one step is stood in for. The rest is
    # mflux's: the initializer hands the files to LoRALoader, whose own LoraResolution resolves each local file.
    from mflux.models.common.lora.mapping.lora_loader import LoRALoader
    from mflux.models.common.resolution.lora_resolution import LoraResolution

    from tests.fast.test_loras import keys_only_in, write_lora

    applied: list[tuple[list[str], list[float]]] = []

    def apply(lora_mapping, transformer, lora_paths=None, lora_scales=None, role=None, bake_lora=True,
              dense_weights=None):
        paths = LoraResolution.resolve_paths(lora_paths)
        if any("broken" in path for path in paths):
            raise ValueError("the adapter and this model do not match")  # as mflux says of a mismatched file
        applied.append((paths, list(lora_scales or [])))
        return paths, list(lora_scales or [])

    monkeypatch.setattr(LoRALoader, "load_and_apply_lora", staticmethod(apply))
    default = str(write_lora(tmp_path / "default.safetensors", keys_only_in("flux1", "qwen-image")))
    chosen = str(write_lora(tmp_path / "chosen.safetensors", keys_only_in("flux1", "qwen-image")))
    engine = MfluxEngine("schnell", lora_paths=[default], lora_scales=[0.5], warm_up_steps=0)
    assert applied == [([default], [0.5])], "the worker's default set, at load"
    engine.generate(Job("a fox", 1, 128, 128, 2, None), Recorder())
    assert len(applied) == 1, "a job without LoRAs runs the default set as loaded"
    image = engine.generate(Job("a fox", 1, 128, 128, 2, None, loras=((chosen, 1.5), (default, -0.25))), Recorder())
    assert applied[1:] == [([chosen, default], [1.5, -0.25])] and image.size == (128, 128)
    engine.generate(Job("a fox", 1, 128, 128, 2, None, loras=((chosen, 1.5), (default, -0.25))), Recorder())
    assert len(applied) == 2, "the same set again: no reload"
    engine.generate(Job("a fox", 1, 128, 128, 2, None), Recorder())
    assert applied[-1] == ([default], [0.5]) and engine.applied == ((default, 0.5),)
    broken = str(write_lora(tmp_path / "broken.safetensors", keys_only_in("flux1", "qwen-image")))
    with pytest.raises(ModelLoadFailed, match="do not match"):
        engine.use_loras(((broken, 1.0),))
    assert engine.model == "schnell" and engine.applied == ((default, 0.5),), "the default set is held again"


def test_a_hugging_face_reference_reaches_mfluxs_lora_resolution_as_it_was_named(monkeypatch):
    # mflux resolves org/repo:file itself (a download, or its cache): that one network step is stood in for.
    from mflux.models.common.resolution.lora_resolution import LoraResolution

    resolved: list[str] = []

    def resolve(path: str) -> str:
        resolved.append(path)
        raise ValueError(f"no network here for {path}")

    monkeypatch.setattr(LoraResolution, "resolve", staticmethod(resolve))
    engine = MfluxEngine("schnell", warm_up_steps=0)
    with pytest.raises(ModelLoadFailed, match="no network here for org/ink:styles/ink.safetensors"):
        engine.use_loras((("org/ink:styles/ink.safetensors", 0.7),))
    assert resolved == ["org/ink:styles/ink.safetensors"] and engine.model == "schnell", "the default set is held"


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")])
def test_an_mflux_image_carries_what_mflux_writes_and_mflux_info_reads_it_back(db, tmp_path, fmt, suffix):
    import subprocess
    import sys
    from xml.etree import ElementTree

    from mflux.utils.metadata_reader import MetadataReader

    from mflux_server.client import provenance
    from mflux_server.worker.encoding import encode
    from mflux_server.worker.generation_data import DIGITAL_SOURCE_TYPE, GenerationData
    from tests.conftest import queue_task

    prompt = "a lighthouse in fog, 灯台"
    engine = MfluxEngine("schnell", warm_up_steps=0)
    shared, private = (queue_task(db, prompt=prompt, seed=7, steps=2, width=128, height=128, private=private)
                       for private in (False, True))
    image = engine.generate(Job(prompt, 7, 128, 128, 2, None, image=Image.new("RGB", (128, 128), "teal"),
                                image_strength=0.5), Recorder())
    for task in (shared, private):
        data, _ = encode(image, fmt, 90, GenerationData.of(task, 0, engine.software, image))
        path = tmp_path / f"{task.id}{suffix}"
        path.write_bytes(data)
        read = MetadataReader.read_all_metadata(path)  # mflux's own reader, as mflux-info uses it
        exif = read["exif"]
        assert exif is not None and (exif["seed"], exif["steps"], exif["width"]) == (7, 2, 128)
        assert exif["model"] == "black-forest-labs/FLUX.1-schnell" and exif["mflux_version"] == "0.24.0"
        assert exif["image_strength"] == 0.5 and "image_path" not in exif, "input kinds, never the worker's files"
        ours = provenance.read(data)
        assert ours["digital_source_type"] == DIGITAL_SOURCE_TYPE and ours["generation_data"]["seed"] == 7
        if task is shared:
            assert exif["prompt"] == prompt and ours["generation_data"]["prompt"] == prompt
        else:
            assert "prompt" not in exif and ours["generation_data"]["prompt"] is None
            assert prompt.encode() not in data and prompt.encode("utf-16-be") not in data, "a private prompt stays out"
        if fmt == "PNG":
            carried = Image.open(path).text
            assert carried["parameters"].startswith(prompt if task is shared else "(prompt withheld)")
            # mflux 0.24.0's own XMP reader finds nothing in any image (it looks for "</<mflux:seed>"), so an XML
            # parser reads the packet: well-formed, mflux's fields, and this server's marking on the same description.
            description = ElementTree.fromstring(carried["XML:com.adobe.xmp"].split("?>", 1)[1].rsplit("<?", 1)[0]) \
                .find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
            assert description.findtext("{http://ns.mflux.ai/1.0/}seed") == "7"
            assert description.findtext("{http://ns.mflux.ai/1.0/}model") == "black-forest-labs/FLUX.1-schnell"
            assert description.get("{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}DigitalSourceType") == DIGITAL_SOURCE_TYPE
            assert (prompt.encode() in bytes.fromhex(carried["IPTC"])) is (task is shared), "mflux's IPTC block"
    shown = subprocess.run([sys.executable, "-m", "mflux.models.common.cli.info", str(tmp_path / f"{shared.id}{suffix}")],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and prompt in shown.stdout and "7" in shown.stdout, shown.stdout + shown.stderr
