"""Aspect-ratio buckets: their names, their pixel sizes, and a batch sampler that keeps them apart.

STARFlow (arXiv 2506.06276) trains text-to-image models with mixed aspect ratios (`mix_aspect`):
each image is put in the nearest of a fixed set of `"w:h"` buckets and resized to that bucket's
size, which keeps roughly `img_size**2` pixels and is a multiple of the token grid
(`vae_downsample * patch_size`). The bucket name is also appended to the prompt (SPEC 12).
"""

import itertools
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


def bucket_name(aspect_ratio: str) -> str:
    """The name of the trained bucket of :data:`ASPECT_RATIOS` that ``aspect_ratio`` spells otherwise (``"32:18"``,
    ``"1:1.0"``: the bucket's size, and its name in the prompt), else ``aspect_ratio`` as given (unparseable ones too:
    :func:`parse_aspect` says why where they are used)."""
    try:
        ratio = parse_aspect(aspect_ratio)
    except ValueError:
        return aspect_ratio
    return next((name for name in ASPECT_RATIOS if parse_aspect(name) == ratio), aspect_ratio)


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

    Each epoch, indices are grouped by bucket and shuffled within buckets; each bucket is cut into global
    batches of `batch_size * world_size * grad_accum` indices, and the global batches are shuffled. A
    global batch is one optimizer step: for micro-step `a` rank `r` takes the slice starting at
    `(a * world_size + r) * batch_size`. The samples of a step are therefore the same for any number of
    ranks and any accumulation, which makes runs on different numbers of processes comparable.
    With `drop_last` short global batches are dropped, so every rank runs the same number of steps
    (needed for FSDP/DDP collectives). Without it every index appears exactly once per epoch over all
    ranks, and ranks may differ by one batch.

    Args:
        buckets: Bucket key of every dataset index, e.g. `ImageFolder.buckets`.
        batch_size: Samples per micro-batch on this rank.
        shuffle: Shuffle within buckets and the batch order (seeded by `seed + epoch`).
        seed: Base seed, identical on all ranks.
        drop_last: Drop short global batches.
        rank: This process's rank in `[0, world_size)`.
        world_size: Number of data-parallel ranks.
        grad_accum: Micro-batches per optimizer step.
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
        grad_accum: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.buckets = list(buckets)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size, self.grad_accum = rank, world_size, max(1, grad_accum)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that, with `seed`, fixes this epoch's order (call before iterating)."""
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        """Every step's global batch for the current epoch, identical on all ranks."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(self.buckets):
            groups.setdefault(key, []).append(i)
        size = self.batch_size * self.world_size * self.grad_accum
        batches = []
        for key in sorted(groups):
            idx = groups[key]
            if self.shuffle:
                idx = [idx[i] for i in torch.randperm(len(idx), generator=gen).tolist()]
            for start in range(0, len(idx), size):
                batch = idx[start : start + size]
                if len(batch) == size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            for a in range(self.grad_accum):
                start = (a * self.world_size + self.rank) * self.batch_size
                mine = batch[start : start + self.batch_size]
                if mine:
                    yield mine

    def __len__(self) -> int:
        sizes: dict[str, int] = {}
        for key in self.buckets:
            sizes[key] = sizes.get(key, 0) + 1
        size = self.batch_size * self.world_size * self.grad_accum
        if self.drop_last:
            return sum(n // size for n in sizes.values()) * self.grad_accum
        count = 0
        for n in sizes.values():
            full, rest = divmod(n, size)
            count += full * self.grad_accum
            for a in range(self.grad_accum):  # the short global batch: this rank's non-empty slices
                count += (a * self.world_size + self.rank) * self.batch_size < rest
        return count


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Wraps a per-epoch batch sampler; remembers ``(epoch, batches consumed)`` to resume mid-epoch."""

    def __init__(self, sampler: AspectBucketBatchSampler) -> None:
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def __len__(self) -> int:
        return len(self.sampler) - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        self.sampler.set_epoch(self.epoch)
        return itertools.islice(iter(self.sampler), self.skip, None)
