"""The Engine protocol: turn a job into an image, reporting each denoising step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image


@dataclass(frozen=True)
class Job:
    """One image to generate."""

    prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float


class StepReporter(Protocol):
    """What an engine calls while it generates; raising from either call stops the generation there."""

    def loop_started(self) -> None:
        """The fixed work before the denoising loop (prompt encoding, latents) is done."""

    def step(self, done: int, total: int) -> None:
        """Denoising step `done` of `total` has finished."""


class Engine(Protocol):
    """Holds a loaded model and generates images one at a time."""

    name: str  # "mflux" or "synthetic"; shown to clients so nobody mistakes a test pattern for model output
    model: str
    quantize: int | None
    software: str  # written into every image file: which engine and model made it

    def generate(self, job: Job, reporter: StepReporter) -> Image.Image:
        """Generate one image; exceptions raised by the reporter propagate unchanged."""
