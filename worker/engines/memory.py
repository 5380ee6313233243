"""How much accelerator memory each model needs, and so the largest image a worker can run with it.

The needs were measured on an H100 with random bf16 weights and mflux's real architectures
(../shared/data/flux1-h100-timings.csv and families-h100.md): peak MLX memory is the resident weights
plus activations that grow with the image. Models not measured have no entry; their workers rely on
--max-pixels and on what out-of-memory failures teach them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mflux_server.core import catalog

# Share of the device's reported memory a model may plan on: the rest is the runtime's, other processes'
# and fragmentation's (Qwen-Image failed at 75–76 GiB peak on an 80 GB card).
HEADROOM = 0.92


@dataclass(frozen=True)
class MemoryNeed:
    """Peak GiB of a model in bf16: weights_gib + gib_per_mp × megapixels (per_mp_tiled above tiled_above)."""

    weights_gib: float
    gib_per_mp: float
    tiled_above: int | None = None  # pixels above which the engine decodes in tiles, which needs less
    gib_per_mp_tiled: float | None = None

    def gib(self, pixels: int, quantize: int | None = None) -> float:
        """Peak GiB at this many pixels; quantization shrinks the weights, not the activations."""
        weights = self.weights_gib * (quantize / 16 if quantize else 1.0)
        slope = self.gib_per_mp
        if self.tiled_above is not None and self.gib_per_mp_tiled is not None and pixels > self.tiled_above:
            slope = self.gib_per_mp_tiled
        return weights + slope * pixels / 2**20

    def largest_pixels(self, budget_gib: float, quantize: int | None = None) -> int:
        """The most pixels whose peak fits the budget (0 when even the weights do not fit)."""
        weights = self.weights_gib * (quantize / 16 if quantize else 1.0)
        best = 0
        for lowest, highest, slope in self._regimes():
            fits = min(math.floor((budget_gib - weights) / slope * 2**20), highest)
            if fits > lowest:
                best = max(best, fits)
        return best

    def _regimes(self) -> Sequence[tuple[int, int, float]]:
        """(lowest, highest pixels, GiB per megapixel) of each decode regime."""
        unbounded = 2**62
        if self.tiled_above is None or self.gib_per_mp_tiled is None:
            return ((0, unbounded, self.gib_per_mp),)
        return ((0, self.tiled_above, self.gib_per_mp), (self.tiled_above, unbounded, self.gib_per_mp_tiled))


# FLUX.1 schnell/dev bf16: 36.6–41.9 GiB at ≤ 1 MP, 54.2 at 1536², 62.2 at 1920², out of memory at 2048²
# on 80 GB; 11 GiB/MP over 33 GiB of weights admits 1920² and refuses 2048² there. Fill adds mask channels,
# not tokens, so it is taken to need the same. Kontext doubles the tokens and is not measured: no entry.
_FLUX1 = MemoryNeed(33.0, 11.0)
# FLUX.2 klein 4B: 14.9 GiB of weights, 30.1 at 1 MP, 36.3 at 1536² with the legacy VAE decode we choose.
_KLEIN_4B = MemoryNeed(14.9, 9.5)
# Z-Image (Turbo): 19.1 GiB of weights, 30.7 at 1 MP, 33.1 at 1536².
_ZIMAGE = MemoryNeed(19.1, 11.6)
# Qwen-Image: 51.5 GiB of weights, 64.4 at 1 MP; at 1536² out of memory untiled, 70.2 with the tiled decode
# the engine switches to above 1280² (worker/engines/mflux.py TILE_DECODE_ABOVE_PIXELS).
_QWEN = MemoryNeed(51.5, 12.9, tiled_above=1280 * 1280, gib_per_mp_tiled=8.3)

NEEDS: dict[str, MemoryNeed] = {
    "schnell": _FLUX1, "dev": _FLUX1, "krea-dev": _FLUX1, "dev-fill": _FLUX1,
    "flux2-klein-4b": _KLEIN_4B, "flux2-klein-base-4b": _KLEIN_4B,
    "z-image": _ZIMAGE, "z-image-turbo": _ZIMAGE,
    "qwen-image": _QWEN,
}


def need_of(model: str) -> MemoryNeed | None:
    """The measured need of a served model (a registry name, repo or folder), when known."""
    resolved = catalog.resolve_reference(model)
    return NEEDS.get(resolved.info.name) if resolved else None


# The smallest image the API accepts (128×128): a model that cannot run it here cannot run anything.
SMALLEST_PIXELS = 128 * 128
QUANTIZE_LEVELS = (8, 6, 4, 3)  # mflux's levels, from the most faithful down


def refusal(model: str, memory_gib: float | None, quantize: int | None) -> str | None:
    """Why a worker with this much memory cannot run even the smallest image of the model, with the fix; else None."""
    need = need_of(model)
    if need is None or memory_gib is None or need.largest_pixels(memory_gib, quantize) >= SMALLEST_PIXELS:
        return None
    precision = f"{quantize}-bit" if quantize else "bf16"
    smallest = need.gib(SMALLEST_PIXELS, quantize)
    fits = [level for level in QUANTIZE_LEVELS if level < (quantize or 16)
            and need.largest_pixels(memory_gib, level) >= SMALLEST_PIXELS]
    if fits:
        best = fits[0]
        fix = " or ".join(f"--quantize {level} (about {need.gib(SMALLEST_PIXELS, level):.1f} GiB, images up to "
                          f"{need.largest_pixels(memory_gib, level) / 2**20:.2f} MP here)"
                          for level in dict.fromkeys((best, 4)) if level in fits)
        fix = "pass " + fix
    else:
        fix = "run it on a device with more memory"
    return (f"model {model} needs about {smallest:.1f} GiB at {precision} even for a 128×128 image "
            f"({need.weights_gib * (quantize / 16 if quantize else 1):.1f} GiB of weights), and this worker has "
            f"{memory_gib:.1f} GiB (--gpu-memory or the device): {fix}")


def pixel_limits(models: Sequence[str], memory_gib: float | None, quantize: int | None,
                 cap: int) -> dict[str, int]:
    """Per model, the largest image this worker can run: --max-pixels, lowered by the model's memory need."""
    limits = {}
    for model in models:
        need = need_of(model)
        derived = need.largest_pixels(memory_gib, quantize) if need is not None and memory_gib is not None else cap
        limits[model] = max(min(cap, derived), 0)
    return limits


def memory_budget(configured: float | None, engine: str) -> float | None:
    """GiB a model may plan on: --gpu-memory, else what the device reports for the mflux engine (none for synthetic)."""
    return configured if configured is not None or engine != "mflux" else device_gib()


def device_gib() -> float | None:
    """GiB of accelerator memory a model may plan on here (Metal's recommended working set, else HEADROOM of
    the total); None when MLX cannot tell (the CPU backend)."""
    try:
        import mlx.core as mx

        info = mx.device_info()
    except Exception:  # no MLX, or no device info on this backend
        return None
    recommended = info.get("max_recommended_working_set_size")
    if recommended:
        return float(recommended) / 2**30
    total = info.get("memory_size") or info.get("total_memory")
    return float(total) * HEADROOM / 2**30 if total else None
