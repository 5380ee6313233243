"""Previews of an image while it forms: a cheap linear projection of the latents to RGB, no VAE decode.

Each family's latents go through the factors of the VAE it loads (`latent_formats`), in whichever of
mflux's layouts the loop holds them: packed tokens, 2×2 patches, channels first, or a video frame axis.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from mflux_server.worker.engines.latent_formats import LatentFormat

PREVIEW_SIDE = 256  # the preview's longer side, in pixels, at most


def channels_last(latents: Any, height: int, width: int, channels: int, downscale: int = 8) -> Any | None:
    """The latents as (rows, columns, channels) on the VAE's grid, or None for a layout we do not know."""
    if latents.ndim == 5 and latents.shape[0] == 1:  # video-style (1, C, T, H, W): the one frame
        latents = latents[:, :, 0]
    if latents.ndim == 4 and latents.shape[0] == channels and latents.shape[1] == 1:  # Z-Image keeps (C, 1, H, W)
        latents = latents.transpose(1, 0, 2, 3)
    if latents.shape[0] != 1 or latents.ndim not in (3, 4):
        return None
    for cell, patched in ((downscale, False), (downscale * 2, True)):
        rows, columns = height // cell, width // cell
        depth = channels * 4 if patched else channels
        if latents.ndim == 3 and tuple(latents.shape[1:]) == (rows * columns, depth):
            grid = latents.reshape(rows, columns, depth)  # tokens in raster order, channels last
        elif latents.ndim == 4 and tuple(latents.shape[1:]) == (depth, rows, columns):
            grid = latents[0].transpose(1, 2, 0)
        else:
            continue
        if patched:  # mflux patches 2×2 cells into the channels with index c·4 + dy·2 + dx
            grid = grid.reshape(rows, columns, channels, 2, 2).transpose(0, 3, 1, 4, 2)
            grid = grid.reshape(rows * 2, columns * 2, channels)
        return grid
    return None


def latent_preview(latents: Any, height: int, width: int, latent_format: LatentFormat | None) -> Image.Image | None:
    """A small RGB picture of the current latents, or None when the family's format or layout is unknown."""
    import mlx.core as mx
    import numpy as np

    if latent_format is None:
        return None
    grid = channels_last(latents, height, width, latent_format.channels, latent_format.downscale)
    if grid is None:
        return None
    rgb = grid.astype(mx.float32) @ mx.array(latent_format.factors) + mx.array(latent_format.bias)
    pixels = np.array(mx.clip((rgb + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)
    return shrink(Image.fromarray(pixels, "RGB"))


def shrink(image: Image.Image) -> Image.Image:
    """At most PREVIEW_SIDE on the longer side (a box-filter reduce when the factor is whole: 6× cheaper)."""
    if max(image.size) <= PREVIEW_SIDE:
        return image
    factor = max(image.size) / PREVIEW_SIDE
    if factor.is_integer():
        return image.reduce(int(factor))
    scale = 1 / factor
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BILINEAR, reducing_gap=2.0)


def revealed(pattern: Image.Image, done: int, total: int) -> Image.Image:
    """The synthetic engine's preview: its final pattern, shown down to the fraction of steps done."""
    factor = max(max(pattern.size) / PREVIEW_SIDE, 1.0)
    size = (max(1, round(pattern.width / factor)), max(1, round(pattern.height / factor)))
    rows = round(size[1] * done / max(total, 1))
    shown = Image.new("RGB", size, (24, 24, 24))
    if rows:
        # Only the part shown is shrunk, so a preview costs what it reveals (benchmark 1 holds it under 1%).
        top = pattern.crop((0, 0, pattern.width, min(pattern.height, round(rows * factor)))).convert("RGB")
        if factor.is_integer() and top.height % int(factor) == 0:
            top = top.reduce(int(factor))
        else:
            top = top.resize((size[0], rows), Image.Resampling.BILINEAR)
        shown.paste(top, (0, 0))
    return shown
