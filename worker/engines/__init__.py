"""Engines that turn a job into an image: mflux (the real one) and synthetic (no weights)."""

from __future__ import annotations

import logging

from mflux_server.core import catalog
from mflux_server.core.settings import Settings
from mflux_server.worker.engines.base import Engine, Job, ModelLoadFailed, OutOfMemory, StepReporter

log = logging.getLogger("mflux_worker")

__all__ = ["Engine", "Job", "ModelLoadFailed", "OutOfMemory", "StepReporter", "make_engine", "choose_engine",
           "served_models"]


def choose_engine(requested: str) -> str:
    """Resolve 'auto': mflux where MLX has a GPU (Apple Silicon or CUDA), otherwise synthetic."""
    if requested != "auto":
        return requested
    from mflux_server.worker.engines.mflux import gpu_available

    return "mflux" if gpu_available() else "synthetic"


def served_models(settings: Settings) -> list[str]:
    """The served names of --model then every --models entry (aliases become registry names); ValueError if unknown."""
    served = []
    for reference in (settings.model, *(settings.models or [])):
        resolved = catalog.resolve_reference(reference)
        if resolved is None:
            raise ValueError(f"unknown model {reference!r}; known models: {', '.join(catalog.names())}, "
                             "or a Hugging Face repo or local folder whose name contains one of them")
        served.append(resolved.served)
    return list(dict.fromkeys(served))


def make_engine(settings: Settings) -> Engine:
    """Build the engine the settings ask for, with no model loaded yet (the worker loads and times it)."""
    name = choose_engine(settings.engine)
    if name == "synthetic":
        if settings.engine == "auto":
            log.warning("=" * 72)
            log.warning("NO GPU FOUND FOR MLX: using the SYNTHETIC engine. Images are procedural test")
            log.warning("patterns, not model output. Pass --engine mflux to insist on the real model.")
            log.warning("=" * 72)
        from mflux_server.worker.engines.synthetic import SyntheticEngine
        from mflux_server.worker.engines.synthetic_profiles import read_profiles

        return SyntheticEngine(
            step=settings.synthetic_step,
            fixed=settings.synthetic_fixed,
            noise=settings.synthetic_noise,
            speed=settings.synthetic_speed,
            load_seconds=settings.synthetic_load,
            lora_seconds=settings.synthetic_lora_change,
            max_pixels=settings.synthetic_max_pixels,
            profiles=read_profiles(settings.synthetic_profiles) if settings.synthetic_profiles else None,
        )
    from mflux_server.worker.engines.mflux import MfluxEngine

    return MfluxEngine(
        quantize=settings.quantize,
        model_path=settings.model_path,
        lora_paths=settings.lora_paths,
        lora_scales=settings.lora_scales,
        gpu_cache_limit_gib=settings.gpu_cache_limit,
        vae_decode=settings.vae_decode,
        warm_up_size=settings.warm_up_size,
        warm_up_steps=settings.warm_up_steps,
    )
