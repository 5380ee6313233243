"""The synthetic engine: deterministic procedural images with realistic, configurable per-step timing; no weights."""

from __future__ import annotations

import hashlib
import random
import time

from PIL import Image, ImageDraw, ImageOps

from mflux_server.worker.engines.base import Job, StepReporter

LABEL = "SYNTHETIC TEST IMAGE - mflux-server synthetic engine, not model output"


def megapixels(width: int, height: int) -> float:
    """Pixel count in units of 2**20."""
    return width * height / 2**20


def sleep_until(deadline: float) -> None:
    """Sleep (releasing the GIL, as MLX evaluation does) until a perf_counter deadline."""
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


def draw(job: Job) -> Image.Image:
    """A deterministic picture of prompt and seed: same inputs, same pixels."""
    digest = hashlib.sha256(f"{job.seed}\x00{job.prompt}".encode()).digest()
    rnd = random.Random(digest)

    def colour() -> tuple[int, int, int]:
        return (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))

    gradient = Image.linear_gradient("L").rotate(rnd.randrange(360), expand=False, fillcolor=128)
    image = ImageOps.colorize(gradient.resize((job.width, job.height)), colour(), colour()).convert("RGB")
    canvas = ImageDraw.Draw(image)
    for _ in range(6 + rnd.randrange(6)):
        x0, y0 = rnd.randrange(job.width), rnd.randrange(job.height)
        w, h = rnd.randrange(job.width // 8, job.width // 2), rnd.randrange(job.height // 8, job.height // 2)
        shape = canvas.ellipse if rnd.random() < 0.5 else canvas.rectangle
        shape((x0 - w // 2, y0 - h // 2, x0 + w // 2, y0 + h // 2), fill=colour(), outline=colour(), width=3)
    canvas.rectangle((0, 0, job.width, 18), fill=(0, 0, 0))
    canvas.text((4, 3), f"{LABEL} | seed {job.seed}", fill=(255, 255, 255))
    return image


class SyntheticEngine:
    """Sleeps a + b·mp + c·mp² seconds a step, plus fixed seconds before and after the loop, then draws."""

    name: str = "synthetic"

    def __init__(
        self,
        model: str,
        step: tuple[float, float, float] = (0.05, 0.6, 0.3),
        fixed: tuple[float, float] = (0.2, 0.1),
        noise: float = 0.0,
        speed: float = 1.0,
    ):
        self.model: str = model
        self.quantize: int | None = None
        self.software: str = f"mflux-server synthetic engine, model {model} (synthetic test image, not model output)"
        self.step_coef = step
        self.fixed = fixed
        self.noise = noise
        self.speed = speed
        self._rnd = random.Random()

    def _seconds(self, nominal: float) -> float:
        jitter = 1.0 + self._rnd.uniform(-self.noise, self.noise) if self.noise else 1.0
        return max(nominal * jitter, 0.0) / self.speed

    def step_seconds(self, width: int, height: int) -> float:
        """Nominal seconds of one step at this size, before noise and speed."""
        a, b, c = self.step_coef
        mp = megapixels(width, height)
        return a + b * mp + c * mp * mp

    def generate(self, job: Job, reporter: StepReporter) -> Image.Image:
        """Wait out the modelled durations step by step, reporting each, then draw the image."""
        # Deadlines rather than plain sleeps, so reporting and drawing overhead do not add up over steps.
        deadline = time.perf_counter() + self._seconds(self.fixed[0])
        sleep_until(deadline)
        reporter.loop_started()
        per_step = self.step_seconds(job.width, job.height)
        for done in range(1, job.steps + 1):
            deadline += self._seconds(per_step)
            sleep_until(deadline)
            reporter.step(done, job.steps)
        deadline += self._seconds(self.fixed[1])
        image = draw(job)
        sleep_until(deadline)
        return image
