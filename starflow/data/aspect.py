"""Aspect-ratio buckets: their names, their pixel sizes, and a batch sampler that keeps them apart.

STARFlow (arXiv 2506.06276) trains text-to-image models with mixed aspect ratios (`mix_aspect`):
each image is put in the nearest of a fixed set of `"w:h"` buckets and resized to that bucket's
size, which keeps roughly `img_size**2` pixels and is a multiple of the token grid
(`vae_downsample * patch_size`). The bucket name is also appended to the prompt (SPEC 12).
"""

import math
from collections.abc import Iterator, Sequence

import torch

ASPECT_RATIOS: tuple[str, ...] = ("1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21")
"""The aspect-ratio buckets, as `"w:h"` strings (SPEC 13)."""


def parse_aspect(aspect_ratio: str) -> float:
    """Parses a `"w:h"` aspect ratio into `R = w / h`.

    Args:
        aspect_ratio: Width and height as positive numbers separated by one colon, e.g. `"16:9"`.

    Returns:
        The ratio width / height (> 0).

    Raises:
        ValueError: If the string is not two positive finite numbers separated by `:`.
    """
    parts = aspect_ratio.split(":") if isinstance(aspect_ratio, str) else []
    try:
        if len(parts) != 2:
            raise ValueError
        w, h = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(
            f"aspect ratio must look like 'w:h' with positive numbers (e.g. '16:9'), got {aspect_ratio!r}"
        ) from None
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        raise ValueError(f"aspect ratio sides must be positive and finite, got {aspect_ratio!r}")
    return w / h


def aspect_to_size(aspect_ratio: str, img_size: int, multiple: int) -> tuple[int, int]:
    """Pixel size of an aspect-ratio bucket (SPEC 13).

    With `R = w / h`, `S = img_size` and `m = multiple`:
    `h = round(sqrt(S^2 / R) / m) * m` and `w = round(sqrt(S^2 * R) / m) * m` (Python `round`, so
    halves go to the even integer). The area stays close to `S^2`.

    Args:
        aspect_ratio: `"w:h"` string, e.g. `"16:9"`.
        img_size: Side `S` of the square size, in pixels.
        multiple: `m = vae_downsample * patch_size`; both sides are multiples of it, in pixels.

    Returns:
        `(h, w)` in pixels. For example `("16:9", 256, 8) -> (192, 344)`.

    Raises:
        ValueError: On a malformed ratio or non-positive `img_size` / `multiple`.
    """
    if img_size <= 0 or multiple <= 0:
        raise ValueError(f"img_size and multiple must be positive, got {img_size} and {multiple}")
    ratio = parse_aspect(aspect_ratio)
    h = round(math.sqrt(img_size**2 / ratio) / multiple) * multiple
    w = round(math.sqrt(img_size**2 * ratio) / multiple) * multiple
    if h <= 0 or w <= 0:
        raise ValueError(
            f"aspect ratio {aspect_ratio!r} at img_size {img_size}, multiple {multiple} gives an empty side ({h}, {w})"
        )
    return h, w


def nearest_aspect(width: int, height: int) -> str:
    """The bucket in `ASPECT_RATIOS` closest to an image's shape, by distance in log ratio.

    Args:
        width: Image width in pixels (> 0).
        height: Image height in pixels (> 0).

    Returns:
        One of `ASPECT_RATIOS`; ties go to the earlier entry.

    Raises:
        ValueError: If a side is not positive.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image sides must be positive, got width {width}, height {height}")
    target = math.log(width / height)
    return min(ASPECT_RATIOS, key=lambda a: abs(math.log(parse_aspect(a)) - target))


class AspectBucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices that share one aspect bucket, shuffled per epoch and split across ranks.

    Each epoch, indices are grouped by bucket, shuffled within buckets, cut into batches, and the
    batches shuffled; rank `r` takes batches `r, r + world_size, ...`, so ranks are disjoint.
    With `drop_last` the short batch of each bucket is dropped and the batch list cut to a multiple of
    `world_size`, so every rank runs the same number of steps (needed for FSDP/DDP collectives).
    Without it every index appears exactly once per epoch over all ranks, and ranks may differ by
    one batch.

    Args:
        buckets: Bucket key of every dataset index, e.g. `ImageFolder.buckets`.
        batch_size: Samples per batch on this rank.
        shuffle: Shuffle within buckets and the batch order (seeded by `seed + epoch`).
        seed: Base seed, identical on all ranks.
        drop_last: Drop short batches and equalise the batch count across ranks.
        rank: This process's rank in `[0, world_size)`.
        world_size: Number of data-parallel ranks.
    """

    def __init__(
        self,
        buckets: Sequence[str],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.buckets = list(buckets)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that, with `seed`, fixes this epoch's order (call before iterating)."""
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        """Every rank's batches for the current epoch, identical on all ranks."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(self.buckets):
            groups.setdefault(key, []).append(i)
        batches = []
        for key in sorted(groups):
            idx = groups[key]
            if self.shuffle:
                idx = [idx[i] for i in torch.randperm(len(idx), generator=gen).tolist()]
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._all_batches()[self.rank :: self.world_size]

    def __len__(self) -> int:
        sizes: dict[str, int] = {}
        for key in self.buckets:
            sizes[key] = sizes.get(key, 0) + 1
        if self.drop_last:
            return sum(n // self.batch_size for n in sizes.values()) // self.world_size
        total = sum(math.ceil(n / self.batch_size) for n in sizes.values())
        return len(range(self.rank, total, self.world_size))
