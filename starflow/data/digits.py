"""The real handwritten digits of scikit-learn as a tiny captioned image folder.

`sklearn.datasets.load_digits()` ships 1797 greyscale 8x8 digits (values 0..16) with the package,
so the demo needs no download. `write_digits` turns them into two `ImageFolder`s (`train`, `test`)
with captions `"a handwritten digit 7"`; `load_digit_split` returns the same fixed split as arrays
(e.g. to train the classifier a benchmark uses to score generated digits).
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from starflow.data.images import METADATA_FILE

DIGIT_SIDE = 8
"""Native side of the scikit-learn digits, in pixels."""
DIGIT_MAX = 16
"""Largest raw value of the scikit-learn digits (ink); 0 is background."""
SPLITS = ("train", "test")


def digit_caption(label: int) -> str:
    """The caption of a digit, e.g. `digit_caption(7) == "a handwritten digit 7"`."""
    return f"a handwritten digit {label}"


def split_indices(test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed train/test split of the 1797 digits.

    A seeded permutation; its first `round(N * test_fraction)` entries are the test set.

    Args:
        test_fraction: Share of the digits in the test split, in `[0, 1)`.
        seed: Seed of `numpy.random.default_rng`.

    Returns:
        `{"train": (N_train,) int64, "test": (N_test,) int64}`: sorted dataset indices, disjoint.

    Raises:
        ValueError: ``test_fraction`` outside ``[0, 1)``.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n = _digits()[1].shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    return {"train": np.sort(perm[n_test:]), "test": np.sort(perm[:n_test])}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All digits as 8-bit pixels `(1797, 8, 8)` uint8 in 0..255 and labels `(1797,)` int64."""
    from sklearn.datasets import load_digits  # imported lazily: only the demo needs scikit-learn

    data = load_digits()
    pixels = np.rint(data.images * (255 / DIGIT_MAX)).astype(np.uint8)  # 0..16 -> 0..255
    return pixels, data.target.astype(np.int64)


def load_digit_split(split: str, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One split of the digits as arrays, identical to what `write_digits` writes at size 8.

    Args:
        split: `"train"` or `"test"`.
        test_fraction: As in `split_indices`.
        seed: As in `split_indices`.

    Returns:
        `(images, labels)`: `(N, 8, 8)` uint8 greyscale in 0..255 (raw value * 255 / 16, rounded;
        0 is background, 255 is ink) and `(N,)` int64 labels in 0..9.

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"test"``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pixels, labels = _digits()
    idx = split_indices(test_fraction, seed)[split]
    return pixels[idx], labels[idx]


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Class names of the digits, in label order (``configs/digits.vocab``)."""


def write_digits(out_dir: str | Path, size: int = 8, test_fraction: float = 0.2, seed: int = 0,
                 captions: str = "sentence") -> dict[str, int]:
    """Writes the digits as two image folders, `out_dir/train` and `out_dir/test`.

    Each folder gets PNGs `{index:04d}.png` (greyscale "L", `index` the scikit-learn index) and a
    `metadata.jsonl` with lines `{"file_name": "0042.png", "text": "a handwritten digit 7",
    "label": 7}`. An existing `metadata.jsonl` is overwritten.

    Args:
        out_dir: Destination folder (created).
        size: Side of the written images in pixels; upscaled from 8 with nearest-neighbour.
        test_fraction: As in `split_indices`.
        seed: As in `split_indices`.
        captions: ``"sentence"`` ("a handwritten digit 7") or ``"name"`` ("seven", the class names of
            ``configs/digits.vocab`` for class-conditional models).

    Returns:
        Number of images written per split, `{"train": ..., "test": ...}`; a split of no image (``test_fraction``
        0) is neither written nor listed.

    Raises:
        ValueError: ``size < 1`` or ``captions`` not ``"sentence"`` / ``"name"``.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if captions not in ("sentence", "name"):
        raise ValueError(f"captions must be 'sentence' or 'name', got {captions!r}")
    pixels, labels = _digits()
    counts = {}
    for split, idx in split_indices(test_fraction, seed).items():
        if not len(idx):  # test_fraction 0 (or small enough to round to none): no empty folder
            continue
        folder = Path(out_dir) / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in idx.tolist():
            img = Image.fromarray(pixels[i])  # (8, 8) uint8 -> mode "L"
            if size != DIGIT_SIDE:
                img = img.resize((size, size), Image.Resampling.NEAREST)
            name = f"{i:04d}.png"
            img.save(folder / name)
            label = int(labels[i])
            text = digit_caption(label) if captions == "sentence" else DIGIT_NAMES[label]
            lines.append(json.dumps({"file_name": name, "text": text, "label": label}))
        (folder / METADATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[split] = len(idx)
    return counts
