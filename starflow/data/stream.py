"""An endless, resumable stream of micro-batches from a shard folder, split over ranks and DataLoader workers.

Each DataLoader worker of each rank (a *slot*) reads its own share of every epoch: whole shards when there
are at least as many shards as slots, else an equal run of the epoch's samples. Raw samples are
buffer-shuffled and grouped by aspect bucket before anything is decoded, so a resumed stream skips to its
position cheaply.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from starflow.data.images import collate
from starflow.data.seeding import sample_seed
from starflow.data.shards import SampleDecoder, read_index, read_shards

__all__ = ["BatchPosition", "PositionTracker", "ShardStream", "collate_any", "continue_positions", "EMPTY_EPOCHS",
           "STREAM_VERSION"]

STREAM_VERSION = 2
"""Version of the rules that split an epoch into slots, saved with the positions (2: equal runs of samples when
there are fewer shards than slots; 1 dealt each slot every S-th sample)."""

logger = logging.getLogger(__name__)

EMPTY_EPOCHS = 16
"""Epochs in a row in which one DataLoader worker of one rank may form no batch before the stream fails (a short
shard dealt alone to a worker only moves it on to its next epoch)."""


class BatchPosition(NamedTuple):
    """Where a batch came from: DataLoader ``worker``, ``epoch`` and its ``index`` among that worker's
    batches of the epoch (kept as a NamedTuple by the DataLoader)."""

    worker: int
    epoch: int
    index: int


def collate_any(samples: Sequence[dict]) -> dict:
    """``collate`` for pixel samples; latent samples: tensors stacked to ``(B, ...)``, strings listed."""
    if "pixels" in samples[0]:
        return collate(samples)
    return {k: torch.stack([s[k] for s in samples]) if isinstance(v, torch.Tensor) else [s[k] for s in samples]
            for k, v in samples[0].items()}


SHUFFLE_BYTES = 1 << 30
"""Default bound on the raw bytes one DataLoader worker holds for shuffling (1 GiB: a few hundred video clips)."""


def _raw_bytes(sample: dict) -> int:
    return sum(len(v) for v in sample.values() if isinstance(v, (bytes, bytearray)))


def _shuffled(samples: Iterable[dict], size: int, rng: random.Random, max_bytes: int = SHUFFLE_BYTES) -> Iterator[dict]:
    """Buffer shuffle: keeps up to ``size`` samples and ``max_bytes`` of their raw bytes (one sample at least)
    and emits a random one for each new one that does not fit."""
    if size < 2:
        yield from samples
        return
    buf: list[dict] = []
    held = 0
    for sample in samples:
        n = _raw_bytes(sample)
        if not buf or (len(buf) < size and held + n <= max_bytes):
            buf.append(sample)
            held += n
            continue
        j = rng.randrange(len(buf))
        yield buf[j]
        held += n - _raw_bytes(buf[j])
        buf[j] = sample
        while held > max_bytes and len(buf) > 1:  # a larger sample came in: hold fewer
            out = buf.pop(rng.randrange(len(buf)))
            held -= _raw_bytes(out)
            yield out
    rng.shuffle(buf)
    yield from buf


class ShardStream(torch.utils.data.IterableDataset):
    """Endless shuffled micro-batches from a shard folder, split over ranks and DataLoader workers.

    Use with ``DataLoader(stream, batch_size=None, num_workers=W)``. Each worker runs epochs 0, 1, ... on its
    own. In epoch ``e`` the shard list is shuffled with ``seed + e``; slot ``rank * W + worker`` of
    ``S = world_size * W`` takes shards ``[slot::S]`` if there are at least ``S`` shards; with fewer, the
    epoch's ``N`` samples (in shuffled shard order) are cut into ``S`` runs of ``N // S`` or one more and a slot
    reads only the shards its run touches; so no sample is read twice in an epoch, and every slot gets an
    equal share. Raw samples
    are buffer-shuffled (RNG seeded by seed, epoch, slot), grouped by aspect bucket, and decoded only when
    their batch is due. A worker drops its incomplete batches at the end of each epoch. Corrupt samples
    are logged and skipped.

    Batches: ``{"pixels": (B, C, H, W) or (B, T, C, H, W) float32 in [-1, 1], "text": list[str],
    "aspect_ratio": list[str], "position": BatchPosition}``; latent folders give ``"latents": (B, ...)``,
    ``"text_emb": (B, L, D)``, ``"text_emb_extend": (B, L, D)`` (if cached) instead of ``"pixels"``.

    Args:
        root: Shard folder or its ``index.json``.
        batch_size: Samples per micro-batch on this rank.
        img_size, channels, multiple, mix_aspect, aspect_ratio: Image decoding, as :class:`SampleDecoder`.
        frames, fps, size, paired: Video decoding (``channels`` too), as :class:`SampleDecoder`; clips start at a
            random time drawn from (seed, epoch, sample key). Latent folders need no decoding settings.
        seed: Base seed, identical on all ranks.
        rank: This process's rank in ``[0, world_size)``.
        world_size: Number of data-parallel ranks.
        shuffle_buffer: Raw samples held for shuffling (< 2: no shuffling).
        shuffle_bytes: Bound on their raw bytes per DataLoader worker (video samples are large).

    Raises:
        FileNotFoundError: No ``index.json``.
        ValueError: Bad ``batch_size``/``rank``, a decoding setting the kind needs is missing, or no samples.
    """

    def __init__(self, root: str | Path, batch_size: int, *, img_size: int | None = None, channels: int = 3,
                 multiple: int = 1, mix_aspect: bool = False, aspect_ratio: str = "1:1", frames: int | None = None,
                 fps: float | tuple[float, ...] | None = None, size: tuple[int, int] | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 1000, shuffle_bytes: int = SHUFFLE_BYTES,
                 paired: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.root, self.index = read_index(root)
        self.decoder = SampleDecoder(self.index["kind"], img_size=img_size, channels=channels, multiple=multiple,
                                     mix_aspect=mix_aspect, aspect_ratio=aspect_ratio, frames=frames, fps=fps,
                                     size=size, paired=paired)
        self.sizes = {str(self.root / s["name"]): int(s["samples"]) for s in self.index["shards"] if s["samples"] > 0}
        self.shards = list(self.sizes)
        self.num_samples = sum(self.sizes.values())
        if not self.shards:
            raise ValueError(f"{self.root}: index.json lists no samples; pack a folder that has some "
                             "(`starflow pack SRC OUT`)")
        if rank == 0:  # what the index and the folder disagree on (said once)
            missing = [p for p in self.shards if not Path(p).is_file()]
            listed = {s["name"] for s in self.index["shards"]}
            unlisted = sorted(p.name for p in self.root.glob("*.tar") if p.name not in listed)
            if missing:
                logger.warning("%s: %d shard(s) its index.json lists are missing (e.g. %s): their %d samples are skipped "
                               "every epoch", self.root, len(missing), Path(missing[0]).relative_to(self.root),
                               sum(self.sizes[p] for p in missing))
            if unlisted:
                logger.warning("%s: %d .tar file(s) in it are not in its index.json, so not trained on (e.g. %s): pack "
                               "the data again to include them", self.root, len(unlisted), unlisted[0])
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle_buffer, self.shuffle_bytes = shuffle_buffer, shuffle_bytes
        self.positions: dict[int, tuple[int, int]] = {}
        self.next_worker = 0

    def set_position(self, positions: Mapping[int | str, Sequence[int]], next_worker: int = 0) -> None:
        """Start each worker at ``positions[worker] = (epoch, next batch index)`` (others at (0, 0)).

        The DataLoader hands out batches round-robin from worker 0; ``next_worker`` is the worker whose batch
        was due next, so that a new DataLoader continues the interrupted sequence exactly. Call before
        ``iter(loader)``; :class:`PositionTracker` records both values. The number of workers must not change.
        Skipped batches are counted without decoding: a corrupt sample among them (one that passed ``pack``)
        shifts the resumed stream by one sample.
        """
        self.positions = {int(w): (int(p[0]), int(p[1])) for w, p in positions.items()}
        self.next_worker = int(next_worker)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, physical = (info.num_workers, info.id) if info is not None else (1, 0)
        if any(w >= workers for w in self.positions) or self.next_worker >= workers:
            raise ValueError(f"the saved stream position is for more than {workers} DataLoader workers; "
                             "resume with the same num_workers")
        worker = (physical + self.next_worker) % workers
        epoch, start = self.positions.get(worker, (0, 0))
        empty = 0  # epochs in a row in which this slot formed no batch
        while True:
            formed = yield from self._epoch(epoch, worker, workers, start)
            # an epoch may deal this slot too few samples (a short last shard on its own): it goes on to the next;
            # only a slot that never gets a batch's worth is an error
            empty = empty + 1 if formed == 0 else 0
            if empty == EMPTY_EPOCHS:
                raise ValueError(f"{self.root}: worker {worker} of rank {self.rank} formed no batch of "
                                 f"{self.batch_size} in {EMPTY_EPOCHS} epochs in a row; use fewer ranks, workers "
                                 "or a smaller batch (or more shards), or repack a damaged shard (warnings above "
                                 "name it)")
            epoch, start = epoch + 1, 0

    def _run_of_samples(self, shards: Sequence[str], slot: int, slots: int) -> Iterator[dict]:
        """Samples ``[slot * N // S, (slot + 1) * N // S)`` of the shards in this order (N samples in all, sizes from
        ``index.json``), reading only the shards that hold them."""
        total = sum(self.sizes[path] for path in shards)
        first, end = slot * total // slots, (slot + 1) * total // slots
        offset = 0
        for path in shards:
            size = self.sizes[path]
            if offset < end and offset + size > first:
                lo, hi = max(first - offset, 0), min(end - offset, size)
                got = 0
                for sample in itertools.islice(read_shards([path]), lo, hi):
                    got += 1
                    yield sample
                if got < hi - lo:  # a damaged tar ends early: this slot's run is short every epoch it covers
                    logger.warning("%s holds fewer samples than the %d index.json lists (it ended before sample %d; "
                                   "damaged?): repack it with `starflow pack`", path, size, lo + got + 1)
            offset += size

    def _epoch(self, epoch: int, worker: int, workers: int, skip: int) -> Iterator[dict]:
        """One epoch of this slot's batches from batch ``skip`` on; returns the number of batches formed."""
        slots, slot = self.world_size * workers, self.rank * workers + worker
        shards = list(self.shards)
        random.Random(self.seed + epoch).shuffle(shards)
        if len(shards) >= slots:
            raw: Iterable[dict] = read_shards(shards[slot::slots])
        else:  # fewer shards than slots: the epoch's samples in S equal runs, each slot opens the shards of its own
            raw = self._run_of_samples(shards, slot, slots)
        rng = random.Random(sample_seed(self.seed, epoch, slot))
        raw = _shuffled(raw, self.shuffle_buffer, rng, self.shuffle_bytes)
        buffers: dict[str, list[dict]] = {}
        formed = 0
        skipped: list[str] = []  # corrupt samples met since the last batch, reported with the next one
        for sample in raw:
            bucket = self.decoder.bucket(sample)
            if bucket is None:
                skipped.append(f"{sample.get('__url__')}:{sample.get('__key__')}")
                continue
            buf = buffers.setdefault(bucket, [])
            buf.append(sample)
            if len(buf) < self.batch_size:
                continue
            if formed < skip:  # resuming: count the batch, decode nothing
                buf.clear()
                formed += 1
                continue
            for s in buf:
                if "_decoded" not in s:
                    s["_decoded"] = self.decoder.decode(s, bucket, sample_seed(self.seed, epoch, s["__key__"]))
                    if s["_decoded"] is None:
                        skipped.append(f"{s.get('__url__')}:{s.get('__key__')}")
            buf[:] = [s for s in buf if s["_decoded"] is not None]  # corrupt ones leave room for the next
            if len(buf) == self.batch_size:
                batch = collate_any([s["_decoded"] for s in buf])
                batch["position"] = BatchPosition(worker, epoch, formed)
                batch["skipped"], skipped = skipped, []
                buf.clear()
                formed += 1
                yield batch
        return formed


class PositionTracker:
    """Records the batches a ``DataLoader(ShardStream, batch_size=None)`` has handed out, to resume after them.

    Args:
        num_workers: The DataLoader's ``num_workers`` (0 counts as 1).
    """

    def __init__(self, num_workers: int) -> None:
        self.num_workers = max(1, num_workers)
        self.positions: dict[int, tuple[int, int]] = {}
        self.next_worker = 0

    def update(self, position: Sequence[int]) -> None:
        """Notes a consumed batch's ``batch["position"]``."""
        worker, epoch, index = (int(v) for v in position)
        self.positions[worker] = (epoch, index + 1)
        self.next_worker = (worker + 1) % self.num_workers

    def state_dict(self) -> dict:
        """``{"positions": {worker: [epoch, next batch]}, "next_worker": w}`` (JSON-safe), for
        ``ShardStream.set_position(**state)``."""
        return {"positions": {str(w): list(p) for w, p in self.positions.items()}, "next_worker": self.next_worker}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the positions saved by :meth:`state_dict` (resuming a run)."""
        self.positions = {int(w): (int(p[0]), int(p[1])) for w, p in state["positions"].items()}
        self.next_worker = int(state["next_worker"])


def continue_positions(saved: Sequence[Mapping[str, Any]], *, num_samples: int, world_size: int, num_workers: int,
                       batch_size: int) -> dict:
    """Stream positions that continue a run saved on another number of ranks, workers or micro-batch size.

    The old positions belong to the old split of each epoch into slots, so they cannot be continued exactly.
    Instead the samples the old run consumed are counted, ``sum over old slots of epoch * num_samples / slots +
    next batch * micro-batch``, as a fraction ``g`` of epochs, and every new slot starts at epoch ``floor(g)``
    having skipped its share of the rest, ``frac(g) * num_samples / (world_size * num_workers * batch_size)``
    batches. The amount of data seen and the epoch count carry over; which samples of the current epoch are
    still to come does not (some may repeat, some be skipped until the next epoch). Later epochs are exact.

    Args:
        saved: Every old rank's data position, in rank order: ``{"stream": PositionTracker.state_dict(),
            "num_workers": W, "micro_batch": B}``.
        num_samples: Samples in the shard folder (one epoch).
        world_size, num_workers, batch_size: The new run's ranks, DataLoader workers (0 counts as 1) and
            micro-batch per rank.

    Returns:
        The state, identical for every new rank, for ``PositionTracker.load_state_dict`` and
        ``ShardStream.set_position(**state)``.

    Raises:
        ValueError: ``saved`` is empty or ``num_samples < 1``.
    """
    if not saved or num_samples < 1:
        raise ValueError(f"need the positions of at least one rank and a non-empty folder, got {len(saved)} "
                         f"position(s) and {num_samples} samples")
    slots = len(saved) * max(1, int(saved[0]["num_workers"]))
    consumed = 0.0
    for position in saved:
        for epoch, index in position["stream"]["positions"].values():
            consumed += epoch * num_samples / slots + index * int(position["micro_batch"])
    epochs = consumed / num_samples
    epoch = math.floor(epochs)
    workers = max(1, num_workers)
    skip = round((epochs - epoch) * num_samples / (world_size * workers * batch_size))
    return {"positions": {str(w): [epoch, skip] for w in range(workers)}, "next_worker": 0}
