"""Writing samples: pixels in [-1, 1] to uint8 arrays, PNG files, grids, videos (MP4/GIF) and the
``settings.json`` record of a sampling run (PIL/numpy; videos through :mod:`starflow.data.video`).

File names: sample ``i`` of caption ``c`` is ``{i:05d}_{slug(c)}`` plus ``.png`` (images), or ``.mp4`` +
``.png`` poster (+ ``.gif``) for videos.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from starflow.files import atomic_path

__all__ = ["to_uint8", "save_image", "make_grid", "save_grid", "slug", "sample_stem", "save_sample", "save_poster_grid",
           "sample_file_names", "write_settings", "overlay_mask", "save_panels", "folder_state", "note_earlier_files",
           "GRID_MAX", "view_scale", "filmstrips"]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``(..., C, H, W)`` float in ``[-1, 1]`` -> ``(..., H, W, C)`` uint8."""
    x = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_image(pixels: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    """Save one ``(C, H, W)`` image in ``[-1, 1]`` as PNG, optionally upscaled (nearest) by ``scale``.

    Written to a temporary name and renamed, so a killed process never leaves a truncated file at ``path``.
    """
    _save_png(_pil(to_uint8(pixels)), path, scale)


def _save_png(img: Image.Image, path: str | Path, scale: int = 1) -> None:
    """Write ``img`` (nearest upscaling by ``scale``) under a temporary name and rename it to ``path``."""
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


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


def filmstrips(videos: torch.Tensor, frames: int = 4) -> torch.Tensor:
    """``(B, T, C, H, W)`` videos -> ``(B, C, H, k W)`` images: ``k = min(frames, T)`` evenly spaced frames (the first
    and the last among them) side by side, for the grids of video samples."""
    t = videos.shape[1]
    k = min(frames, t)
    index = [round(i * (t - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]
    return torch.cat(list(videos[:, index].unbind(1)), dim=-1)


def view_scale(width: int) -> int:
    """Nearest-neighbour upscaling of the grids and panels made for viewing (the images themselves are written at
    their sampled size): tiny samples (the 8 x 8 digits) are shown at least 64 pixels wide."""
    return max(1, 64 // width)


def save_grid(pixels: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> None:
    """Save ``(B, C, H, W)`` images in ``[-1, 1]`` as one PNG grid (nearest upscaling by ``scale``)."""
    _save_png(_pil(make_grid(pixels, nrow)), path, scale)


def slug(text: str) -> str:
    """A caption as a file-name fragment: runs of other characters become ``_``, at most 48 characters."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:48] or "empty"


def sample_stem(folder: Path, index: int, caption: str) -> Path:
    """``folder / f"{index:05d}_{slug(caption)}"``: the path of a sample without its suffix."""
    return folder / f"{index:05d}_{slug(caption)}"


def save_sample(sample: torch.Tensor, stem: Path, fps: float | None = None, gif: bool = False,
                lossless: bool = False) -> None:
    """An image ``(C, H, W)`` as ``stem.png``; a video ``(T, C, H, W)`` as ``stem.mp4`` (H.264 at ``fps``; ``lossless``:
    the exact frames) plus a poster ``stem.png`` (the frames side by side) and, with ``gif``, an animated ``stem.gif``.

    Raises:
        ValueError: a video without ``fps``.
    """
    if sample.dim() == 3:
        save_image(sample, stem.with_suffix(".png"))
        return
    from starflow.data.video import write_gif, write_video

    if not fps:
        raise ValueError("writing a video needs its fps")
    write_video(stem.with_suffix(".mp4"), sample, fps, lossless=lossless)
    save_image(torch.cat(list(sample), dim=-1), stem.with_suffix(".png"))
    if gif:
        write_gif(stem.with_suffix(".gif"), sample, fps, scale=max(1, 128 // sample.shape[-1]))


def sample_file_names(stem: str, video: bool, gif: bool = False, sequence: bool = False) -> list[str]:
    """The names :func:`save_sample` writes for ``stem`` (``gif`` for videos), and with ``sequence`` those of the
    ``stem_sequence`` panels (``return_sequence``, written without a GIF)."""
    names = [f"{stem}.mp4", f"{stem}.png"] + ([f"{stem}.gif"] if gif else []) if video else [f"{stem}.png"]
    return names + (sample_file_names(f"{stem}_sequence", video) if sequence else [])


GRID_MAX = 256
"""Samples a ``grid.png`` shows at most (the first ones): a caption file of 50K prompts makes no 50K-image grid."""


def save_poster_grid(files: Sequence[Path], path: Path, size: tuple[int, int], channels: int,
                     nrow: int | None = None, scale: int = 1) -> None:
    """Read the PNGs ``files`` (images or video posters, all ``size = (h, w)`` pixels) back and save the first
    :data:`GRID_MAX` as one grid (``nrow`` per row, nearest upscaling by ``scale``)."""
    from starflow.data.images import load_image

    save_grid(torch.stack([load_image(f, size, channels) for f in files[:GRID_MAX]]), path, nrow=nrow, scale=scale)


def write_settings(folder: Path, record: dict[str, Any]) -> Path:
    """``folder/settings.json``: what produced the samples (captions, checkpoint, every effective setting)."""
    path = Path(folder) / "settings.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def overlay_mask(pixels: torch.Tensor, mask: torch.Tensor, tint: tuple[float, float, float] = (1.0, -1.0, -1.0),
                 alpha: float = 0.5) -> torch.Tensor:
    """An image ``(C, H, W)`` in ``[-1, 1]`` as RGB with the region ``mask (1, H, W)`` (True) tinted red."""
    rgb = pixels.float().expand(3, -1, -1) if pixels.shape[0] == 1 else pixels.float()
    color = torch.tensor(tint, dtype=rgb.dtype, device=rgb.device)[:, None, None]
    return torch.where(mask.to(rgb.device), (1 - alpha) * rgb + alpha * color, rgb)


def save_panels(panels: Sequence[torch.Tensor], path: str | Path, scale: int = 1) -> None:
    """Save images ``(C, H, W)`` in ``[-1, 1]`` side by side in one PNG (greyscale ones as RGB when mixed)."""
    rgb = any(p.shape[0] == 3 for p in panels)
    row = torch.stack([p.float().cpu().expand(3, -1, -1) if rgb else p.float().cpu() for p in panels])
    save_grid(row, path, nrow=len(panels), scale=scale)


def folder_state(folder: Path) -> dict[str, int]:
    """``{file name: modification time (ns)}`` of the files in ``folder`` (empty when it does not exist yet)."""
    folder = Path(folder)
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}


def note_earlier_files(folder: Path, before: dict[str, int], ours: Sequence[str] = ()) -> None:
    """Print a note naming the files of ``folder`` that an earlier run wrote and this one left as they were
    (``before``: :func:`folder_state` taken before this run; ``ours``: the names this run wrote, e.g. other ranks'
    samples, whose times a coarse file system may not tell apart), so that the outputs of two runs are not taken for
    one; nothing if there are none."""
    now, ours = folder_state(folder), set(ours)
    kept = sorted(name for name, t in before.items()
                  if now.get(name) == t and name not in ours and not name.startswith("."))
    if kept:
        shown = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
        print(f"note: {folder} also holds {len(kept)} file(s) of an earlier run, left as they were: {shown}")
