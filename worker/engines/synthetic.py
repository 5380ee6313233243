"""The synthetic engine: deterministic procedural images with realistic, configurable per-step timing; no weights."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageOps

from mflux_server.core.settings import H100_STEP_COST
from mflux_server.worker import low_priority
from mflux_server.worker.engines.base import Control, Job, ModelLoadFailed, OutOfMemory, StepReporter
from mflux_server.worker.engines.previews import revealed
from mflux_server.worker.engines.synthetic_profiles import Profile

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


def fitted(image: Image.Image, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """The image in `mode` at `size`, Lanczos-resampled after whole-factor reduction (Pillow's reducing_gap): a
    4096² reference costs a sixth of a full Lanczos pass (0.03 s against 0.19 s here) for the same look."""
    return (image if image.mode == mode else image.convert(mode)).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def with_inputs(pattern: Image.Image, job: Job) -> Image.Image:
    """Show the job's image inputs visibly: blend (image-to-image), repaint under the mask (inpaint), show (edit),
    enlarge (upscale)."""
    if job.image is None:
        return pattern
    size = (job.width, job.height)
    source = job.image.convert("RGB") if job.image.size == size else fitted(job.image, size)
    if job.upscale:  # the source's content at the new size, a little sharpened, as an upscaler's would be
        return source.filter(ImageFilter.UnsharpMask(radius=2, percent=60))
    if job.variation:  # variations: each image prompt pulls the pattern towards it, by its strength
        prompts = [source, *(fitted(reference, size) for reference in job.references)]
        for prompt, strength in zip(prompts, job.strengths or [0.5] * len(prompts), strict=True):
            pattern = Image.blend(pattern, prompt, strength / 2)
        return pattern
    if job.mask is not None:
        # Binary, so every pixel outside the mask is the input's own, exactly (checked in PNG by the tests).
        mask = job.mask.convert("L")
        mask = mask if mask.size == size else mask.resize(size, Image.Resampling.NEAREST)
        mask = mask.point(lambda v: 255 if v >= 128 else 0)
        if job.try_on and job.references:  # the garment, stretched over the masked area, on the person
            box = mask.getbbox() or (0, 0, *size)
            garment = fitted(job.references[0], (box[2] - box[0], box[3] - box[1]))
            pattern = pattern.copy()
            pattern.paste(garment, box[:2])
        return Image.composite(pattern, source, mask)
    if job.image_strength is not None:
        return Image.blend(pattern, source, job.image_strength)
    # Edit: the references, shrunk, side by side in the middle of the pattern (one is half the width).
    references = [source, *job.references]
    cell = (job.width // (len(references) + 1), job.height // 2)
    gap = (job.width - cell[0] * len(references)) // (len(references) + 1)
    for number, reference in enumerate(references):
        pattern.paste(fitted(reference, cell), (gap + number * (cell[0] + gap), job.height // 4))
    return pattern


def control_map(control: Control, size: tuple[int, int]) -> Image.Image:
    """The map a control image stands for, as the synthetic engine draws it: edges for canny and the line maps,
    brightness (near is bright) for depth; a finished map (preprocess off) as it is."""
    image = fitted(control.image, size, "L")
    if not control.preprocess:
        return image
    if control.kind == "depth":
        return image.filter(ImageFilter.GaussianBlur(2))
    return image.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v >= 48 else 0)


def with_control(pattern: Image.Image, job: Job) -> Image.Image:
    """Show the job's control map visibly: painted over the pattern, as far as its strength says (default ½)."""
    if job.control is None:
        return pattern
    share = min(1.0, 0.5 if job.control.strength is None else job.control.strength)
    return Image.blend(pattern, control_map(job.control, pattern.size).convert("RGB"), max(share, 0.0))


LORA_TINT_PER_SCALE = 0.15  # how far a LoRA of scale 1 pulls the picture towards its colour


def lora_colour(path: str) -> tuple[int, int, int]:
    """The colour a LoRA file tints synthetic pictures with: one per file name, the same on every run."""
    digest = hashlib.sha256(Path(path).name.encode()).digest()
    return (digest[0], digest[1], digest[2])


def with_loras(pattern: Image.Image, job: Job) -> Image.Image:
    """Show the job's LoRAs visibly: each tints the picture towards its colour, as far as its scale says."""
    for path, scale in job.loras:
        share = min(1.0, LORA_TINT_PER_SCALE * abs(scale))
        pattern = Image.blend(pattern, Image.new("RGB", pattern.size, lora_colour(path)), share)
    return pattern


class SyntheticEngine:
    """Sleeps a + b·mp + c·mp² seconds a step, plus fixed seconds before and after the loop, then draws.

    Loading a model sleeps `load_seconds`; a local path that does not exist fails to load, as it would in mflux.
    Above `max_pixels` a job raises OutOfMemory and leaves the engine broken until reset() or load(), as MLX does.
    """

    name: str = "synthetic"

    def __init__(
        self,
        model: str | None = None,
        step: tuple[float, float, float] = H100_STEP_COST,
        fixed: tuple[float, float] = (0.2, 0.1),
        noise: float = 0.0,
        speed: float = 1.0,
        load_seconds: float = 0.0,
        lora_seconds: float = 0.0,
        max_pixels: int | None = None,
        profiles: dict[str, Profile] | None = None,
    ):
        self.model: str | None = None
        self.quantize: int | None = None
        self.step_coef = step
        self.fixed = fixed
        self.noise = noise
        self.speed = speed
        self.load_seconds = load_seconds
        self.lora_seconds = lora_seconds
        self.applied: tuple[tuple[str, float], ...] = ()  # the LoRA set held; a load holds the default (none)
        self.max_pixels = max_pixels
        # Per-model timings (step, fixed, load, cold first image, drift) for models named there; others use the above.
        self.profiles = profiles or {}
        self.default = Profile(step, fixed, load_seconds)
        self.drift = 0.0
        self.cold = 0.0  # seconds the next image still owes for being the first after a load
        self.broken: str | None = None  # why generate() fails until reset, like MLX after running out of memory
        self._rnd = random.Random()
        if model is not None:
            self.load(model)

    @property
    def software(self) -> str:
        """Written into every image: says plainly that this is not model output."""
        return f"mflux-server synthetic engine, model {self.model} (synthetic test image, not model output)"

    def load(self, model: str) -> None:
        """Take load_seconds (scaled by speed) to 'load' a model; a missing local folder fails like mflux's would."""
        self.model = None
        if model.startswith(("/", "./", "~")) and not Path(model).expanduser().is_dir():
            raise ModelLoadFailed(f"no model folder at {model}")
        if self.profiles:  # without any, the attributes stay as set (tests change them between loads)
            profile = self.profiles.get(model, self.default)
            self.step_coef, self.fixed, self.load_seconds = profile.step, profile.fixed, profile.load
            self.drift, self.cold = profile.drift, profile.cold
        time.sleep(self.load_seconds / self.speed)
        self.model, self.broken, self.applied = model, None, ()

    def use_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Take lora_seconds (scaled by speed) to change the set held, as mflux's reload would; each job's LoRAs
        tint its picture (with_loras)."""
        if loras != self.applied and self.model is not None:
            time.sleep(self.lora_seconds / self.speed)
            self.applied = loras

    def reset(self) -> None:
        """Forget the fault and 'reload' the held model."""
        if self.model is not None:
            self.load(self.model)
        self.broken = None

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
        if self.broken:
            raise RuntimeError(self.broken)
        if self.max_pixels is not None and job.pixels > self.max_pixels:
            self.broken = "synthetic engine unusable after running out of memory: reset or reload it"
            raise OutOfMemory(job.pixels, f"synthetic out of memory: {job.width}×{job.height} is above "
                                          f"--synthetic-max-pixels {self.max_pixels}")
        # One factor for the whole image: the machine's state moves all its steps together (drift).
        shared = 1.0 + self._rnd.uniform(-self.drift, self.drift) if self.drift else 1.0
        # Deadlines rather than plain sleeps, so reporting and drawing overhead do not add up over steps.
        deadline = time.perf_counter() + self._seconds(self.fixed[0] * shared)
        sleep_until(deadline)
        reporter.loop_started()
        per_step = self.step_seconds(job.width, job.height) * shared
        deadline += self.cold / self.speed  # the first image after a load compiles its kernels in its first step
        self.cold = 0.0
        # Drawn while the first step "runs" (its time is a deadline), so previews can reveal it. The drawing stands
        # in for the GPU's work, so it runs on the worker's low-priority thread: shrinking four 4096² references
        # at full priority took CPU from the API that a real engine leaves to it (docs/benchmarks.md, benchmark 12).
        image = low_priority.run(lambda: with_loras(with_control(with_inputs(draw(job), job), job), job))
        for done in range(1, job.steps + 1):
            deadline += self._seconds(per_step)
            sleep_until(deadline)
            reporter.step(done, job.steps, lambda done=done: revealed(image, done, job.steps))  # type: ignore[misc]
        deadline += self._seconds(self.fixed[1] * shared)
        sleep_until(deadline)
        return image
