"""The Engine protocol: load a model, turn a job into an image reporting each denoising step, recover after a fault."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image


@dataclass(frozen=True)
class Control:
    """A job's control input: a photo the engine turns into a `kind` map (preprocess), or that map itself."""

    image: Image.Image
    kind: str  # canny, depth, pose, hed or mlsd
    strength: float | None = None  # None: the model's own default
    preprocess: bool = True


@dataclass(frozen=True)
class Job:
    """One image to generate, with the request's optional image inputs already decoded."""

    prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float | None  # None: the model's own default
    negative_prompt: str | None = None
    image: Image.Image | None = None  # the start image (image-to-image), the reference (edit) or the picture to fill
    mask: Image.Image | None = None  # white repaints, black keeps (inpaint)
    image_strength: float | None = None  # image-to-image: how much of the input survives, 0 to 1
    references: tuple[Image.Image, ...] = ()  # edit: more reference images after `image`, in order
    # LoRA files with their scales, in order; empty: the engine's default set (--lora-paths).
    loras: tuple[tuple[str, float], ...] = ()
    control: Control | None = None  # ControlNet or depth: the control image and how to use it
    upscale: bool = False  # an upscaler's job: `image` enlarged to width × height
    variation: bool = False  # a variation's job (FLUX.1 Redux): `image` and `references` are image prompts
    strengths: tuple[float, ...] = ()  # variations: each image prompt's strength; empty: the model's default
    try_on: bool = False  # a try-on's job (CatVTON): `references[0]` is the garment for the person in `image`

    @property
    def pixels(self) -> int:
        """Width times height."""
        return self.width * self.height


class ModelLoadFailed(Exception):
    """A model could not be loaded; the message says why, for the tasks that needed it."""


class OutOfMemory(Exception):
    """The job did not fit in the accelerator's memory; the engine needs reset() before it can run again."""

    def __init__(self, pixels: int, detail: str):
        super().__init__(detail)
        self.pixels = pixels


class EngineFault(Exception):
    """An accelerator error (CUDA, Metal) after which the loaded model may be unusable until reset."""


class StepReporter(Protocol):
    """What an engine calls while it generates; raising from either call stops the generation there."""

    def loop_started(self) -> None:
        """The fixed work before the denoising loop (prompt encoding, latents) is done."""

    def step(self, done: int, total: int, preview: Callable[[], Image.Image | None] | None = None) -> None:
        """Denoising step `done` of `total` has finished; `preview` draws the image so far, when one is due."""


class Engine(Protocol):
    """Holds one loaded model at a time and generates images one at a time."""

    name: str  # "mflux" or "synthetic"; shown to clients so nobody mistakes a test pattern for model output
    model: str | None  # the served name loaded now (a registry name, Hugging Face repo or local path)
    quantize: int | None

    @property
    def software(self) -> str:
        """Written into every image file: which engine and model made it."""

    def load(self, model: str) -> None:
        """Load (and warm up) a model, replacing the one held; raises ModelLoadFailed with a reason."""

    def use_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Hold the model with this LoRA set (files and scales; empty: the default set) before a task's images."""

    def generate(self, job: Job, reporter: StepReporter) -> Image.Image:
        """Generate one image; reporter exceptions propagate unchanged; OutOfMemory when it did not fit."""

    def reset(self) -> None:
        """Free accelerator memory and reload the held model after an error that can leave it unusable."""
