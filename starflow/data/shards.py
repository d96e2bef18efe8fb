"""WebDataset shards: pack a captioned folder into tar shards, read them back, decode their samples.

A shard folder holds ``shard-000000.tar, shard-000001.tar, ...`` and ``index.json``::

    {"kind": "image" | "video" | "latent", "shards": [{"name": "shard-000000.tar", "samples": 1000}, ...],
     "total": N, "skipped": [{"file_name": ..., "reason": ...}, ...]}

A sample is ``__key__`` (packed from a folder: the zero-padded line of ``metadata.jsonl`` it comes from), the
file's bytes under its extension (``png``, ``mp4``, ...; latent caches: ``latent.pth``, ``txt.pth``,
``txt_extend.pth``), ``txt`` (the caption) and ``json`` (the original ``file_name``, ``fps`` if given,
``aspect_ratio`` in latent caches). Training reads
shard folders with :class:`starflow.data.stream.ShardStream`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Container, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from starflow.data.aspect import aspect_to_size
from starflow.data.images import (IMAGE_SUFFIXES, CorruptImageError, image_aspect, load_image, note_listing,
                                  read_metadata, to_8bit)
from starflow.data.video import (CLIP_OR_IMAGE_SUFFIXES, VIDEO_SUFFIXES, CorruptVideoError, _resize_frames,
                                 clip_indices, decoded_length, draw_rate, read_clip, video_aspect)
from starflow.folder_lock import FolderLock

__all__ = ["INDEX_FILE", "SampleDecoder", "ShardProgress", "check_replaceable", "pack_folder", "read_index",
           "read_shards", "write_shards"]

logger = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
INDEX_FILE = "index.json"
UNCOND_FILE = "uncond.pt"  # a latent cache's unconditional text embedding
STAGING_PREFIX = ".staging-"  # the folder inside OUT that new shards are written to
RESUME_FOLDER = STAGING_PREFIX + "resume"  # the staging folder of a resumable run, kept when it is stopped
PROGRESS_FILE = "progress.json"  # in RESUME_FOLDER: the shards written so far (ShardProgress)
SOURCES_SUFFIX = ".sources"  # beside each of those shards: the source samples it holds, one per line
REPLACING_FILE = ".replacing"  # in OUT while a finished run moves its set in (its presence: an incomplete set)
_NOT_MEDIA = frozenset({"txt", "json", "latent.pth", "txt.pth", "txt_extend.pth"})
_BAD_SAMPLE = (OSError, ValueError, KeyError, RuntimeError, EOFError)  # what a corrupt sample can raise


def read_index(root: str | Path) -> tuple[Path, dict]:
    """``(folder, index)`` of a shard folder, given the folder or its ``index.json``.

    Raises:
        FileNotFoundError: No ``index.json`` (the message says how to make one).
        ValueError: An index that is not JSON or lacks its kind or shard list.
    """
    root = Path(root)
    path = root if root.name == INDEX_FILE else root / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: not a shard folder; make one with `starflow pack SRC OUT` "
                                "(or `starflow cache-latents` for latents)")
    remake = "it is damaged: make the folder again with `starflow pack` (or `starflow cache-latents`)"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {remake}") from None
    shards = index.get("shards") if isinstance(index, dict) else None
    if (not isinstance(shards, list) or index.get("kind") not in ("image", "video", "latent")
            or not all(isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("samples"), int)
                       for s in shards)):
        raise ValueError(f"{path} lacks the kind (image, video or latent) or the list of shards (names, sample counts); "
                         f"{remake}")
    for shard in shards:
        name = PurePosixPath(shard["name"])
        if (name.is_absolute() or ".." in name.parts or name.suffix != ".tar" or ":" in shard["name"]
                or "\\" in shard["name"]):  # (webdataset would run "pipe:..." as a shell command)
            raise ValueError(f"{path} names the shard {shard['name'][:200]!r}, which is not a .tar file in its folder "
                             f"(shards are named relative to the folder, e.g. shard-000000.tar); {remake}")
    return path.parent, index


def _extension(file_name: str) -> str:
    return Path(file_name).suffix.lower().lstrip(".")


def folder_kind(file_names: Iterable[str], root: Path | None = None) -> str:
    """``"video"`` if the files are videos, ``"image"`` if none is; GIFs, either, go with the rest. A folder of GIFs
    alone is videos when its first GIF (under ``root``) is animated, images otherwise.

    Raises:
        ValueError: The folder mixes videos and images.
    """
    file_names = list(file_names)
    video = [f.lower().endswith(VIDEO_SUFFIXES) for f in file_names if not f.lower().endswith(CLIP_OR_IMAGE_SUFFIXES)]
    if file_names and not video and root is not None:  # GIFs alone
        from starflow.data.images import image_frames

        try:
            return "video" if image_frames(root / file_names[0]) > 1 else "image"
        except OSError:
            return "image"
    if any(video) and not all(video):
        raise ValueError(f"the folder mixes videos ({', '.join(s.lstrip('.') for s in VIDEO_SUFFIXES)}) and images; "
                         "pack them into separate folders")
    return "video" if video and all(video) else "image"


def _check_file(path: Path, kind: str) -> str | None:
    """Why ``path`` cannot be used (missing, undecodable), or None if it can."""
    if not path.is_file():
        return "a folder, not a file" if path.is_dir() else "missing"
    try:
        if kind == "video":
            decoded_length(path)  # every frame decodes (none kept: a long file would take gigabytes)
        else:
            with Image.open(path) as img:
                img.verify()  # structure and checksums
            with Image.open(path) as img:
                img.load()  # every pixel: catches truncation
                to_8bit(img, path)  # a float image outside [0, 1], which training would refuse
    except (CorruptVideoError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def folder_samples(root: Path, skipped: list[dict], done: Container[str] = ()) -> tuple[str, Iterator[dict]]:
    """``(kind, samples)`` of a captioned folder; samples are raw (bytes), as read back from a shard, keyed by their
    line in ``metadata.jsonl`` (zero-padded: the same key whichever other files are unusable).

    Unusable files are left out and appended to ``skipped`` as ``{"file_name", "reason"}``; the lines whose key is in
    ``done`` (what a resumed run has written) are left out unread.

    Raises:
        FileNotFoundError: No ``metadata.jsonl`` (the message explains the format).
        ValueError: Malformed metadata, or images and videos mixed.
    """
    records = read_metadata(root)
    kind = folder_kind([r["file_name"] for r in records], root)
    note_listing(root, [root / r["file_name"] for r in records], VIDEO_SUFFIXES if kind == "video" else IMAGE_SUFFIXES,
                 kind)

    def samples() -> Iterator[dict]:
        for line, record in enumerate(records):
            key = f"{line:09d}"
            if key in done:
                continue
            path = root / record["file_name"]
            reason = _check_file(path, kind)
            if reason is not None:
                skipped.append({"file_name": record["file_name"], "reason": reason})
                logger.warning("skipping %s (%s)", path, reason)
                continue
            meta = {k: v for k, v in record.items() if k != "text"}
            ext = _extension(path.name)  # (a name ending .txt or .json would take the caption's or metadata's key)
            yield {"__key__": key, "bin" if not ext or ext in _NOT_MEDIA else ext: path.read_bytes(),
                   "txt": record["text"].encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}

    return kind, samples()


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def read_shards(paths: Sequence[str | Path]) -> Iterator[dict]:
    """The raw samples of tar shards in order (``__key__``, ``__url__`` and bytes per extension); a corrupt
    tar member is logged and skipped, and so is a compressed shard (``pack`` writes plain tar; each member is read
    whole, and a compressed one can unpack to gigabytes from a small file)."""
    import webdataset

    def log_and_continue(err: Exception) -> bool:
        logger.warning("skipping a corrupt part of a shard (%s)", err)
        return True

    for path in paths:
        path = os.path.abspath(path)  # (a relative path such as "pipe:..." would be a URL to webdataset)
        try:
            with open(path, "rb") as file:
                head = file.read(262)
            compressed = head[257:262] != b"ustar" and head.startswith(_COMPRESSED)  # (a tar's own magic first)
        except OSError:
            compressed = False  # (webdataset's error names it)
        if compressed:
            logger.warning("skipping %s: a compressed tar (shards are plain tar files); make the folder again with "
                           "`starflow pack`", path)
            continue
        yield from webdataset.tarfile_samples([{"url": path}], handler=log_and_continue)


def write_shards(out: Path, samples: Iterable[dict], shard_size: int, index: dict, shown: Path | None = None,
                 progress: ShardProgress | None = None, expected: int | None = None, desc: str = "writing") -> dict:
    """Writes ``samples`` into ``out/shard-*.tar`` (``shard_size`` each) and ``out/index.json`` (``index``
    plus ``shards`` and ``total``); returns the index. ``shown``: the folder named in errors (default ``out``).
    ``progress``: a resumable run's record (:class:`ShardProgress`): the shards it lists are kept and counted, new
    ones are numbered after them, and each shard is recorded once full (a sample's ``__source__``, if any, names
    it in the record, else its ``__key__``; neither is written). A progress bar (``desc``) counts the samples
    written against ``expected`` (the source's; samples skipped as unusable leave it short).

    Raises:
        ValueError: No sample was written.
    """
    import webdataset

    done = list(progress.shards) if progress is not None else []
    counts: dict[str, int] = {s["name"]: s["samples"] for s in done}
    sources: list[str] = []
    writing = True  # a shard closed while the loop is stopped (an error, Ctrl-C) may be short: never recorded

    def shard_closed(fname: str) -> None:
        name = Path(fname).name
        if writing and progress is not None and counts.get(name):
            progress.record(name, counts[name], sources)
        sources.clear()

    writer = webdataset.ShardWriter(str(out / SHARD_PATTERN), maxcount=shard_size, verbose=0, start_shard=len(done),
                                    post=shard_closed)
    bar = tqdm(total=expected, initial=sum(counts.values()), desc=desc, unit="sample", dynamic_ncols=True)
    try:
        for sample in samples:
            writer.write(sample)
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
            sources.append(str(sample.get("__source__", sample["__key__"])))
            bar.update()
    except BaseException:
        writing = False
        raise
    finally:
        writer.close()
        bar.close()
        if writer.fname and not counts.get(Path(writer.fname).name):  # opened, nothing written into it
            Path(writer.fname).unlink(missing_ok=True)
    if not counts:
        raise ValueError(f"no usable sample to write to {shown or out}; skipped: {index.get('skipped', [])[:3]}")
    index = dict(index, shards=[{"name": n, "samples": c} for n, c in counts.items()], total=sum(counts.values()))
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


class ShardProgress:
    """The full shards a resumable run (``cache-latents``) has written to its staging folder, and the samples in each,
    kept in ``progress.json`` there: a rerun of the same inputs keeps those shards (each checked against its recorded
    size and sample count, up to the first that fails) and skips their samples (``done``: their source names), where
    a rerun of other inputs starts afresh.

    Args:
        staging: the run's staging folder (:func:`replaced_output` with ``resume``).
        inputs: what the shards' contents depend on (JSON-able: source folder and its listing, settings); a record of
            other inputs is discarded, with its shards.
    """

    def __init__(self, staging: Path, inputs: dict[str, Any]) -> None:
        self.path, self.inputs = staging / PROGRESS_FILE, json.loads(json.dumps(inputs))
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = None
        if not (isinstance(state, dict) and isinstance(state.get("shards"), list)):
            state = {"inputs": None, "shards": []}
        same = state.get("inputs") == self.inputs
        if state["shards"] and not same:
            logger.warning("discarding the %d shard(s) an interrupted run left in %s: it had other inputs (%s)",
                           len(state["shards"]), staging.parent, ", ".join(_changed(state.get("inputs"), self.inputs)))
        self.staging, self.shards, self.done = staging, [], set()
        for shard in state["shards"] if same else []:  # in order, up to the first one missing or damaged
            name = str(shard.get("name")) if isinstance(shard, dict) else ""
            sources = self._sources(name) if name else None
            path = staging / name
            if sources is None or len(sources) != shard.get("samples") or not path.is_file() \
                    or path.stat().st_size != shard.get("bytes"):
                logger.warning("%s in %s is missing or damaged: it and the shards after it are written again",
                               name or "a shard", staging)
                break
            self.shards.append(shard)
            self.done.update(sources)
        names = {s["name"] for s in self.shards}
        for path in [*staging.glob("shard-*.tar"), *staging.glob("shard-*.tar" + SOURCES_SUFFIX)]:
            if path.name.removesuffix(SOURCES_SUFFIX) not in names:  # unfinished, or of other inputs
                path.unlink()
        if self.shards:
            logger.warning("resuming: %d sample(s) in %d shard(s) already written by an interrupted run",
                           sum(s["samples"] for s in self.shards), len(self.shards))
        self._save()

    def record(self, name: str, samples: int, sources: Sequence[str]) -> None:
        """Record the full shard ``name`` of ``samples`` samples named ``sources`` (one line each, in a file beside the
        shard: the record itself stays small)."""
        listing = self.staging / (name + SOURCES_SUFFIX)
        listing.write_text("".join(f"{s}\n" for s in sources), encoding="utf-8")
        for path in (self.staging / name, listing):  # on disk before the record names them
            with open(path, "rb") as file:
                os.fsync(file.fileno())
        self.shards.append({"name": name, "samples": samples, "bytes": (self.staging / name).stat().st_size})
        self.done.update(sources)
        self._save()

    def _sources(self, name: str) -> list[str] | None:
        try:
            return (self.staging / (name + SOURCES_SUFFIX)).read_text(encoding="utf-8").splitlines()
        except OSError:
            return None

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"inputs": self.inputs, "shards": self.shards}), encoding="utf-8")
        tmp.replace(self.path)  # (a kill mid-write leaves the last record)


def _changed(old: Any, new: dict[str, Any]) -> list[str]:
    """The names of the inputs that differ between two records."""
    old = old if isinstance(old, dict) else {}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)) or ["unreadable"]


def _output_files(folder: Path) -> list[Path]:
    """The files a shard or latent-cache folder is made of: shards, the index (last: it marks completeness) and
    the cache's unconditional embedding."""
    return sorted(folder.glob("shard-*.tar")) + [p for p in (folder / UNCOND_FILE, folder / INDEX_FILE) if p.exists()]


def check_replaceable(out: Path, overwrite: bool, src: Path) -> list[Path]:
    """What :func:`replaced_output` checks before it writes, for a command to check before its slow work (a model
    load). Returns the shard, index and cache files ``out`` holds now.

    Raises:
        ValueError: ``out`` is the source folder ``src``.
        FileExistsError: ``out`` holds shards, an index or cache files (but not an interrupted replacement) and
            ``overwrite`` is off.
    """
    if out.resolve() == src.resolve():
        raise ValueError(f"the output folder {out} is the source folder: write the shards to another folder")
    old = _output_files(out) if out.is_dir() else []
    if old and not overwrite and not (out / REPLACING_FILE).exists():
        raise FileExistsError(f"{out} already holds shards ({old[0].name}, ...); pass --overwrite to replace them")
    return old


@contextmanager
def replaced_output(out: Path, overwrite: bool, src: Path, resume: bool = False) -> Iterator[Path]:
    """A staging folder inside ``out`` to write new shards into; when the block succeeds its files replace the
    shards, index and cache files already in ``out``, which stay untouched if it fails (or is interrupted; the staging
    folder of a killed run is removed by the next one). With ``resume`` the staging folder is ``RESUME_FOLDER``,
    kept when the block fails, for the next run to go on from (its :class:`ShardProgress` says what it may keep). The replacement removes the old index first and moves the new
    one in last, so a kill during it leaves a folder without an index: an incomplete set, which no reader takes and
    the next run replaces without ``overwrite`` (a ``.replacing`` file marks it; shards without an index and without
    that mark, made by another tool, are left alone).

    Raises:
        FolderBusyError: another process writes ``out`` now (a lock on ``out/.lock`` while the block runs).
        ValueError: ``out`` is the source folder ``src`` (its files would be replaced by what is read from them).
        FileExistsError: ``out`` holds shards, an index or cache files (but not an interrupted replacement) and
            ``overwrite`` is off.
    """
    old = check_replaceable(out, overwrite, src)
    if old and not overwrite:
        warnings.warn(f"{out} holds {len(old)} file(s) of an incomplete set (a run killed while it replaced the "
                      "set); replacing them", stacklevel=2)
    marker = out / REPLACING_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot write the output folder {out} ({e.strerror}); pass a writable folder") from None
    lock = FolderLock(out, "shard folder", " (or pass another output folder)").acquire()  # one writer at a time
    try:
        for stale in out.glob(STAGING_PREFIX + "*"):  # what a killed run left (the lock: no live writer's)
            if not (resume and stale.name == RESUME_FOLDER):
                shutil.rmtree(stale, ignore_errors=True)
        if resume:
            staging = out / RESUME_FOLDER
            staging.mkdir(exist_ok=True)
        else:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    except OSError as e:
        lock.release()
        raise OSError(f"cannot write the output folder {out} ({e.strerror}); pass a writable folder") from None
    finished = False
    try:
        yield staging
        finished = True
        marker.touch()  # from here until the new index is in, the set is incomplete (and the next run may replace it)
        (out / INDEX_FILE).unlink(missing_ok=True)
        new = _output_files(staging)
        names = {p.name for p in new}
        for path in old:
            if path.name not in names:
                path.unlink(missing_ok=True)
        for path in new:  # the index last
            path.replace(out / path.name)
        marker.unlink()
    finally:
        if finished or not resume:
            shutil.rmtree(staging, ignore_errors=True)
        lock.release()


def pack_folder(src: str | Path, out: str | Path, shard_size: int = 1000, overwrite: bool = False) -> dict:
    """Packs a captioned image or video folder (``metadata.jsonl``) into tar shards.

    Images must pass PIL's ``verify`` and decode fully; videos must decode, every frame (``decoded_length``). Others are
    skipped, logged and listed in the index.

    Args:
        src: Folder with ``metadata.jsonl`` (``file_name``, ``text``, optional ``fps``).
        out: Output folder for ``shard-*.tar`` and ``index.json``.
        shard_size: Samples per shard.
        overwrite: Replace shards already in ``out`` (once the new ones are complete: a failed run keeps them).

    Returns:
        The index: ``{"kind", "shards": [{"name", "samples"}], "total", "skipped": [{"file_name", "reason"}]}``.

    Raises:
        FileNotFoundError: ``src`` has no ``metadata.jsonl``.
        FileExistsError: ``out`` holds shards and ``overwrite`` is off.
        ValueError: Malformed metadata, images and videos mixed, no usable file, or ``out`` is ``src``.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    src, out = Path(src), Path(out)
    skipped: list[dict] = []
    kind, samples = folder_samples(src, skipped)
    with replaced_output(out, overwrite, src) as staging:
        return write_shards(staging, samples, shard_size, {"kind": kind, "skipped": skipped}, shown=out,
                            expected=len(read_metadata(src)), desc="pack")


def _media(sample: dict) -> io.BytesIO:
    """The image or video file of a raw sample, as a stream named (``name``, which messages show) after the sample."""
    for key, value in sample.items():
        if not key.startswith("__") and key not in _NOT_MEDIA:
            media = io.BytesIO(value)
            media.name = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
            return media
    raise KeyError("no image or video file in the sample")


def _load_tensor(data: bytes) -> torch.Tensor:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True).float()


class SampleDecoder:
    """Turns raw shard samples into training samples, with the resize helpers of ``images``/``video``.

    Args:
        kind: ``"image"``, ``"video"`` or ``"latent"`` (the index's kind).
        img_size: Images: side S of the square size, in pixels.
        channels: Pixel channels, 1 or 3.
        multiple: Images: bucket sides are multiples of it (``vae_downsample * patch_size``).
        mix_aspect: Each image or video in its nearest aspect bucket (read from its header).
        aspect_ratio: Images: the bucket without ``mix_aspect``.
        frames: Videos: frames per clip T.
        fps: Videos: frame rate of the clips, or several (one drawn per clip with the sample's seed).
        size: Videos: ``(h, w)`` of the clips in pixels without ``mix_aspect`` (with it: buckets of ``img_size``).
        random_start: Videos: a random clip start (seeded per sample by :meth:`decode`), else frame 0.
        paired: Videos: ``video_to_video`` samples (target then source), both halves cut at the same times.

    Raises:
        ValueError: A setting the kind needs is missing.
    """

    def __init__(self, kind: str, *, img_size: int | None = None, channels: int = 3, multiple: int = 1,
                 mix_aspect: bool = False, aspect_ratio: str = "1:1", frames: int | None = None,
                 fps: float | tuple[float, ...] | None = None, size: tuple[int, int] | None = None,
                 random_start: bool = True, paired: bool = False) -> None:
        if kind == "image" and img_size is None:
            raise ValueError("an image shard folder needs img_size")
        if kind == "video" and (frames is None or fps is None or size is None):
            raise ValueError("a video shard folder needs frames, fps and size")
        if kind not in ("image", "video", "latent"):
            raise ValueError(f"unknown shard kind {kind!r}: expected image, video or latent")
        self.kind, self.img_size, self.channels, self.multiple = kind, img_size, channels, multiple
        self.mix_aspect, self.aspect_ratio = mix_aspect, aspect_ratio
        self.frames, self.size, self.random_start, self.paired = frames, size, random_start, paired
        self.rates = tuple(fps) if isinstance(fps, (tuple, list)) else (fps,)
        if kind == "video" and mix_aspect and img_size is None:
            self.img_size = size[0]

    def bucket(self, sample: dict) -> str | None:
        """The sample's aspect bucket without decoding it (an image header at most); None if unreadable."""
        try:
            if self.kind == "latent":
                return json.loads(sample["json"])["aspect_ratio"]
            if self.mix_aspect and self.kind in ("image", "video"):
                media = _media(sample)
                return image_aspect(media) if self.kind == "image" else video_aspect(media)
            return self.aspect_ratio if self.kind == "image" else "1:1"
        except (CorruptImageError, *_BAD_SAMPLE) as err:
            logger.warning("skipping sample %s of %s (%s)", sample.get("__key__"), sample.get("__url__"), err)
            return None

    def decode(self, sample: dict, bucket: str, seed: int = 0) -> dict | None:
        """A training sample, or None (logged) if the raw sample is corrupt.

        Returns:
            Images/videos: ``{"pixels": (C, H, W) or (T, C, H, W) float32 in [-1, 1], "text", "aspect_ratio"}``
            (videos also ``"fps"``, the clip's rate);
            latents: ``{"latents", "text_emb": (L, D), "text_emb_extend": (L, D) if cached, "text",
            "aspect_ratio"}`` float32.
        """
        try:
            out: dict[str, Any] = {"text": sample["txt"].decode("utf-8"), "aspect_ratio": bucket}
            meta = json.loads(sample["json"]) if "json" in sample else {}
            if self.kind == "latent":
                out["latents"] = _load_tensor(sample["latent.pth"])
                for key, name in (("txt.pth", "text_emb"), ("txt_extend.pth", "text_emb_extend")):
                    if key in sample:
                        out[name] = _load_tensor(sample[key])
            elif self.kind == "image":
                size = aspect_to_size(bucket, self.img_size, self.multiple)
                out["pixels"] = load_image(_media(sample), size, self.channels)
            else:
                gen = torch.Generator().manual_seed(seed)
                rate = draw_rate(self.rates, gen)
                frames, _ = read_clip(_media(sample), lambda n, fps: clip_indices(
                    n, float(meta.get("fps") or 0) or fps or rate, self.frames, rate, random_start=self.random_start,
                    generator=gen, paired=self.paired))
                size = aspect_to_size(bucket, self.img_size, self.multiple) if self.mix_aspect else self.size
                out["pixels"] = _resize_frames(frames, size, self.channels)
                out["fps"] = rate
            return out
        except (CorruptImageError, CorruptVideoError, *_BAD_SAMPLE) as err:
            logger.warning("skipping sample %s of %s (%s)", sample.get("__key__"), sample.get("__url__"), err)
            return None
