"""Sample sets for metrics (``starflow generate-set``): ``N`` images, resumable, split over ranks.

Sample ``i`` (``0 <= i < N``) is ``{i:06d}.png``, made from caption ``captions[i]`` with seed ``seed + i``, so a
set is the same whatever the batch size and number of processes. ``captions.jsonl`` (one
``{"index", "file_name", "caption"}`` per sample) and ``set.json`` (what produced the set) are written first;
a re-run of the same command skips every image already there, so a killed 50K run continues where it
stopped. Images are written under a temporary name and renamed, so no truncated PNG is ever left; the
temporary file of an image a killed run was writing is removed when the set is resumed.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from starflow.distributed import DistInfo, from_rank0
from starflow.folder_lock import FolderLock
from starflow.sampling.batch import write_samples
from starflow.sampling.pipeline import Pipeline, SampleSettings
from starflow.signals import StopSignals

__all__ = ["CAPTIONS_FILE", "SET_FILE", "SetSummary", "generate_set", "check_set", "set_record", "sample_path",
           "read_set_captions"]

CAPTIONS_FILE = "captions.jsonl"
SET_FILE = "set.json"
LATER_KEYS = ("precision", "config", "weights")  # set.json keys that sets made by earlier versions lack


def sample_path(out: Path, index: int) -> Path:
    """The PNG of sample ``index``: ``out/{index:06d}.png``."""
    return Path(out) / f"{index:06d}.png"


def read_set_captions(folder: str | Path) -> dict[str, str]:
    """``{file name: caption}`` of a sample set's ``captions.jsonl`` (empty when there is none)."""
    path = Path(folder) / CAPTIONS_FILE
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["file_name"]: r["caption"] for r in records}


@dataclass
class SetSummary:
    """What a ``generate-set`` run did: the set's size, images found and written, seconds and images/s."""

    total: int
    existing: int
    written: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        """Images written per second of this run (0 when none were written)."""
        return self.written / self.seconds if self.seconds > 0 else 0.0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def set_record(captions: list[str], settings: SampleSettings, seed: int,
               record: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a sample set, as ``set.json`` stores it: count, seed, settings, a digest of the captions, and
    ``record`` (the checkpoint, ...)."""
    full = {"num_samples": len(captions), "seed": seed, "settings": asdict(settings), "captions_sha": _digest(captions),
            **(record or {})}
    return json.loads(json.dumps(full))  # as read back from the file (tuples -> lists)


def check_set(out: str | Path, record: dict[str, Any]) -> bool:
    """Whether ``out`` already holds this sample set (False: no set there yet); callable before any weights load.

    Args:
        out: the set's folder.
        record: :func:`set_record` of the set to make.

    Raises:
        ValueError: ``out`` holds a set made with other captions, count, seed, model or settings (each difference
            named), or sample images without a ``set.json``.
    """
    path = Path(out) / SET_FILE
    if not path.is_file():
        found = next(Path(out).glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"), None) if Path(out).is_dir() else None
        if found is not None:
            raise ValueError(f"{out} holds sample images ({found.name}, ...) but no {SET_FILE}: they were not made by "
                             "generate-set for this set; pass an empty or new --out")
        return False
    old = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(old.get("settings"), dict):  # a set made before a setting existed used its default
        old["settings"] = {**asdict(SampleSettings()), **old["settings"]}
    for key in LATER_KEYS:  # not recorded by the versions that made older sets
        if key not in old:
            old[key] = record.get(key)
    diff = []
    for k in sorted(set(old) | set(record)):
        a, b = old.get(k), record.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{k}.{sub} ({a.get(sub)!r} -> {b.get(sub)!r})" for sub in sorted(set(a) | set(b))
                     if a.get(sub) != b.get(sub)]
        elif a != b:
            diff.append(f"{k} ({a!r} -> {b!r})" if k != "captions_sha" else "captions")
    if diff:
        raise ValueError(f"{out} holds a sample set made otherwise: {'; '.join(diff[:4])} ({SET_FILE}); pass another "
                         "--out, or the same settings to continue it")
    return True


def _check_or_write_record(out: Path, captions: list[str], record: dict[str, Any], dist: DistInfo) -> None:
    """Rank 0 writes ``captions.jsonl`` and ``set.json`` for a new set; an existing set must be the same one.

    Raises:
        ValueError: ``out`` holds a set made with other captions, count, seed, model or settings.
    """
    if check_set(out, record):
        return
    path = out / SET_FILE
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"index": i, "file_name": sample_path(out, i).name, "caption": c})
                 for i, c in enumerate(captions)]
        _write_atomic(out / CAPTIONS_FILE, "\n".join(lines) + "\n")
        _write_atomic(path, json.dumps(record, indent=1))


def generate_set(pipe: Pipeline, captions: list[str], out: str | Path, settings: SampleSettings, *, seed: int,
                 batch_size: int, dist: DistInfo, record: dict[str, Any] | None = None) -> SetSummary:
    """Make the missing images of a sample set (see the module docstring).

    Args:
        pipe: the pipeline (every rank's, sharded or not).
        captions: caption of every sample, length N.
        out: the set's folder.
        settings: sampling settings (guidance, Jacobi, size).
        seed: seed of sample 0.
        batch_size: images per forward batch on each rank.
        dist: this process's rank and world size (every rank must call this).
        record: what else identifies the set (checkpoint, ...), stored in ``set.json`` and checked on resume.

    Returns:
        A :class:`SetSummary` (every rank gets the same numbers).

    Raises:
        ValueError: ``out`` holds a different set.
        FolderBusyError: another process is writing this set (:class:`starflow.folder_lock.FolderLock`).
        Stopped: SIGTERM or SIGINT arrived; the batch in progress was written first (rerun to resume).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, "sample set", " (or pass another --out)")
    if dist.is_main:  # one writer per set (the other ranks stop when torchrun sees this one fail)
        lock.acquire()
    try:
        _check_or_write_record(out, captions, set_record(captions, settings, seed, record), dist)
        if dist.is_main:  # the half-written image of a killed run (every rank waits below before writing)
            for stale in out.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        # one listing, by rank 0, sent to every rank before anyone writes: the ranks cannot disagree (NFS caches)
        missing = from_rank0(lambda: [i for i in range(len(captions)) if not sample_path(out, i).is_file()])
        start = time.perf_counter()
        with StopSignals(verbose=dist.is_main, at="after this batch, its images written") as stop:
            write_samples(pipe, captions, settings, out, seed=seed, batch_size=batch_size, dist=dist, indices=missing,
                          stem=lambda folder, i, _: sample_path(folder, i).with_suffix(""), progress="generate-set",
                          stop=stop)
    finally:
        lock.release()
    return SetSummary(len(captions), len(captions) - len(missing), len(missing), time.perf_counter() - start)


def _digest(captions: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()[:16]
