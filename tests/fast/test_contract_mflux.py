"""Contract with the installed mflux: every class, name, parameter and callback hook the mflux engine uses exists."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

pytestmark = pytest.mark.contract

mx = pytest.importorskip("mlx.core", reason="the contract test needs MLX (make install provides the CPU build)")

from mflux.callbacks.callback import BeforeLoopCallback, InLoopCallback  # noqa: E402
from mflux.callbacks.callback_registry import CallbackRegistry  # noqa: E402
from mflux.models.common.config import ModelConfig  # noqa: E402
from mflux.models.common.config.config import Config  # noqa: E402

from mflux_server.core import catalog  # noqa: E402
from mflux_server.worker.engines.base import Job  # noqa: E402
from mflux_server.worker.engines.families import FAMILIES, NOT_SERVED  # noqa: E402
from mflux_server.worker.engines.mflux import MfluxEngine, StepBridge  # noqa: E402
from tests.conftest import Recorder, StopHere  # noqa: E402

PINNED = "0.24.0"


def params(func) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(func).parameters)


def test_the_pinned_mflux_is_installed():
    from importlib.metadata import version

    assert version("mflux") == PINNED, "update the pin in the Makefile and docs/models.md together with this test"


def test_the_committed_catalog_is_what_the_installed_mflux_builds():
    from mflux_server.worker.catalog_build import build, render

    assert catalog.CATALOG_FILE.read_text() == render(build()), "run: python -m mflux_server.worker.catalog_build"


def test_the_metadata_mflux_writes_is_listed_and_built_where_the_worker_reads_it():
    from mflux.utils.generated_image import GeneratedImage
    from mflux.utils.metadata_builder import MetadataBuilder

    from mflux_server.worker import mflux_metadata

    listed = inspect.getsource(GeneratedImage._get_metadata)
    for key in ("prompt", "negative_prompt", "seed", "steps", *mflux_metadata.PATHS):
        assert f'"{key}"' in listed, f"mflux's metadata no longer lists {key!r}"
    assert mflux_metadata.DESCRIPTION_END in MetadataBuilder.build_xmp_packet({"seed": 1})
    assert set(params(MetadataBuilder.build_iptc_binary)) == {"metadata"}


def test_the_committed_lora_patterns_are_what_the_installed_mflux_maps():
    from mflux_server.core.lora_library import PATTERNS_FILE
    from mflux_server.worker.catalog_build import build_patterns

    assert PATTERNS_FILE.read_bytes() == build_patterns(), "run: python -m mflux_server.worker.catalog_build"


@pytest.mark.parametrize("family, mapping", [("flux1", "mflux.models.flux.weights.flux_lora_mapping:FluxLoRAMapping"),
                                             ("qwen-image", "mflux.models.qwen.weights.qwen_lora_mapping:QwenLoRAMapping")])
def test_a_lora_fits_a_family_exactly_when_mfluxs_own_matcher_maps_its_tensors(family, mapping, tmp_path):
    import importlib

    from mflux.models.common.lora.mapping.lora_loader import LoRALoader

    from mflux_server.core.lora_library import families_of
    from tests.fast.test_loras import keys_only_in

    module, _, name = mapping.partition(":")
    mappings = LoRALoader._build_pattern_mappings(getattr(importlib.import_module(module), name).get_mapping())
    other = "qwen-image" if family == "flux1" else "flux1"
    for keys, fits in ((keys_only_in(family, other), True), (keys_only_in(other, family), False)):
        mflux_maps = all(any(LoRALoader._match_pattern(key, m.source_pattern) is not None for m in mappings)
                         for key in keys)
        assert mflux_maps is fits and (family in families_of(keys)) is fits, (family, keys[:2])


def test_every_registry_key_is_served_by_a_family_or_refused_with_a_reason():
    from mflux.models.common.config.model_config import AVAILABLE_MODELS

    served = {key for family in FAMILIES for key in family.registry_keys()}
    assert not served & NOT_SERVED.keys()
    assert set(AVAILABLE_MODELS) == served | NOT_SERVED.keys(), "classify every new mflux model in families.py"
    assert set(catalog.names()) == served


def test_the_issue_families_are_all_served_with_their_capabilities():
    caps = {info.name: info.capabilities for info in catalog.models()}
    for name in ("schnell", "dev", "krea-dev", "flux2-klein-4b", "flux2-klein-9b", "qwen-image", "z-image",
                 "z-image-turbo", "fibo"):
        assert caps[name].text_to_image, name
    assert caps["dev-kontext"].edit and not caps["dev-kontext"].text_to_image
    assert caps["dev-fill"].inpaint and not caps["dev-fill"].text_to_image
    assert caps["flux2-klein-4b"].edit and caps["flux2-klein-4b"].image_to_image
    assert caps["qwen-image-edit"].edit and caps["qwen-image"].negative_prompt
    assert not caps["schnell"].guidance and caps["dev"].guidance


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_each_family_class_takes_what_the_adapter_passes_and_keeps_mflux_callbacks(family):
    classes = [family.load_class()] + ([family.load_class(edit=True)] if family.edit_class else [])
    for cls in classes:
        init = params(cls.__init__)
        for name in ("quantize", "model_path", "model_config"):
            assert name in init, f"{cls.__name__}.__init__ lost {name}"
        generate = params(cls.generate_image)
        for name in ("seed", "prompt", "num_inference_steps", "height", "width"):
            assert name in generate, f"{cls.__name__}.generate_image lost {name}"
        # mflux builds the callback registry in each family's initializer; the bridge registers there.
        package = Path(inspect.getfile(cls))
        while package.parent.name != "models":
            package = package.parent
        sources = [path.read_text() for path in package.rglob("*.py")]
        assert any("CallbackRegistry()" in text for text in sources), f"{package.name} no longer builds callbacks"


@pytest.mark.parametrize("reference", [
    *[alias for info in catalog.models() for alias in (info.name, *info.aliases)],
    "filipstrand/FLUX.1-Krea-dev-mflux-4bit", "black-forest-labs/FLUX.1-dev", "mlx-community/flux2-klein-9b-8bit",
    "/models/my-z-image-turbo-4bit", "Qwen/Qwen-Image-2512",
])
def test_names_repos_and_folders_resolve_to_the_model_mflux_picks(reference):
    from mflux.models.common.resolution.config_resolution import ConfigResolution

    assert catalog.resolve_reference(reference).info.name == ConfigResolution.resolve_key(reference)


def test_callback_protocols_match_the_bridge():
    for protocol, method in ((InLoopCallback, "call_in_loop"), (BeforeLoopCallback, "call_before_loop")):
        theirs = [p for p in params(getattr(protocol, method)) if p != "self"]
        ours = [p for p in params(getattr(StepBridge, method)) if p != "self"]
        assert theirs == ours, f"{method}: mflux passes {theirs}, the bridge takes {ours}"


def test_the_registry_drives_the_bridge_through_a_real_generation_context():
    registry = CallbackRegistry()
    bridge = StepBridge()
    registry.register(bridge)
    assert registry.in_loop_callbacks() == [bridge] and registry.before_loop_callbacks() == [bridge]
    bridge.reporter = recorder = Recorder(stop_at=2)
    config = Config(model_config=ModelConfig.schnell(), num_inference_steps=3, width=256, height=256)
    ctx = registry.start(seed=1, prompt="p", config=config)
    latents = mx.zeros((1, 16, 64))
    ctx.before_loop(latents)
    ctx.in_loop(0, latents)
    with pytest.raises(StopHere):
        ctx.in_loop(1, latents)
    assert recorder.events == ["loop", (1, 3), (2, 3)]


def stand_in(cls):
    """A class with cls's exact constructor and generate_image signatures and mflux's real callback machinery.

    It checks what our adapter passes (argument names, input files, reference order) without mflux's code; that
    every model runs through mflux's own classes and generate_image is tests/engine/test_mflux_families.py.
    """

    class StandIn:
        instances = []

        def __init__(self, **kwargs):
            inspect.signature(cls.__init__).bind(None, **kwargs)  # TypeError if the adapter passes what cls lacks
            self.init = kwargs
            self.callbacks = CallbackRegistry()
            self.calls = []
            self.prompt_cache = {}
            StandIn.instances.append(self)

        def generate_image(self, **kwargs):
            from PIL import Image

            inspect.signature(cls.generate_image).bind(None, **kwargs)
            for key in ("image_path", "masked_image_path", "mask_path"):
                if key in kwargs:
                    assert Image.open(kwargs[key]).format == "PNG"
            for path in kwargs.get("image_paths", []):
                assert Image.open(path).format == "PNG"
            # The files live only during the call: keep what they held.
            self.references = [Image.open(path).copy()
                               for path in kwargs.get("image_paths", kwargs.get("redux_image_paths", []))]
            self.picture = Image.open(kwargs["image_path"]).copy() if "image_path" in kwargs else None
            self.calls.append(kwargs)
            config = Config(model_config=ModelConfig.dev(), num_inference_steps=kwargs["num_inference_steps"],
                            width=kwargs["width"], height=kwargs["height"])
            self.prompt_cache[kwargs["prompt"]] = (mx.ones((1, 4)), mx.ones((1, 2)))
            ctx = self.callbacks.start(seed=kwargs["seed"], prompt=kwargs["prompt"], config=config)
            latents = mx.zeros((1, 4, 4))
            ctx.before_loop(latents)
            for t in config.time_steps:
                ctx.in_loop(t, latents)
            ctx.after_loop(latents)

            class Result:  # what the engine reads of mflux's GeneratedImage
                image = Image.new("RGB", (kwargs["width"], kwargs["height"]))

                def _get_metadata(self):
                    return {"seed": kwargs["seed"], "prompt": kwargs["prompt"], "image_path": None}

            return Result()

    return StandIn


def engine_with_stand_ins(model, **options):
    built = []

    def build(cls, kwargs):
        built.append(stand_in(cls)(**kwargs))
        return built[-1]

    return MfluxEngine(model, build=build, **options), built


@pytest.mark.parametrize("info", [i for i in catalog.models() if i.max_reference_images > 1], ids=lambda i: i.name)
def test_several_references_or_image_prompts_are_passed_all_in_order(info):
    from PIL import Image

    engine, built = engine_with_stand_ins(info.name)
    colours = ["red", "green", "blue", "white"][:info.max_reference_images]
    pictures = [Image.new("RGB", (64 + 16 * n, 64), colour) for n, colour in enumerate(colours)]
    engine.generate(Job("combine them", 5, 256, 256, 2, None, image=pictures[0], references=tuple(pictures[1:])),
                    Recorder())
    used = next(instance for instance in built if instance.calls and instance.calls[-1]["prompt"] == "combine them")
    assert [(image.size, image.getpixel((0, 0))) for image in used.references] == \
        [(picture.size, picture.getpixel((0, 0))) for picture in pictures]


def test_reference_counts_follow_the_edit_signatures():
    by_name = {info.name: info for info in catalog.models()}
    # Kontext and FIBO Edit take one image_path; Qwen-Image-Edit and FLUX.2 klein edit take a list.
    assert by_name["dev-kontext"].max_reference_images == 1
    assert by_name["fibo-edit"].max_reference_images == 1
    assert by_name["qwen-image-edit"].max_reference_images == 4
    assert by_name["flux2-klein-4b"].max_reference_images == 4
    assert by_name["schnell"].max_reference_images == 0
    assert by_name["dev-redux"].max_reference_images == 4  # image prompts of a variation
    assert all((info.max_reference_images > 0) == (info.capabilities.edit or info.capabilities.variation)
               for info in catalog.models())


def test_a_variations_strengths_reach_mflux_in_the_order_of_its_images():
    from PIL import Image

    engine, built = engine_with_stand_ins("dev-redux")
    pictures = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    engine.generate(Job("a fox", 5, 128, 128, 2, None, image=pictures[0], references=(pictures[1],), variation=True,
                        strengths=(0.8, 0.2)), Recorder())
    call = built[-1].calls[-1]
    assert call["redux_image_strengths"] == [0.8, 0.2] and len(call["redux_image_paths"]) == 2
    assert [image.getpixel((0, 0)) for image in built[-1].references] == [(255, 0, 0), (0, 0, 255)]


def test_several_references_on_a_one_reference_family_are_refused_before_mflux():
    from PIL import Image

    engine, _ = engine_with_stand_ins("dev-kontext")
    picture = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="image_paths"):
        engine.adapter.call(Job("x", 1, 256, 256, 2, None, image=picture, references=(picture,)), {"image": "a.png"})


def test_out_of_memory_from_mlx_becomes_out_of_memory_and_reset_reloads():
    from mflux_server.worker.engines.base import OutOfMemory

    engine, built = engine_with_stand_ins("schnell")

    def fail(**kwargs):
        raise RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory")

    built[0].generate_image = fail
    with pytest.raises(OutOfMemory) as raised:
        engine.generate(Job("x", 1, 2048, 2048, 4, None), Recorder())
    assert raised.value.pixels == 2048 * 2048
    engine.reset()
    assert len(built) == 2 and engine.model == "schnell"
    assert engine.generate(Job("x", 1, 256, 256, 2, None), Recorder()).size == (256, 256)


def test_prompt_cache_is_bounded():
    from mflux_server.worker.engines.mflux import PROMPT_CACHE_ENTRIES

    engine, built = engine_with_stand_ins("schnell")
    for index in range(PROMPT_CACHE_ENTRIES + 10):
        engine.generate(Job(f"prompt {index}", 1, 128, 128, 1, None), Recorder())
    cache = built[0].prompt_cache
    assert len(cache) == PROMPT_CACHE_ENTRIES and f"prompt {PROMPT_CACHE_ENTRIES + 9}" in cache


def _loop_latents(family: str, height: int, width: int):
    """The latents each family's denoising loop starts from, made by mflux's own latent creators."""
    import importlib

    creators = {
        "flux1": "flux.latent_creator.flux_latent_creator:FluxLatentCreator",
        "qwen-image": "qwen.latent_creator.qwen_latent_creator:QwenLatentCreator",
        "z-image": "z_image.latent_creator.z_image_latent_creator:ZImageLatentCreator",
        "fibo": "fibo.latent_creator.fibo_latent_creator:FiboLatentCreator",
        "ernie-image": "ernie_image.latent_creator.ernie_latent_creator:ErnieLatentCreator",
        "qwen-image-2.1": "qwen21.latent_creator.qwen21_latent_creator:Qwen21LatentCreator",
        "flux3-klein": "flux3.latent_creator.flux3_latent_creator:Flux3LatentCreator",
        "moss-image": "moss_image.latent_creator.moss_image_latent_creator:MOSSImageLatentCreator",
        "krea-2": "krea2.latent_creator.krea2_latent_creator:Krea2LatentCreator",
        "anima": "anima.latent_creator.anima_latent_creator:AnimaLatentCreator",
        "ming-image": "ming_image.latent_creator.ming_latent_creator:MingLatentCreator",
        "iris": "iris.latent_creator.iris_latent_creator:IrisLatentCreator",
    }
    if family == "flux2-klein":
        from mflux.models.flux2.latent_creator.flux2_latent_creator import Flux2LatentCreator

        return Flux2LatentCreator.prepare_packed_latents(seed=1, height=height, width=width, batch_size=1)[0]
    module, _, name = creators[family].partition(":")
    return getattr(importlib.import_module("mflux.models." + module), name).create_noise(1, height, width)


@pytest.mark.parametrize("family", ["flux1", "flux2-klein", "qwen-image", "z-image", "fibo", "ernie-image", "qwen-image-2.1",
                                    "flux3-klein", "moss-image", "krea-2", "anima", "ming-image", "iris"])
def test_previews_read_the_latents_each_family_denoises(family):
    from mflux_server.worker.engines.families import family_named
    from mflux_server.worker.engines.latent_formats import FORMATS
    from mflux_server.worker.engines.previews import latent_preview

    latent_format = FORMATS[family_named(family).latent_format]
    height, width = 256, 128
    picture = latent_preview(_loop_latents(family, height, width), height, width, latent_format)
    assert picture is not None, f"{family}: its latents' layout or channel count is not the {latent_format.name} format's"
    assert picture.size == (width // latent_format.downscale, height // latent_format.downscale)


def test_every_family_names_a_latent_format():
    from mflux_server.worker.engines.latent_formats import FORMATS

    assert {family.name: family.latent_format for family in FAMILIES if family.latent_format not in FORMATS} == {}


def _gradient(size, colour):
    from PIL import Image

    picture = Image.linear_gradient("L").resize(size).convert("RGB")
    picture.paste(colour, (0, 0, 32, 32))
    return picture


def test_flux2_edit_images_reach_mflux_fitted_as_mflux_itself_would_fit_them(tmp_path):
    """Edit images above FLUX.2 klein's reference area are fitted on the worker's low-priority thread with mflux's
    own function: what reaches generate_image is exactly what mflux would have made of the original file, and
    mflux's own call (on the engine's thread) then changes nothing."""
    from mflux.models.flux2.variants.edit.flux2_klein_edit_helpers import MAX_REFERENCE_AREA, _Flux2KleinEditHelpers
    from mflux.utils.image_util import ImageUtil

    engine, built = engine_with_stand_ins("flux2-klein-4b")
    image, reference = _gradient((1200, 1000), "red"), _gradient((900, 1300), "blue")
    engine.generate(Job("combine them", 5, 256, 256, 2, None, image=image, references=(reference,)), Recorder())
    used = next(instance for instance in built if instance.calls and instance.calls[-1]["prompt"] == "combine them")
    for original, given in zip((image, reference), used.references, strict=True):
        unfitted = tmp_path / "unfitted.png"
        original.save(unfitted)  # what the worker wrote before: mflux fitted it on the engine's thread
        by_mflux = _Flux2KleinEditHelpers.prepare_reference_image(ImageUtil.load_image(unfitted).convert("RGB"))
        assert given.size == by_mflux.size and given.width * given.height <= MAX_REFERENCE_AREA
        assert given.convert("RGB").tobytes() == by_mflux.tobytes()
        again = _Flux2KleinEditHelpers.prepare_reference_image(ImageUtil.load_image(given).convert("RGB"))
        assert again.size == given.size and again.tobytes() == given.convert("RGB").tobytes()


def test_only_the_edit_images_of_an_edit_are_fitted():
    """Image-to-image runs FLUX.2 klein's text-to-image class, which takes the picture at the task's size, and a
    family without a fitting function gets its pictures as they were sent."""
    picture = _gradient((1200, 1000), "red")
    for model, job in (("flux2-klein-4b", Job("keep it", 5, 256, 256, 2, None, image=picture, image_strength=0.4)),
                       ("qwen-image-edit", Job("keep it", 5, 256, 256, 2, None, image=picture))):
        engine, built = engine_with_stand_ins(model)
        engine.generate(job, Recorder())
        used = next(instance for instance in built if instance.calls and instance.calls[-1]["prompt"] == "keep it")
        sent = used.picture or used.references[0]
        assert sent.size == (1200, 1000) and sent.tobytes() == picture.tobytes(), model
