"""The mflux engine: every catalog family through mflux's own classes, ModelConfig names, quantization, LoRA, callbacks."""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from mflux_server.core import catalog, structured_prompts
from mflux_server.core.rows import REFERENCE_ROLES
from mflux_server.worker import low_priority, mflux_metadata
from mflux_server.worker.engines.base import Control, EngineFault, Job, ModelLoadFailed, OutOfMemory, StepReporter
from mflux_server.worker.engines.families import Family, family_named
from mflux_server.worker.engines.latent_formats import FORMATS, LatentFormat
from mflux_server.worker.engines.previews import latent_preview

log = logging.getLogger("mflux_worker")

# Distinct prompts whose embeddings mflux may keep on the GPU (2–4 MiB each); its cache is otherwise unbounded.
PROMPT_CACHE_ENTRIES = 32
# Below this many GiB of accelerator memory left after loading, the auto VAE decode keeps mflux's low_memory path.
LOW_MEMORY_DECODE_BELOW_GIB = 24.0
# Above this many pixels a family listed in TILED_DECODE decodes in tiles (Qwen-Image ran out of memory at 1536²).
TILE_DECODE_ABOVE_PIXELS = 1280 * 1280
TILED_DECODE = {"qwen-image", "qwen-image-edit", "qwen-image-2.1"}
_OOM_MARKERS = ("out of memory", "outofmemory", "failed to allocate", "attempting to allocate")
_FAULT_MARKERS = ("cuda", "metal", "cudnn", "cublas")


def classify(exc: BaseException, pixels: int) -> BaseException:
    """Turn MLX's RuntimeErrors into OutOfMemory or EngineFault, which the worker recovers from; others pass."""
    text = str(exc).lower()
    if any(marker in text for marker in _OOM_MARKERS):
        return OutOfMemory(pixels, str(exc))
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _FAULT_MARKERS):
        return EngineFault(str(exc))
    return exc


class StepBridge:
    """An mflux callback (registered in the model's CallbackRegistry) that forwards loop events to our reporter."""

    def __init__(self, prompt_arrays: Callable[[str], list[Any]] = lambda prompt: []) -> None:
        self.reporter: StepReporter | None = None
        self.prompt_arrays = prompt_arrays
        self.latent_format: LatentFormat | None = None  # the loaded family's, so previews use its VAE's colours

    def call_before_loop(self, seed: int, prompt: str, latents: Any, config: Any, canny_image: Any = None,
                         depth_image: Any = None, control_images: Any = None) -> None:
        """mflux calls this once the prompt is encoded and the latents exist."""
        import mlx.core as mx

        # MLX is lazy: without this the text encoder would run inside step 1 and be timed as denoising.
        mx.eval(latents, *self.prompt_arrays(prompt))
        if self.reporter is not None:
            self.reporter.loop_started()

    def call_in_loop(self, t: int, seed: int, prompt: str, latents: Any, config: Any, time_steps: Any) -> None:
        """mflux calls this after scheduling each step; raising here stops generation at this boundary."""
        import mlx.core as mx

        # MLX is lazy: evaluate now so the step's time is measured here and cancel lands after real work.
        mx.eval(latents)
        if self.reporter is not None:
            start = getattr(config, "init_time_step", 0) or 0
            self.reporter.step(t - start + 1, config.num_inference_steps - start,
                               lambda: latent_preview(latents, config.height, config.width, self.latent_format))


def gpu_available() -> bool:
    """True when MLX can run on a GPU here (Metal on Apple Silicon, or CUDA)."""
    try:
        import mlx.core as mx
    except ImportError:
        return False
    metal = getattr(getattr(mx, "metal", None), "is_available", lambda: False)()
    cuda = getattr(getattr(mx, "cuda", None), "is_available", lambda: False)()
    return bool(metal or cuda)


def silence_progress_bars() -> None:
    """Turn off mflux's tqdm bars, which would print to the worker's log on every generation."""
    # tqdm reads TQDM_DISABLE when it is imported, and transformers or huggingface_hub import it before us:
    # the variable covers child processes, the default below every bar made in this one.
    os.environ["TQDM_DISABLE"] = "1"
    import tqdm.std  # type: ignore[import-untyped]  # no stubs installed

    init = tqdm.std.tqdm.__init__
    if getattr(init, "silenced", False):
        return

    @functools.wraps(init)
    def quiet(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    quiet.silenced = True  # type: ignore[attr-defined]
    tqdm.std.tqdm.__init__ = quiet


class Adapter:
    """One loaded mflux model of a family, and the mapping from a Job onto its generate_image."""

    def __init__(self, family: Family, model: Any, edit_model: Any = None):
        self.family = family
        self.model = model
        self.edit_model = edit_model  # FLUX.2 klein's edit class, built on demand over the same weights

    def edits(self, job: Job) -> bool:
        """Whether the job runs on the family's edit class (FLUX.2 klein with an image and no strength)."""
        return self.edit_model is not None and (self.family.image_role == "edit" or (
            job.image is not None and job.image_strength is None and self.family.edit_class is not None))

    def reference_fitter(self, job: Job) -> Callable[[Image.Image], Image.Image] | None:
        """mflux's fitting of each edit image, when the job's model fits them (run ahead, at low priority)."""
        return self.family.reference_fitter() if self.edits(job) else None

    def call(self, job: Job, files: dict[str, str]) -> Any:
        """Run generate_image with the arguments this family's signature takes."""
        if self.family.image_role == "upscale":
            return self.upscale(job, files)
        model = self.edit_model if self.edits(job) else self.model
        accepted = self.family.generate_parameters(edit=model is self.edit_model)
        prompt = structured_prompts.for_family(self.family.name, job.prompt)  # FIBO reads a JSON object
        wanted: dict[str, Any] = {"seed": job.seed, "prompt": prompt, "num_inference_steps": job.steps,
                                  "height": job.height, "width": job.width}
        if job.guidance is not None:
            wanted["guidance"] = job.guidance
        if job.negative_prompt:
            wanted["negative_prompt"] = job.negative_prompt
        if self.family.image_role == "tryon":  # CatVTON: the garment on the left, the person (to fill) on the right
            wanted |= {"left_image_path": files[REFERENCE_ROLES[0]], "right_image_path": files["image"],
                       "masked_image_path": files["mask"]}
            return model.generate_image(**wanted).get_right_half()
        if "image" in files and self.family.image_role == "redux":  # image prompts, each with its strength
            wanted["redux_image_paths"] = [files["image"], *(files[role] for role in REFERENCE_ROLES if role in files)]
            if job.strengths:
                wanted["redux_image_strengths"] = list(job.strengths)
        elif "image" in files:
            if "image_paths" in accepted:
                wanted["image_paths"] = [files["image"], *(files[role] for role in REFERENCE_ROLES if role in files)]
            else:
                wanted["image_path"] = files["image"]
            if job.image_strength is not None:
                wanted["image_strength"] = job.image_strength
        if "mask" in files:
            wanted["masked_image_path" if "masked_image_path" in accepted else "mask_path"] = files["mask"]
        if job.control is not None:
            wanted |= self.control_arguments(job, files)
        if job.references and "image_paths" not in accepted and self.family.image_role != "redux":
            wanted["image_paths"] = []  # only a list parameter takes several references: reported below
        dropped = sorted(set(wanted) - set(accepted))
        if dropped:  # the API checks capabilities at submit, so this means the catalog and mflux disagree
            raise ValueError(f"{self.family.name} cannot take {', '.join(dropped)}")
        return model.generate_image(**wanted)


    def control_arguments(self, job: Job, files: dict[str, str]) -> dict[str, Any]:
        """The control image as the family takes it: a photo mflux preprocesses, a finished map, or Z-Image's list
        of ControlSpec."""
        assert job.control is not None
        family, control, path = self.family, job.control, files["control"]
        wanted: dict[str, Any] = {}
        if family.control_photo == "controls":
            from mflux.models.z_image.variants.controlnet.control_types import ControlSpec, ControlType

            wanted["controls"] = [ControlSpec(ControlType(control.kind), path)]
        elif control.preprocess and family.control_photo is not None:
            wanted[family.control_photo] = path
        else:
            assert family.control_map is not None and not control.preprocess  # the API refuses it otherwise
            wanted[family.control_map] = path
        if control.strength is not None:
            wanted["controlnet_strength"] = control.strength
        return wanted

    def upscale(self, job: Job, files: dict[str, str]) -> Any:
        """An upscaler's generate_image: the picture, and the target as a size (FLUX.1's ControlNet upscaler) or as
        its shorter side (SeedVR2's resolution, once served: it sizes the other side itself)."""
        accepted = self.family.generate_parameters()
        assert self.family.upscale_source is not None
        wanted: dict[str, Any] = {"seed": job.seed, self.family.upscale_source: files["image"]}
        offered = {"prompt": job.prompt, "num_inference_steps": job.steps, "height": job.height, "width": job.width,
                   "resolution": min(job.width, job.height), "guidance": job.guidance}
        wanted |= {name: value for name, value in offered.items() if name in accepted and value is not None}
        return self.model.generate_image(**wanted)


class MfluxEngine:
    """Holds one mflux model at a time, of any catalog family, and generates with it."""

    name: str = "mflux"

    def __init__(
        self,
        model: str | None = None,
        quantize: int | None = None,
        model_path: str | None = None,
        lora_paths: list[str] | None = None,
        lora_scales: list[float] | None = None,
        gpu_cache_limit_gib: float | None = None,
        vae_decode: str = "auto",
        warm_up_size: int = 256,
        warm_up_steps: int = 2,
        build: Callable[[type, dict[str, Any]], Any] | None = None,
    ):
        silence_progress_bars()
        self.model: str | None = None
        self.quantize = quantize
        self.model_path = model_path  # applies to the first model only: it is where that model's weights are
        # The default set (--lora-paths), applied when a job names none; `applied` is the set the model holds.
        self.default_loras = tuple(zip(lora_paths or [], lora_scales or [1.0] * len(lora_paths or []), strict=True))
        self.applied: tuple[tuple[str, float], ...] = ()
        self.vae_decode = vae_decode
        self.warm_up_size, self.warm_up_steps = warm_up_size, warm_up_steps
        self.adapter: Adapter | None = None
        self.bridge = StepBridge(self._prompt_arrays)
        self._build = build or (lambda cls, kwargs: cls(**kwargs))  # tests build stand-ins here
        self._first: str | None = None  # the first model loaded: the one --model-path holds the weights of
        if gpu_cache_limit_gib is not None:
            import mlx.core as mx

            mx.set_cache_limit(int(gpu_cache_limit_gib * 2**30))
        if model is not None:
            self.load(model)

    @property
    def software(self) -> str:
        """Written into every image file."""
        return f"mflux-server mflux engine, model {self.model}"

    def load(self, model: str, loras: tuple[tuple[str, float], ...] | None = None, warm_up: bool = True) -> None:
        """Build the family's class for this model with a LoRA set (default: --lora-paths), dropping the one held,
        then warm it up with a tiny image."""
        loras = self.default_loras if loras is None else loras
        resolved = catalog.resolve_reference(model)
        if resolved is None:
            raise ModelLoadFailed(f"unknown model {model!r}; the mflux engine runs: {', '.join(catalog.names())}")
        self._drop()
        family = family_named(resolved.info.family)
        self._first = self._first or model
        path = self.model_path if model == self._first else None
        if path is None and resolved.served != resolved.info.name:
            path = resolved.served  # a Hugging Face repo or local folder of a pre-quantized model
        log.info("loading %s as %s (family %s, quantize=%s, path=%s)", model, resolved.info.name, family.name,
                 self.quantize, path)
        try:
            built = self._construct(family, resolved.info.name, path, loras, edit=False)
            edit = self._construct(family, resolved.info.name, path, loras, edit=True) if family.edit_class else None
        except Exception as exc:
            self._drop()
            raise ModelLoadFailed(f"could not load {model}: {type(exc).__name__}: {exc}") from exc
        self.adapter = Adapter(family, built, edit)
        self.bridge.latent_format = FORMATS.get(family.latent_format)
        self.model, self.applied = model, loras
        self._tune(resolved.info.family)
        if warm_up:
            self.warm_up()

    def _construct(self, family: Family, name: str, path: str | None, loras: tuple[tuple[str, float], ...],
                   edit: bool) -> Any:
        from mflux.models.common.config import ModelConfig

        cls = family.load_class(edit)
        accepted = inspect.signature(cls.__init__).parameters
        kwargs: dict[str, Any] = {"model_config": ModelConfig.from_name(model_name=name), "quantize": self.quantize,
                                  "model_path": path, "lora_paths": [file for file, _ in loras] or None,
                                  "lora_scales": [scale for _, scale in loras] or None}
        instance = self._build(cls, {k: v for k, v in kwargs.items() if k in accepted and v is not None})
        instance.callbacks.register(self.bridge)
        return instance

    def _tune(self, family: str) -> None:
        """Pick the VAE decode path: mflux's low_memory decode costs 10–50× the denoising on Z-Image and FLUX.2."""
        vae = getattr(self.adapter.model if self.adapter else None, "vae", None)
        if vae is None or not hasattr(vae, "decode_mode"):
            return
        mode = self.vae_decode
        if mode == "auto":
            mode = "legacy" if free_gib() >= LOW_MEMORY_DECODE_BELOW_GIB else "low_memory"
        vae.decode_mode = mode
        log.info("VAE decode path for %s: %s", family, mode)

    def warm_up(self) -> None:
        """One tiny generation, so kernel compilation (43 s on a fresh H100) counts as load time, not as step 1."""
        assert self.adapter is not None
        if not self.warm_up_steps:
            return
        family, side = self.adapter.family, self.warm_up_size
        grey = Image.new("RGB", (side, side), (128, 128, 128))
        mask = Image.new("L", (side, side), 255) if family.image_role in ("fill", "tryon") else None
        # A finished map where the family takes one: a photo would run a preprocessor (Depth Pro) for nothing.
        control = Control(grey, family.control_types[0], preprocess=family.control_map is None) \
            if family.control_types else None
        image = grey if family.image_role in ("edit", "fill", "upscale", "redux", "tryon") else None
        references = (grey,) if family.image_role == "tryon" else ()
        self._run(Job("warm-up", 0, side, side, self.warm_up_steps, None, image=image, mask=mask, references=references,
                      control=control), None)
        self._clear_cache()

    def use_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Hold the model with this LoRA set (empty: the default set); mflux bakes LoRAs into the weights at load,
        so another set is another load, without the warm-up (the kernels stay compiled)."""
        wanted, model = loras or self.default_loras, self.model
        if wanted != self.applied and model is not None:
            started = time.perf_counter()
            try:
                self.load(model, wanted, warm_up=False)
            except ModelLoadFailed:
                self.load(model, self.default_loras, warm_up=False)  # a bad file must not leave no model held
                raise
            log.info("applied LoRA set %s in %.2f s", [Path(file).name for file, _ in wanted] or "none",
                     time.perf_counter() - started)

    def generate(self, job: Job, reporter: StepReporter) -> Image.Image:
        """Run mflux's generate_image with our step bridge attached, on the job's LoRA set."""
        self.use_loras(job.loras)  # the claim loop did this already, outside the image's timing
        return self._run(job, reporter)

    def _run(self, job: Job, reporter: StepReporter | None) -> Image.Image:
        if self.adapter is None:
            raise RuntimeError("no model loaded")
        self.bridge.reporter = reporter
        try:
            with tempfile.TemporaryDirectory(prefix="mflux-inputs-") as folder:
                fit = self.adapter.reference_fitter(job)
                files = low_priority.run(lambda: write_inputs(job, Path(folder), fit))
                with self._tiling(job):
                    result = self.adapter.call(job, files)
        except Exception as exc:
            raised = classify(exc, job.pixels)
            if raised is exc:
                raise
            raise raised from exc
        finally:
            self.bridge.reporter = None
            self._bound_prompt_cache()
        log.info("%s %d×%d: peak memory %.2f GiB", self.model, job.width, job.height, take_peak_gib())
        image: Image.Image = result.image
        if image.size != (job.width, job.height):  # SeedVR2 rounds the longer side to an even number itself
            image = image.resize((job.width, job.height), Image.Resampling.LANCZOS)
        image.info[mflux_metadata.MFLUX_METADATA] = mflux_metadata.of_result(result)  # what mflux would write
        return image

    def _tiling(self, job: Job) -> Any:
        assert self.adapter is not None
        model = self.adapter.model
        if self.adapter.family.name not in TILED_DECODE or job.pixels <= TILE_DECODE_ABOVE_PIXELS or \
                not hasattr(model, "tiling_config"):
            return contextlib.nullcontext()
        from mflux.models.common.vae.tiling_config import TilingConfig

        @contextlib.contextmanager
        def tiled() -> Any:
            previous = model.tiling_config
            model.tiling_config = TilingConfig()
            try:
                yield
            finally:
                model.tiling_config = previous

        return tiled()

    def _prompt_arrays(self, prompt: str) -> list[Any]:
        cache = getattr(self.adapter.model if self.adapter else None, "prompt_cache", None)
        if not isinstance(cache, dict):
            return []
        # FLUX keys the cache by prompt, Qwen by "prompt|NEG|negative": take every entry of this prompt.
        entries = [entry for key, entry in cache.items() if key == prompt or str(key).startswith(f"{prompt}|")]
        arrays = []
        for entry in entries:
            arrays += [value for value in (entry if isinstance(entry, (tuple, list)) else (entry,)) if hasattr(value, "shape")]
        return arrays

    def _bound_prompt_cache(self) -> None:
        cache = getattr(self.adapter.model if self.adapter else None, "prompt_cache", None)
        if isinstance(cache, dict):
            while len(cache) > PROMPT_CACHE_ENTRIES:
                cache.pop(next(iter(cache)))  # dicts keep insertion order: the oldest prompt goes first

    def reset(self) -> None:
        """Free memory and reload the held model (after out-of-memory or an accelerator error)."""
        model = self.model
        self._drop()
        if model is not None:
            self.load(model)

    def _drop(self) -> None:
        self.adapter = None
        self.model = None
        gc.collect()
        self._clear_cache()

    @staticmethod
    def _clear_cache() -> None:
        try:
            import mlx.core as mx

            mx.clear_cache()
        except (ImportError, AttributeError):
            pass


def take_peak_gib() -> float:
    """MLX's peak memory since the last call, in GiB (then reset), so each generation reports its own."""
    import mlx.core as mx

    peak = mx.get_peak_memory() / 2**30
    mx.reset_peak_memory()
    return float(peak)


def free_gib() -> float:
    """Accelerator memory not in use by MLX, in GiB (infinite when MLX cannot tell)."""
    try:
        import mlx.core as mx

        info = mx.device_info()
        total = float(info.get("memory_size") or info.get("total_memory") or 0)
        if not total:
            return float("inf")
        return (total - mx.get_active_memory()) / 2**30
    except Exception:  # no device info on this backend: do not constrain the choice
        return float("inf")


def write_inputs(job: Job, folder: Path, fit: Callable[[Image.Image], Image.Image] | None = None) -> dict[str, str]:
    """mflux takes image inputs as file paths: write the job's images as PNG files there (the edit images fitted
    first by `fit`, mflux's own fitting, where the model has one)."""
    files = {}
    # The API stores at most one reference per role, so the roles may outnumber the references, never the reverse.
    roles = [("image", job.image), *zip(REFERENCE_ROLES, job.references, strict=False), ("mask", job.mask),
             ("control", job.control.image if job.control else None)]
    for role, image in roles:
        if image is not None:
            if fit is not None and role not in ("mask", "control"):
                image = fit(image)
            path = folder / f"{role}.png"
            image.save(path, format="PNG", compress_level=1)  # read back at once: speed over size
            files[role] = str(path)
    return files
