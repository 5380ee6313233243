"""Contract with the installed mflux: every class, name, parameter and callback hook the mflux engine uses exists."""

from __future__ import annotations

import inspect

import pytest

pytestmark = pytest.mark.contract

mx = pytest.importorskip("mlx.core", reason="the contract test needs MLX (make install provides the CPU build)")

from mflux.callbacks.callback import BeforeLoopCallback, InLoopCallback  # noqa: E402
from mflux.callbacks.callback_registry import CallbackRegistry  # noqa: E402
from mflux.models.common.config import ModelConfig  # noqa: E402
from mflux.models.common.config.config import Config  # noqa: E402
from mflux.models.flux.variants.txt2img.flux import Flux1  # noqa: E402
from mflux.utils.generated_image import GeneratedImage  # noqa: E402

from mflux_server.core import catalog  # noqa: E402
from mflux_server.worker.engines.base import Job  # noqa: E402
from mflux_server.worker.engines.mflux import MfluxEngine, StepBridge  # noqa: E402
from tests.conftest import Recorder, StopHere  # noqa: E402

PINNED = "0.24.0"


def params(func) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(func).parameters)


def test_the_pinned_mflux_is_installed():
    from importlib.metadata import version

    assert version("mflux") == PINNED, "update the pin in the Makefile and README together with this test"


@pytest.mark.parametrize("info", catalog.CATALOG, ids=lambda i: i.name)
def test_every_catalog_name_and_alias_resolves_to_a_flux1_config(info):
    for name in (info.name, *info.aliases):
        config = ModelConfig.from_name(model_name=name, base_model=None)
        assert "FLUX.1" in config.model_name
        assert bool(config.supports_guidance) == info.supports_guidance


def test_flux1_constructor_takes_what_the_engine_passes():
    got = params(Flux1.__init__)
    for name in ("model_config", "quantize", "model_path", "lora_paths", "lora_scales"):
        assert name in got, f"Flux1.__init__ lost {name}"


def test_generate_image_takes_what_the_engine_passes_and_returns_a_generated_image():
    got = params(Flux1.generate_image)
    for name in ("seed", "prompt", "num_inference_steps", "height", "width", "guidance"):
        assert name in got, f"Flux1.generate_image lost {name}"
    assert inspect.signature(Flux1.generate_image).return_annotation in (GeneratedImage, "GeneratedImage")
    assert "image" in params(GeneratedImage.__init__)


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


class FluxWithoutWeights:
    """Stands in for Flux1 (whose weights cannot be downloaded here), running mflux's real callback machinery."""

    def __init__(self):
        self.callbacks = CallbackRegistry()
        self.calls = []

    def generate_image(self, seed, prompt, num_inference_steps, height, width, guidance):
        from PIL import Image

        self.calls.append((seed, prompt, num_inference_steps, height, width, guidance))
        config = Config(model_config=ModelConfig.dev(), num_inference_steps=num_inference_steps, width=width,
                        height=height, guidance=guidance)
        ctx = self.callbacks.start(seed=seed, prompt=prompt, config=config)
        latents = mx.zeros((1, 4, 4))
        ctx.before_loop(latents)
        for t in config.time_steps:
            ctx.in_loop(t, latents)
        ctx.after_loop(latents)

        class Result:
            image = Image.new("RGB", (width, height))

        return Result()


def test_engine_passes_job_fields_and_reports_steps():
    flux = FluxWithoutWeights()
    engine = MfluxEngine("dev", quantize=8, flux=flux)
    recorder = Recorder()
    image = engine.generate(Job("fox", 5, 256, 128, 4, 3.5), recorder)
    assert flux.calls == [(5, "fox", 4, 128, 256, 3.5)]
    assert recorder.events == ["loop", (1, 4), (2, 4), (3, 4), (4, 4)]
    assert image.size == (256, 128) and engine.bridge.reporter is None
    assert (engine.name, engine.model, engine.quantize) == ("mflux", "dev", 8)
    assert engine.software == "mflux-server mflux engine, model dev"
