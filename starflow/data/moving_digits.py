"""Moving handwritten digits: the real scikit-learn digits sliding across a small canvas, for the video demo.

Each clip places one real 8x8 digit on a ``canvas x canvas`` torus (what leaves one side comes back on the
other) and moves it ``speed`` pixels per frame in one of four directions; the caption names both,
``"a handwritten digit 3 moving left"``. The torus lets a motion go on for any number of frames, which is
what a video longer than the training clips needs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from starflow.data.digits import load_digit_split
from starflow.data.images import METADATA_FILE

__all__ = ["DIRECTIONS", "moving_caption", "render_clip", "write_moving_digits", "circular_centre", "recentre"]

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
"""Direction name -> (row, column) step."""


def moving_caption(label: int, direction: str) -> str:
    """``moving_caption(3, "left") == "a handwritten digit 3 moving left"``."""
    return f"a handwritten digit {label} moving {direction}"


def render_clip(digit: np.ndarray, frames: int, canvas: int, start: tuple[int, int], direction: str,
                speed: int = 1) -> np.ndarray:
    """``(frames, canvas, canvas)`` uint8: ``digit`` (8x8 uint8) pasted at ``start`` (top-left, row/col) and
    moved ``speed`` pixels per frame on a torus."""
    dr, dc = DIRECTIONS[direction]
    base = np.zeros((canvas, canvas), np.uint8)
    base[: digit.shape[0], : digit.shape[1]] = digit
    return np.stack([np.roll(base, (start[0] + t * dr * speed, start[1] + t * dc * speed), axis=(0, 1))
                     for t in range(frames)])


def circular_centre(frame: np.ndarray) -> tuple[float, float]:
    """Centre of mass ``(row, col)`` of a ``(H, W)`` frame on a torus (circular mean of each axis)."""
    out = []
    w = np.clip(frame.astype(np.float64), 0, None)
    for axis in (0, 1):
        n = frame.shape[axis]
        mass = w.sum(axis=1 - axis)
        angle = 2 * np.pi * np.arange(n) / n
        z = (mass * np.exp(1j * angle)).sum()
        out.append((np.angle(z) % (2 * np.pi)) * n / (2 * np.pi))
    return out[0], out[1]


def recentre(frame: np.ndarray, side: int = 8) -> np.ndarray:
    """``(side, side)``: a ``(n, n)`` torus frame rolled so its centre of mass (:func:`circular_centre`) is at the
    canvas centre, then cropped around it (how the moving-digit benchmarks and tests compare a frame with a
    digit)."""
    n = frame.shape[0]
    r, c = circular_centre(frame)
    rolled = np.roll(frame, (round(n / 2 - r), round(n / 2 - c)), axis=(0, 1))
    lo = n // 2 - side // 2
    return rolled[lo : lo + side, lo : lo + side]


def write_moving_digits(out_dir: str | Path, frames: int = 12, canvas: int = 12, fps: int = 8,
                        clips_per_digit: int = 2, seed: int = 0, video_to_video: bool = False) -> dict[str, int]:
    """Write ``train`` and ``test`` video folders of moving digits (lossless H.264 MP4 + ``metadata.jsonl``).

    Each real digit of the split gets ``clips_per_digit`` clips with distinct random directions and random
    start positions. Metadata lines: ``{"file_name", "text", "fps", "label", "direction"}``.

    With ``video_to_video`` each file holds ``2 * frames`` frames for a ``video_to_video`` model (SPEC section
    16): the target, then the source. The source is the real digit moving; the target is a real digit drawn at
    random from the same split (so of a random class) on exactly the same path, and the caption describes the
    target, so the task is "redraw this clip as digit k". The line also records ``"source_label"``.

    Returns:
        Clips written per split.
    """
    from starflow.data.video import write_video

    rng = np.random.default_rng(seed)
    names = list(DIRECTIONS)
    counts = {}
    for split in ("train", "test"):
        images, labels = load_digit_split(split)
        folder = Path(out_dir) / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (img, label) in enumerate(zip(images, labels.tolist())):
            for direction in rng.choice(names, size=clips_per_digit, replace=False):
                start = tuple(int(s) for s in rng.integers(0, canvas, size=2))
                clip = render_clip(img, frames, canvas, start, str(direction))
                name = f"{i:04d}_{direction}.mp4"
                meta = {"label": label}
                if video_to_video:
                    k = int(rng.integers(len(images)))
                    meta = {"label": int(labels[k]), "source_label": label}
                    clip = np.concatenate([render_clip(images[k], frames, canvas, start, str(direction)), clip])
                write_video(folder / name, clip, fps, lossless=True)
                lines.append(json.dumps({"file_name": name, "text": moving_caption(meta["label"], str(direction)),
                                         "fps": fps, **meta, "direction": str(direction)}))
        (folder / METADATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[split] = len(lines)
    return counts
