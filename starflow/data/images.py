"""Image folders with captions, aspect-ratio buckets and a tolerant loader.

A folder follows the Hugging Face `imagefolder` convention: image files anywhere under `root` plus
`root/metadata.jsonl`, one JSON object per line with `file_name` (path relative to `root`) and
`text` (the caption). Pixels come out as `(C, H, W)` float32 in `[-1, 1]`, the range the VAE and the
pixel-space flow expect (SPEC 13). Mixed aspect ratios follow STARFlow (arXiv 2506.06276): each image
goes to its nearest `"w:h"` bucket, and `starflow.data.aspect.AspectBucketBatchSampler` keeps each
batch in one bucket.
"""

import collections
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from starflow.data.aspect import aspect_to_size, nearest_aspect

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""File suffixes taken for images where a folder is listed without metadata (sample sets) or a file's kind is told
from its name (a GIF is read as its first frame; in a video folder it is a clip)."""
_FORMAT_HELP = (
    f"an image folder needs a '{METADATA_FILE}' file in its root with one JSON object per line, "
    'e.g. {"file_name": "images/0001.png", "text": "a red bicycle"}; file_name is relative to the root'
)


class CorruptImageError(OSError):
    """An image file that is missing, truncated or cannot be decoded."""


def _open(path: Path | BinaryIO) -> Image.Image:
    """Opens an image (a file or a binary stream) lazily (header only); raises `CorruptImageError` if that fails."""
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        why = str(err).replace(f" {path!r}", "")  # (PIL names a stream by its repr: <_io.BytesIO object at 0x...>)
        raise CorruptImageError(f"cannot read image {shown_name(path)}: {why}") from err


def shown_name(source: str | Path | BinaryIO) -> object:
    """A file as messages name it: a path as given, a stream by its ``name`` attribute (a shard's sample) if any."""
    return source if isinstance(source, (str, Path)) else getattr(source, "name", source)


MAX_COVER_AREA = 16
"""An image whose cover-resize would exceed this many times the target area (an aspect ratio beyond 16:1 to a square)
is resized only in the part the crop keeps."""


def cover_and_crop(width: int, height: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """How :func:`load_image` fits a ``width x height`` image to ``size = (h, w)``: ``(new_w, new_h, left, top)``,
    the resized image (its shorter side covering ``size``, rounded to whole pixels) and the corner of the centred
    ``w x h`` crop in it."""
    h, w = size
    scale = max(h / height, w / width)  # cover the target, then crop the excess
    new_w, new_h = max(w, round(width * scale)), max(h, round(height * scale))
    return new_w, new_h, (new_w - w) // 2, (new_h - h) // 2


def kept_region(width: int, height: int, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The part of a ``width x height`` image that :func:`load_image` keeps at ``size = (h, w)``: ``(x0, y0, x1, y1)``
    in the image's own pixels."""
    new_w, new_h, left, top = cover_and_crop(width, height, size)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size[1]) * sx, (top + size[0]) * sy


def load_image(path: str | Path | BinaryIO, size: tuple[int, int], channels: int) -> torch.Tensor:
    """Loads an image, resizes its shorter side to cover `size` and centre-crops to it.

    Args:
        path: Image file or binary stream (any format PIL reads; messages name a stream by its ``name`` attribute
            if it has one). EXIF orientation is applied.
        size: Target `(h, w)` in pixels.
        channels: 1 for greyscale (PIL mode "L"), 3 for RGB.

    Returns:
        Pixels `(C, H, W)` float32 in `[-1, 1]` (0 -> -1, 255 -> 1).

    Raises:
        CorruptImageError: If the file is missing, truncated or not a decodable image.
        ValueError: If `channels` is not 1 or 3 or a side of `size` is not positive.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    h, w = size
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive (h, w), got {size}")
    path = path if hasattr(path, "read") else Path(path)
    shown = shown_name(path)
    with _open(path) as img:
        try:
            img.load()  # decode now so a truncated file fails here
            img = as_shown_8bit(img, shown).convert("L" if channels == 1 else "RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise CorruptImageError(f"cannot decode image {shown}: {err}") from err
    new_w, new_h, left, top = cover_and_crop(img.width, img.height, size)
    if new_w * new_h > MAX_COVER_AREA * w * h:  # a panorama of 60000 x 1: resize only the kept part (the whole would
        sx, sy = img.width / new_w, img.height / new_h  # take gigabytes; PIL filters this part a little differently)
        img = img.resize((w, h), Image.Resampling.BICUBIC, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    else:
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.float32).reshape(h, w, channels)  # (H, W, C) in 0..255
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0  # (C, H, W) in [-1, 1]


_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_warned_transparency = False


def as_shown_8bit(img: Image.Image, path: object = "") -> Image.Image:
    """The image as viewers show it, 8-bit, ready for ``convert("L" | "RGB")``: its EXIF orientation applied (a
    phone's portrait photo is stored sideways with an orientation tag), then :func:`to_8bit`. Every reader of image
    files (training, sampling inputs, evaluation) goes through it.

    Raises:
        ValueError: see :func:`to_8bit`.
    """
    return to_8bit(ImageOps.exif_transpose(img), path)


def to_8bit(img: Image.Image, path: object = "") -> Image.Image:
    """An 8-bit image with the same content, ready for ``convert("L" | "RGB")`` (which would clip or drop instead).

    16-bit greyscale (PIL modes ``I;16*``, and ``I`` with values above 255) is scaled to 0..255 (``/ 257``); ``I`` with
    values within 0..255 is 8-bit data. A float image (``F``) in ``[0, 1]`` is scaled by 255. An image with
    transparency (an alpha channel or a palette's transparent index, any pixel not opaque) is composited onto white,
    with a warning the first time (``convert`` would expose whatever colour the transparent pixels store).

    Raises:
        ValueError: a float image outside ``[0, 1]``, or an ``I`` image outside 0..65535 (no known scale).
    """
    global _warned_transparency

    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max(initial=0)
        if arr.min(initial=0) < 0 or top > 65535:
            raise ValueError(f"{img.mode} image with values in [{arr.min():g}, {top:g}]: save it as 8- or 16-bit")
        scale = 1.0 if img.mode == "I" and top <= 255 else 1 / 257
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and not (arr.min() >= 0 and arr.max() <= 1):
            raise ValueError(f"float image with values in [{arr.min():g}, {arr.max():g}]: floats are read as 0..1; "
                             "save it as an 8- or 16-bit image")
        return Image.fromarray(np.rint(arr * 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        alpha = img.getchannel("A")
        if alpha.getextrema()[0] < 255:
            if not _warned_transparency:
                _warned_transparency = True
                logger.warning("%s has transparent pixels: images with transparency are composited onto white", path)
            base = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(base, img.convert("RGBA")).convert("RGB" if img.mode != "LA" else "L")
    return img


def image_size(path: str | Path | BinaryIO) -> tuple[int, int]:
    """``(width, height)`` of an image as it is loaded (EXIF rotation applied), read from its header.

    Raises:
        CorruptImageError: If the header cannot be read (or the image is too large for PIL's decompression-bomb limit).
    """
    with _open(path if hasattr(path, "read") else Path(path)) as img:
        try:
            width, height = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotates by 90 degrees
                return height, width
            return width, height
        except (OSError, SyntaxError, ValueError) as err:
            raise CorruptImageError(f"cannot read the header of image {path}: {err}") from err


def image_frames(path: str | Path | BinaryIO) -> int:
    """Frames of an image file (an animated GIF, PNG or WebP has several; any other image one), from its header.

    Raises:
        CorruptImageError: If the header cannot be read.
    """
    with _open(path if hasattr(path, "read") else Path(path)) as img:
        return getattr(img, "n_frames", 1)


def image_aspect(path: str | Path | BinaryIO) -> str:
    """The nearest bucket of `ASPECT_RATIOS` for an image, read from its header (EXIF rotation applied).

    Raises:
        CorruptImageError: If the header cannot be read.
    """
    return nearest_aspect(*image_size(path))


def read_metadata(root: Path, format_help: str = _FORMAT_HELP) -> list[dict]:
    """Reads `root/metadata.jsonl`: one JSON object per line with string `file_name` and `text` (other keys,
    e.g. a video's `fps`, are kept). Shared by image and video folders.

    Raises:
        FileNotFoundError: If the file is absent (the message explains the format).
        ValueError: On a malformed line (file and line number named: bad JSON, bytes that are not UTF-8, a lone
            surrogate escape, a missing key) or an empty file.
    """
    meta = root / METADATA_FILE
    if not meta.is_file():
        other = next((root / n for n in ("metadata.csv", "metadata.json", "metadata.parquet") if (root / n).is_file()),
                     None) or next(iter(sorted(root.glob(f"*/{METADATA_FILE}"))), None)
        found = f" ({other} is there: write one {METADATA_FILE} in the root instead)" if other else ""
        raise FileNotFoundError(f"no {meta}{found}: {format_help}")
    records = []
    with meta.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # (a BOM, as Windows editors write)
            except UnicodeDecodeError as err:
                raise ValueError(f"{meta}:{line_no}: not UTF-8 ({err.reason} at byte {err.start}): save the file as "
                                 "UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                array = " (a JSON array: write one object per line, JSON Lines, without the brackets)" \
                    if line.lstrip().startswith("[") else ""
                raise ValueError(f"{meta}:{line_no}: invalid JSON ({err}){array}; {format_help}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str):
                raise ValueError(f"{meta}:{line_no}: needs a string 'file_name'; {format_help}")
            if not isinstance(obj.get("text"), str):
                raise ValueError(f"{meta}:{line_no}: needs a string 'text' caption; {format_help}")
            try:
                (obj["file_name"] + obj["text"]).encode("utf-8")
            except UnicodeEncodeError as err:  # a lone surrogate escape such as "\ud800"
                raise ValueError(f"{meta}:{line_no}: the caption or file name holds {err.object[err.start:err.end]!r}, "
                                 "half of a UTF-16 pair (a lone surrogate escape): fix or drop the character") from None
            records.append(obj)
    if not records:
        raise ValueError(f"{meta} lists no files; {format_help}")
    return records


def note_listing(root: Path, paths: Sequence[Path], suffixes: Sequence[str], kind: str) -> None:
    """Warn about what ``metadata.jsonl`` leaves ambiguous: files listed more than once (each listing is a sample:
    several captions of one file, or a duplicate to remove) and ``kind`` files under ``root`` it does not list (they
    are not trained on; a ``metadata.jsonl`` in a subfolder is not read), and listed files outside ``root`` (an
    absolute or ``../`` name: a downloaded dataset could list any file of the machine)."""
    listed = [os.path.normcase(os.path.normpath(p)) for p in paths]  # (normcase: IMG.PNG lists img.png on Windows)
    counts = collections.Counter(listed)
    inside = os.path.normcase(os.path.join(os.path.abspath(root), ""))
    outside = list(dict.fromkeys(os.path.normpath(p) for p in paths
                                 if not os.path.normcase(os.path.abspath(p)).startswith(inside)))
    if outside:
        logger.warning("%s: %d listed file(s) lie outside it (e.g. %s): they are read as listed (and `pack` copies "
                       "them); if that is not meant, check its %s", root, len(outside), outside[0], METADATA_FILE)
    repeated = {p: n for p, n in counts.items() if n > 1}
    if repeated:
        first = next(iter(repeated))
        logger.warning("%s: %d file(s) listed more than once in %s (e.g. %s, %d times): each listing is a training "
                       "sample of its own (several captions of one %s; remove the lines of a duplicate)", root,
                       len(repeated), METADATA_FILE, first, repeated[first], kind)
    unlisted = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in suffixes
                      and os.path.normcase(os.path.normpath(p)) not in counts and p.is_file())
    if unlisted:  # (or listed by another path to it: a symlinked folder, an absolute name)
        real = {os.path.realpath(p) for p in counts}
        unlisted = [p for p in unlisted if os.path.realpath(p) not in real]
    if unlisted:
        nested = next((p for p in root.rglob(METADATA_FILE) if p.parent != root), None)
        logger.warning("%s: %d %s file(s) under it not listed in its %s, so not trained on (e.g. %s)%s",
                       root, len(unlisted), kind, METADATA_FILE, unlisted[0],
                       f"; {nested} is not read (one {METADATA_FILE} lists the whole folder)" if nested else "")


class ImageFolder(torch.utils.data.Dataset):
    """Captioned images from a folder with `metadata.jsonl`; never crashes on a bad file.

    Files listed in the metadata but absent are dropped at construction; files that fail to decode
    are replaced in `__getitem__` by the next readable sample (index + 1, wrapping, preferring the
    same aspect bucket so batches still stack). Both are recorded in `skipped` and logged once per
    file. With DataLoader workers each worker process keeps its own `skipped` record.

    Args:
        root: Folder holding `metadata.jsonl` and the images.
        img_size: Side `S` of the square training size, in pixels.
        channels: 1 (greyscale) or 3 (RGB).
        mix_aspect: Put each image in its nearest bucket of `ASPECT_RATIOS` (read from its header)
            and resize to that bucket's size; otherwise every image uses `aspect_ratio`.
        multiple: `vae_downsample * patch_size`, in pixels; bucket sides are multiples of it.
        aspect_ratio: The `"w:h"` bucket used when `mix_aspect` is off.
        substitute: False for a measure over every listed image (`eval-nll`): missing files are recorded in
            `skipped` without a warning (the caller refuses them), and `__getitem__` raises on an unreadable one.

    Raises:
        FileNotFoundError: If `metadata.jsonl` is absent (the message explains the format).
        ValueError: On malformed metadata, a bad `aspect_ratio`, or if no listed file exists.
    """

    def __init__(
        self,
        root: str | Path,
        img_size: int,
        channels: int = 3,
        mix_aspect: bool = False,
        multiple: int = 1,
        aspect_ratio: str = "1:1",
        substitute: bool = True,
    ) -> None:
        self.root, self.substitute = Path(root), substitute
        self.img_size, self.channels, self.multiple = img_size, channels, multiple
        self.mix_aspect, self.aspect_ratio = mix_aspect, aspect_ratio
        aspect_to_size(aspect_ratio, img_size, multiple)  # validate early
        self.skipped: set[str] = set()
        self._missing = 0
        self.paths: list[Path] = []
        self.texts: list[str] = []
        missing = []
        records = read_metadata(self.root)
        for record in records:
            file_name, text = record["file_name"], record["text"]
            path = self.root / file_name
            if path.is_file():
                self.paths.append(path)
                self.texts.append(text)
            else:
                missing.append(str(path))
        if missing:
            self._missing = len(missing)
            self.skipped.update(missing)
            if substitute:
                logger.warning("%s: skipping %d listed paths that are not files (missing, or folders), e.g. %s",
                               self.root, len(missing), missing[:3])
        if not self.paths:
            raise ValueError(f"none of the files listed in {self.root / METADATA_FILE} exist")
        note_listing(self.root, [self.root / r["file_name"] for r in records], IMAGE_SUFFIXES, "image")
        self._buckets: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def buckets(self) -> list[str]:
        """Aspect bucket (`"w:h"`) of every sample; read from image headers on first use."""
        if self._buckets is None:
            if not self.mix_aspect:
                self._buckets = [self.aspect_ratio] * len(self)
            else:
                self._buckets = [self._header_bucket(p) for p in self.paths]
        return self._buckets

    def _header_bucket(self, path: Path) -> str:
        """Nearest bucket from the header's (width, height); unreadable files get the default."""
        try:
            return image_aspect(path)
        except (OSError, SyntaxError, ValueError) as err:  # CorruptImageError is an OSError
            self._skip(path, err)
            return self.aspect_ratio

    def _skip(self, path: Path, err: Exception) -> None:
        if not self.substitute:
            raise err if isinstance(err, CorruptImageError) else CorruptImageError(f"cannot read image {path}: {err}")
        if str(path) not in self.skipped:
            self.skipped.add(str(path))
            logger.warning("skipping unreadable image (%s)", err)

    def _candidates(self, index: int) -> Iterator[int]:
        """`index`, then the following indices (wrapping) in its bucket, then all others."""
        n, buckets = len(self), self.buckets
        for same in (True, False):  # lazy: normally only `index` itself is tried
            for k in range(n):
                j = (index + k) % n
                if (buckets[j] == buckets[index]) == same:
                    yield j

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        """Returns `{"pixels": (C, H, W) float32 in [-1, 1], "text": str, "aspect_ratio": str, "skipped": list[str]}`.

        `(H, W) = aspect_to_size(bucket of index, img_size, multiple)` even when a substitute is used; `skipped`
        lists the files this call found unreadable (so a training loop learns of them from DataLoader workers).

        Raises:
            RuntimeError: If no file in the folder can be read.
            CorruptImageError: The file is unreadable, and the folder does not `substitute`.
        """
        bucket = self.buckets[index]
        size = aspect_to_size(bucket, self.img_size, self.multiple)
        newly: list[str] = []
        for j in self._candidates(index):
            path = self.paths[j]
            if str(path) in self.skipped:
                continue
            try:
                pixels = load_image(path, size, self.channels)
            except CorruptImageError as err:
                self._skip(path, err)
                newly.append(str(path))
                continue
            return {"pixels": pixels, "text": self.texts[j], "aspect_ratio": bucket, "skipped": newly}
        raise RuntimeError(f"every image in {self.root} is unreadable: {self.report()}")

    def report(self) -> str:
        """One line: samples listed, files skipped (missing / unreadable) and a few of their paths."""
        unreadable = len(self.skipped) - self._missing
        few = sorted(self.skipped)[:3]
        return (
            f"{self.root}: {len(self) + self._missing} listed, {len(self.skipped)} skipped "
            f"({self._missing} missing, {unreadable} unreadable)" + (f", e.g. {few}" if few else "")
        )


def collate(batch: Sequence[dict[str, torch.Tensor | str]]) -> dict[str, torch.Tensor | list[str]]:
    """Stacks `ImageFolder` (or `VideoFolder`) samples.

    Returns:
        `{"pixels": (B, C, H, W) float32, "text": list[str], "aspect_ratio": list[str], "skipped": list[str]}`
        (the files found unreadable while loading the batch); video clips give `"pixels"` as `(B, T, C, H, W)`
        and add `"fps": list[float]`.

    Raises:
        ValueError: If the samples' sizes differ (batch with `AspectBucketBatchSampler`).
    """
    shapes = {tuple(s["pixels"].shape) for s in batch}
    if len(shapes) != 1:
        raise ValueError(f"samples have different shapes {sorted(shapes)}; use AspectBucketBatchSampler")
    out = {
        "pixels": torch.stack([s["pixels"] for s in batch]),
        "text": [s["text"] for s in batch],
        "aspect_ratio": [s["aspect_ratio"] for s in batch],
        "skipped": [path for s in batch for path in s.get("skipped", ())],
    }
    if all("fps" in s for s in batch):
        out["fps"] = [s["fps"] for s in batch]
    return out
