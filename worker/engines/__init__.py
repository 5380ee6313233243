"""Engines that turn a job into an image: mflux (the real one) and synthetic (no weights)."""

from __future__ import annotations

import logging

from mflux_server.core import catalog
from mflux_server.core.settings import Settings
from mflux_server.worker.engines.base import Engine, Job, StepReporter

log = logging.getLogger("mflux_worker")

__all__ = ["Engine", "Job", "StepReporter", "make_engine", "choose_engine"]


def choose_engine(requested: str) -> str:
    """Resolve 'auto': mflux where MLX has a GPU (Apple Silicon or CUDA), otherwise synthetic."""
    if requested != "auto":
        return requested
    from mflux_server.worker.engines.mflux import gpu_available

    return "mflux" if gpu_available() else "synthetic"


def make_engine(settings: Settings) -> Engine:
    """Build (and for mflux, load) the engine the settings ask for."""
    name = choose_engine(settings.engine)
    info = catalog.resolve(settings.model)
    if info is None:
        raise ValueError(f"unknown model {settings.model!r}; known models: {', '.join(catalog.names())}")
    if name == "synthetic":
        if settings.engine == "auto":
            log.warning("=" * 72)
            log.warning("NO GPU FOUND FOR MLX: using the SYNTHETIC engine. Images are procedural test")
            log.warning("patterns, not %s output. Pass --engine mflux to insist on the real model.", info.name)
            log.warning("=" * 72)
        from mflux_server.worker.engines.synthetic import SyntheticEngine

        return SyntheticEngine(
            info.name,
            step=settings.synthetic_step,
            fixed=settings.synthetic_fixed,
            noise=settings.synthetic_noise,
            speed=settings.synthetic_speed,
        )
    from mflux_server.worker.engines.mflux import MfluxEngine

    return MfluxEngine(
        info.name,
        quantize=settings.quantize,
        model_path=settings.model_path,
        lora_paths=settings.lora_paths,
        lora_scales=settings.lora_scales,
    )
