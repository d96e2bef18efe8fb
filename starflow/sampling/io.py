"""Writing samples: pixels in [-1, 1] to uint8 arrays, PNG files and grids (PIL/numpy only)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["to_uint8", "save_image", "make_grid", "save_grid"]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``(..., C, H, W)`` float in ``[-1, 1]`` -> ``(..., H, W, C)`` uint8."""
    x = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_image(pixels: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    """Save one ``(C, H, W)`` image in ``[-1, 1]`` as PNG, optionally upscaled (nearest) by ``scale``."""
    img = _pil(to_uint8(pixels))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def make_grid(pixels: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile ``(B, C, H, W)`` images into one ``(rows*(H+pad)+pad, nrow*(W+pad)+pad, C)`` uint8 array."""
    imgs = to_uint8(pixels)
    b, h, w, c = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = imgs[i]
    return grid


def save_grid(pixels: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> None:
    """Save ``(B, C, H, W)`` images in ``[-1, 1]`` as one PNG grid (nearest upscaling by ``scale``)."""
    img = _pil(make_grid(pixels, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
