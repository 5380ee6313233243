"""The mflux engine: FLUX.1 through mflux's Flux1 class, ModelConfig names, quantization, LoRA and its callbacks."""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from mflux_server.core import catalog
from mflux_server.worker.engines.base import Job, StepReporter

log = logging.getLogger("mflux_worker")


class StepBridge:
    """An mflux callback (registered in the model's CallbackRegistry) that forwards loop events to our reporter."""

    def __init__(self) -> None:
        self.reporter: StepReporter | None = None

    def call_before_loop(self, seed: int, prompt: str, latents: Any, config: Any, canny_image: Any = None,
                         depth_image: Any = None, control_images: Any = None) -> None:
        """mflux calls this once the prompt is encoded and the latents exist."""
        if self.reporter is not None:
            self.reporter.loop_started()

    def call_in_loop(self, t: int, seed: int, prompt: str, latents: Any, config: Any, time_steps: Any) -> None:
        """mflux calls this after scheduling each step; raising here stops generation at this boundary."""
        import mlx.core as mx

        # MLX is lazy: evaluate now so the step's time is measured here and cancel lands after real work.
        mx.eval(latents)
        if self.reporter is not None:
            start = getattr(config, "init_time_step", 0) or 0
            self.reporter.step(t - start + 1, config.num_inference_steps - start)


def gpu_available() -> bool:
    """True when MLX can run on a GPU here (Metal on Apple Silicon, or CUDA)."""
    try:
        import mlx.core as mx
    except ImportError:
        return False
    metal = getattr(getattr(mx, "metal", None), "is_available", lambda: False)()
    cuda = getattr(getattr(mx, "cuda", None), "is_available", lambda: False)()
    return bool(metal or cuda)


class MfluxEngine:
    """Loads one FLUX.1 model once and generates with it."""

    name: str = "mflux"

    def __init__(
        self,
        model: str,
        quantize: int | None = None,
        model_path: str | None = None,
        lora_paths: list[str] | None = None,
        lora_scales: list[float] | None = None,
        flux: Any = None,
    ):
        info = catalog.resolve(model)
        if info is None:
            raise ValueError(f"unknown model {model!r}; the mflux engine runs: {', '.join(catalog.names())}")
        self.model: str = info.name
        self.quantize: int | None = quantize
        self.software: str = f"mflux-server mflux engine, model {info.name}"
        if flux is None:
            from mflux.models.common.config import ModelConfig
            from mflux.models.flux.variants.txt2img.flux import Flux1

            log.info("loading %s (quantize=%s, path=%s, loras=%s)", info.name, quantize, model_path, lora_paths)
            flux = Flux1(
                model_config=ModelConfig.from_name(model_name=info.name, base_model=None),
                quantize=quantize,
                model_path=model_path,
                lora_paths=lora_paths or None,
                lora_scales=lora_scales or None,
            )
        self.flux = flux
        self.bridge = StepBridge()
        flux.callbacks.register(self.bridge)

    def generate(self, job: Job, reporter: StepReporter) -> Image.Image:
        """Run mflux's generate_image with our step bridge attached."""
        self.bridge.reporter = reporter
        try:
            result = self.flux.generate_image(
                seed=job.seed,
                prompt=job.prompt,
                num_inference_steps=job.steps,
                height=job.height,
                width=job.width,
                guidance=job.guidance,
            )
        finally:
            self.bridge.reporter = None
        image: Image.Image = result.image
        return image
