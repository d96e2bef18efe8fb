"""Sample sets for metrics (``starflow generate-set``): ``N`` images, resumable, split over ranks.

Sample ``i`` (``0 <= i < N``) is ``{i:06d}.png``, made from caption ``captions[i]`` with seed
``set_sample_seed(seed, i)`` (a hash: the sets of different seeds are independent), and every
batch is padded to its full size (see ``full_batches`` in :func:`~starflow.sampling.batch.write_samples`), so at one
``--sample_batch_size`` a set is exactly the same whatever the number of processes and however often it was resumed.
Another batch size gives the same images up to float rounding with a fixed ``jacobi_block_size``; with ``auto`` it
picks other Jacobi chunks, so a set is continued only with the batch size it was started with. ``captions.jsonl`` (one
``{"index", "file_name", "caption"}`` per sample) and ``set.json`` (what produced the set) are written first;
a re-run of the same command skips every image already there, so a killed 50K run continues where it
stopped, and one with a larger ``--num_samples`` (the same captions, cycled) grows a finished set. Images are
written under a temporary name and renamed, so a killed run leaves no truncated PNG; the temporary file of an image it
was writing is removed when the set is resumed, and an image found damaged then (empty, truncated or not a PNG: a
crash before the data reached the disk, a bad copy) is made again, to the same pixels.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from starflow.config import TRAINING_KEYS
from starflow.data.images import IMAGE_SUFFIXES
from starflow.data.seeding import sample_seed
from starflow.distributed import DistInfo, from_rank0
from starflow.files import same_weights, write_text_atomic
from starflow.folder_lock import FolderLock
from starflow.sampling.batch import write_samples
from starflow.sampling.pipeline import Pipeline, SampleSettings
from starflow.signals import StopSignals

__all__ = ["CAPTIONS_FILE", "SET_FILE", "SetSummary", "generate_set", "check_set", "set_record", "sample_path",
           "read_set_record",
           "read_set_captions"]

CAPTIONS_FILE = "captions.jsonl"
SET_FILE = "set.json"
LATER_KEYS = ("precision", "config", "weights", "auto_device", "seeding")  # set.json keys that older sets lack
SEEDING = "hashed"  # set.json "seeding": sample i's seed is set_sample_seed(seed, i); sets without it used seed + i
WEIGHTS_SHA = "weights_sha"  # set.json: SHA-256 of the weights files, checked when their times changed
LEGACY_CAPTIONS_SHA = "captions_sha_legacy"  # a record's digest as sets made before computed it (captions with newlines)


def sample_path(out: Path, index: int) -> Path:
    """The PNG of sample ``index``: ``out/{index:06d}.png``."""
    return Path(out) / f"{index:06d}.png"


def _damaged_set_file(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is damaged ({why}): restore it, or make the set again in an empty --out")


def read_set_record(folder: str | Path) -> dict[str, Any]:
    """A sample set's ``set.json``: what made it, ``num_samples`` among it.

    Raises:
        ValueError: not a JSON object with a positive integer ``num_samples`` (named, with the way out).
    """
    path = Path(folder) / SET_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged_set_file(path, f"not JSON: {e}") from None
    number = record.get("num_samples") if isinstance(record, dict) else None
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise _damaged_set_file(path, "not an object with a positive integer num_samples")
    return record


def read_set_captions(folder: str | Path) -> dict[str, str]:
    """``{file name: caption}`` of a sample set's ``captions.jsonl`` (empty when there is none).

    Raises:
        ValueError: a line that is not ``{"file_name": str, "caption": str, ...}`` (named, with the way out).
    """
    path = Path(folder) / CAPTIONS_FILE
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _damaged_set_file(path, f"line {number} is not JSON: {e}") from None
        if not (isinstance(record, dict) and isinstance(record.get("file_name"), str)
                and isinstance(record.get("caption"), str)):
            raise _damaged_set_file(path, f"line {number} is not an object with file_name and caption strings")
        out[record["file_name"]] = record["caption"]
    return out


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


def set_sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a set made with ``--seed seed``: a 61-bit hash of both (``sample_seed``), so
    that sets of different seeds share no noise (with ``seed + index``, the set of seed 1 was the set of seed 0
    shifted by one image). Sets made before record no ``seeding`` in ``set.json`` and continue with ``seed + index``.
    (61 bits: the pipeline adds offsets of a few million for the noise of known inputs, in a 64-bit generator.)"""
    return sample_seed(seed, "generate-set", index) >> 2


def set_record(captions: list[str], settings: SampleSettings, seed: int,
               record: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a sample set, as ``set.json`` stores it: count, seed, settings, a digest of the captions, and
    ``record`` (the checkpoint, ...)."""
    full = {"num_samples": len(captions), "seed": seed, "seeding": SEEDING, "settings": asdict(settings),
            "captions_sha": _digest(captions), **(record or {})}
    if any("\n" in c for c in captions):  # what sets made before held for them (checked, never written)
        full[LEGACY_CAPTIONS_SHA] = _digest(captions, legacy=True)
    return json.loads(json.dumps(full))  # as read back from the file (tuples -> lists)


def check_set(out: str | Path, record: dict[str, Any], weights_digest: Callable[[], str] | None = None,
              captions: list[str] | None = None) -> bool:
    """Whether ``out`` already holds this sample set, or its first images (False: no set there yet); callable before
    any weights load.

    Args:
        out: the set's folder.
        record: :func:`set_record` of the set to make.
        weights_digest: the SHA-256 of the weights files (hex), called only when their sizes and times (``record``'s
            ``weights``) differ from the set's while their names and sizes match: weights rewritten in place with the
            same bytes (a finished training run run again exports its model folder again), or copied to another
            path, still continue the set.
        captions: the captions of ``record`` (one per sample): with them a set made with fewer samples, whose
            captions are the first of these, continues as the start of this larger one (a 10K set grown to 50K).

    Raises:
        ValueError: ``out`` holds a set made with other captions, count, seed, model or settings (each difference
            named), or sample images without a ``set.json``.
    """
    path = Path(out) / SET_FILE
    if not path.is_file():
        found = next((f for f in Path(out).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES),
                     None) if Path(out).is_dir() else None
        if found is not None:  # (evaluate would count them with the set's)
            raise ValueError(f"{out} holds images ({found.relative_to(out)}, ...) but no {SET_FILE}: a sample set "
                             "needs a folder of its own; pass an empty or new --out")
        return False
    old, record = _comparable(read_set_record(out), record)
    diff = _differences(old, record)
    if "num_samples" in diff and captions is not None:
        if _grows(Path(out), old, record, captions):
            del diff["num_samples"]
        elif isinstance(old.get("num_samples"), int) and record["num_samples"] > old["num_samples"]:
            diff["num_samples"] = (f"num_samples ({old['num_samples']} -> {record['num_samples']}: a larger set grows "
                                   f"this one only if its first captions are this one's, {CAPTIONS_FILE})")
    if diff and set(diff) <= {"weights", "checkpoint"} and _same_bytes(old, record, weights_digest):
        return True  # the same weights, rewritten in place or copied elsewhere (a job staging its model to local disk)
    if diff:
        raise ValueError(f"{out} holds a sample set made otherwise: {'; '.join(list(diff.values())[:4])} ({SET_FILE}); "
                         "pass another --out, or the same settings to continue it")
    return True


def _grows(out: Path, old: dict[str, Any], record: dict[str, Any], captions: list[str]) -> bool:
    """Whether ``record`` (with ``captions``) is ``old``'s set with more samples: its first captions are the set's."""
    n = old.get("num_samples")
    if not isinstance(n, int) or record["num_samples"] <= n:
        return False
    made = read_set_captions(out)  # (more lines than n: a grow killed before its set.json, or one in progress)
    return len(made) >= n and [made.get(sample_path(out, i).name) for i in range(n)] == captions[:n]


def _comparable(old: dict[str, Any], record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A set's ``set.json`` and a new record, as they compare: what older versions did not record takes the value
    it had then (a setting's default, the new record's), training keys and ``fsdp`` are left out of the configs (they
    change no sample), and a legacy caption digest that matches stands for the new one."""
    old, record = dict(old), dict(record)
    if isinstance(old.get("settings"), dict):  # a set made before a setting existed used its default
        old["settings"] = {**asdict(SampleSettings()), **old["settings"]}
    for key in LATER_KEYS:  # not recorded by the versions that made older sets
        if key not in old:
            old[key] = record.get(key)
    for r in (old, record):  # training keys do not change samples (a model folder's own copy may be edited), nor
        # does sharding the weights (fsdp: the same images from sharded and whole weights, on any number of ranks)
        if isinstance(r.get("config"), dict):
            r["config"] = {k: v for k, v in r["config"].items() if k not in TRAINING_KEYS and k != "fsdp"}
    if old.get("captions_sha") == record.get(LEGACY_CAPTIONS_SHA):  # a set made before, captions with newlines
        old["captions_sha"] = record["captions_sha"]
    return old, record


def _auto_batch_hint(before: Any, now: Any) -> str:
    return ("the batch size, --sample_batch_size, for which jacobi_block_size auto picks the Jacobi chunks; the set "
            f"continues with its own, {'a fixed --jacobi_block_size' if before is None else f'--sample_batch_size {before}'}")


def _auto_device_hint(before: Any, now: Any) -> str:
    if before and now is None:  # auto then, a fixed block size now
        return "the set was made with --jacobi_block_size auto: continue it with auto"
    if now and before is None:
        return "the set was made with a fixed --jacobi_block_size: continue it with that one"
    return ("jacobi_block_size auto picks the Jacobi chunks by the device type too"
            + (f"; continue the set on a {before} device, --device {before}" if before else ""))


_HINTS = {"settings.jacobi_auto_batch": _auto_batch_hint, "auto_device": _auto_device_hint}
"""How to continue a set whose recorded value of a key differs: ``hint(before, now)``."""


def _differences(old: dict[str, Any], record: dict[str, Any]) -> dict[str, str]:
    """``{key: "key (before -> now[: hint])"}`` of what differs (dict values key by key, as ``key.sub``); a caption
    digest changed only by another ``num_samples`` (captions are cycled to the count) is not counted."""
    pairs = {}
    for k in sorted((set(old) | set(record)) - {WEIGHTS_SHA, LEGACY_CAPTIONS_SHA}):
        a, b = old.get(k), record.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            pairs.update({f"{k}.{sub}": (a.get(sub), b.get(sub)) for sub in sorted(set(a) | set(b))})
        else:
            pairs[k] = (a, b)
    diff = {}
    for k, (a, b) in pairs.items():
        if a != b:
            hint = _HINTS[k](a, b) if k in _HINTS else ""
            diff[k] = "captions" if k == "captions_sha" else f"{k} ({a!r} -> {b!r}{': ' + hint if hint else ''})"
    if "num_samples" in diff:  # the captions are cycled to the count: their digest changes with it
        diff.pop("captions_sha", None)
    return diff


def _same_bytes(old: dict[str, Any], record: dict[str, Any], weights_digest: Callable[[], str] | None) -> bool:
    """Whether weights files of the same names and sizes as a set's, with other times, hold the set's bytes."""
    return (weights_digest is not None and bool(old.get(WEIGHTS_SHA))
            and same_weights({"files": old["weights"], "sha256": old[WEIGHTS_SHA]}, record["weights"], weights_digest))


def _check_or_write_record(out: Path, captions: list[str], record: dict[str, Any], dist: DistInfo,
                           weights_digest: Callable[[], str] | None = None) -> None:
    """Rank 0 writes ``captions.jsonl`` and ``set.json`` (with ``weights_sha``, the weights' SHA-256, when
    ``weights_digest`` is given) for a new set; an existing set must be the same one (its ``weights`` times are
    updated when the files were rewritten with the same bytes).

    Raises:
        ValueError: ``out`` holds a set made with other captions, count, seed, model or settings.
    """
    path = out / SET_FILE
    if check_set(out, record, weights_digest, captions):
        if dist.is_main:
            old = read_set_record(out)
            now = {k: record[k] for k in ("weights", "checkpoint") if k in record and old.get(k) != record[k]}
            if old["num_samples"] != record["num_samples"]:  # grown: its captions first, then the count
                now.update(num_samples=record["num_samples"], captions_sha=record["captions_sha"])
                old.pop(LEGACY_CAPTIONS_SHA, None)
                _write_captions(out, captions)
            if now:  # where the weights are now, and their times: the next check needs no hashing
                write_text_atomic(path, json.dumps({**old, **now}, indent=1))
        return
    if dist.is_main:
        record = {k: v for k, v in record.items() if k != LEGACY_CAPTIONS_SHA}
        if weights_digest is not None:
            record = {**record, WEIGHTS_SHA: weights_digest()}
        out.mkdir(parents=True, exist_ok=True)
        _write_captions(out, captions)
        write_text_atomic(path, json.dumps(record, indent=1))


def _write_captions(out: Path, captions: list[str]) -> None:
    """``captions.jsonl``: one ``{"index", "file_name", "caption"}`` per sample."""
    lines = [json.dumps({"index": i, "file_name": sample_path(out, i).name, "caption": c})
             for i, c in enumerate(captions)]
    write_text_atomic(out / CAPTIONS_FILE, "\n".join(lines) + "\n")


def generate_set(pipe: Pipeline, captions: list[str], out: str | Path, settings: SampleSettings, *, seed: int,
                 batch_size: int, dist: DistInfo, record: dict[str, Any] | None = None,
                 weights_digest: Callable[[], str] | None = None) -> SetSummary:
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
        weights_digest: the SHA-256 of the weights files, stored with a new set (see :func:`check_set`).

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
        _check_or_write_record(out, captions, set_record(captions, settings, seed, record), dist, weights_digest)
        if dist.is_main:  # the half-written image of a killed run (every rank waits below before writing)
            for stale in out.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        # rank 0 wrote set.json (a set made before has no "seeding": seed + i, to its end)
        hashed = from_rank0(lambda: read_set_record(out).get("seeding") == SEEDING)
        # one listing, by rank 0, sent to every rank before anyone writes: the ranks cannot disagree (NFS caches)
        missing, damaged = from_rank0(lambda: _unfinished(out, len(captions)))
        if damaged and dist.is_main:
            print(f"{out}: {len(damaged)} damaged image(s) made again (empty, truncated or not a PNG), e.g. "
                  f"{sample_path(out, damaged[0])}")
        start = time.perf_counter()
        with StopSignals(verbose=dist.is_main, at="after this batch, its images written") as stop:
            write_samples(pipe, captions, settings, out, seed=seed, batch_size=batch_size, dist=dist, indices=missing,
                          stem=lambda folder, i, _: sample_path(folder, i).with_suffix(""), progress="generate-set",
                          stop=stop, full_batches=True,
                          sample_seeds=(lambda i: set_sample_seed(seed, i)) if hashed else None)
    finally:
        lock.release()
    return SetSummary(len(captions), len(captions) - len(missing), len(missing), time.perf_counter() - start)


PNG_START = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every PNG ends with


def is_whole_png(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the PNG signature and ends with the IEND chunk: what a finished
    sample is, read in two short reads (a 50K set is checked in seconds). An empty, truncated or foreign file (a
    crash before the data reached the disk, a bad copy) is not; a file damaged in its middle is not detected."""
    try:
        with open(path, "rb") as f:
            if f.read(len(PNG_START)) != PNG_START:
                return False
            f.seek(0, os.SEEK_END)
            if f.tell() < len(PNG_START) + len(PNG_END):
                return False
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except OSError:
        return False


def _unfinished(out: Path, total: int) -> tuple[list[int], list[int]]:
    """``(to write, damaged)``: the indices of samples without a whole PNG (:func:`is_whole_png`), and those of
    them whose file exists (damaged: written again, to the same pixels, as every sample has its own seed)."""
    todo, damaged = [], []
    for i in range(total):
        path = sample_path(out, i)
        if not is_whole_png(path):
            todo.append(i)
            if path.exists():
                damaged.append(i)
    return todo, damaged


def _digest(captions: list[str], legacy: bool = False) -> str:
    """A digest of the caption list: of the captions joined by newlines (unambiguous, and what existing sets hold,
    when no caption has a newline), else of their JSON list, so ``["a\\nb", "c"]`` and ``["a", "b\\nc"]`` differ;
    ``legacy``: always joined by newlines (the digest of sets made before)."""
    import hashlib

    text = json.dumps(captions) if any("\n" in c for c in captions) and not legacy else "\n".join(captions)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
