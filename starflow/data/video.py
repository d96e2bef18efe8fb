"""Video folders with captions: clips at a requested frame rate and length, decoded with PyAV.

A folder holds video files plus ``metadata.jsonl``, one JSON object per line with ``file_name`` (relative to
the folder), ``text`` and optionally ``fps`` (else the container's frame rate is used). A clip of ``frames``
frames at ``fps`` frames per second starts at a random time and takes the source frame nearest to each target
time, so a 30 fps file sampled at 8 fps skips frames and a 4 fps file repeats them. With several rates
(``vid_size: 'F:fps1:fps2'``) each clip is cut at one drawn uniformly (SPEC section 16). The draws of clip
``index`` in epoch ``e`` come from ``sample_seed(seed, e, index)``: the same on any number of processes.
With ``mix_aspect`` each clip is resized into the aspect bucket nearest to its source (SPEC section 13).
Files that cannot be decoded or are shorter than one clip are skipped, counted and reported.

Video files are written with :func:`write_video` (H.264 through PyAV, ``imageio``'s backend) and previews
with :func:`write_gif`.
"""
from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from starflow.data.aspect import aspect_to_size, nearest_aspect
from starflow.data.images import METADATA_FILE, note_listing, read_metadata, shown_name
from starflow.data.seeding import sample_seed

__all__ = ["VIDEO_SUFFIXES", "CLIP_OR_IMAGE_SUFFIXES", "VideoFolder", "CorruptVideoError", "clip_indices", "read_clip",
           "read_video", "decoded_length", "load_video", "video_length", "video_size", "video_aspect", "write_video", "write_gif", "to_uint8_frames",
           "draw_rate"]

logger = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
"""File suffixes that are videos wherever a file's kind is told from its name."""
CLIP_OR_IMAGE_SUFFIXES = (".gif",)
"""Suffixes of files that are either (an animated GIF): a clip in a video folder, a still image (its first frame)
in an image folder; they never decide a folder's kind."""
_FORMAT_HELP = (f"a video folder needs '{METADATA_FILE}' with one JSON object per line, e.g. "
                '{"file_name": "clips/0001.mp4", "text": "a dog running", "fps": 24}; fps is optional')


class CorruptVideoError(OSError):
    """A video file that is missing, cannot be decoded, or is too short for one clip."""


def _video_stream(container, path):
    """The first video stream of an open container.

    Raises:
        CorruptVideoError: the file has none (e.g. an audio-only MP4)."""
    if not container.streams.video:
        raise CorruptVideoError(f"{shown_name(path)} has no video stream (audio or data only): pass a video file")
    return container.streams.video[0]


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that show a decoded frame upright: its display matrix (a phone's portrait
    video is stored as a landscape frame plus a 90 degree rotation), rounded to the nearest quarter turn."""
    return round(getattr(frame, "rotation", 0) / 90) % 4


def _upright_rgb(frame) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a decoded frame as players show it (its display rotation applied)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(frame)
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def read_video(path: str | Path | BinaryIO) -> tuple[np.ndarray, float]:
    """Decode every frame of a video file (or binary stream).

    Returns:
        ``(frames (T, H, W, 3) uint8 RGB, fps)``.

    Raises:
        CorruptVideoError: the file is missing or cannot be decoded.
    """
    frames, _, fps = _decode_video(path, keep=True)
    return np.stack(frames), fps


def decoded_length(path: str | Path | BinaryIO) -> tuple[int, float]:
    """Decode every frame of a video file, keeping none (the memory of one frame, where :func:`read_video` holds the
    whole file: a minute of 1080p is ~11 GB): the check that every frame decodes, and the true frame count.

    Returns:
        ``(frames, fps)``.

    Raises:
        CorruptVideoError: the file is missing or cannot be decoded.
    """
    _, count, fps = _decode_video(path, keep=False)
    return count, fps


def _decode_video(path: str | Path | BinaryIO, keep: bool) -> tuple[list[np.ndarray], int, float]:
    """``(frames as upright RGB if keep, else [], frame count, fps)`` of every frame of a video."""
    import av

    frames: list[np.ndarray] = []
    count = 0
    try:
        with _open_video(path) as container:
            stream = _video_stream(container, path)
            rate = _FrameRate(container, stream)
            for frame in container.decode(stream):
                count += 1
                rate.add(frame.duration)
                if keep:
                    frames.append(_upright_rgb(frame))
            fps = rate.fps()
    except CorruptVideoError:
        raise
    except (OSError, ValueError, IndexError, av.error.FFmpegError) as err:
        raise CorruptVideoError(f"cannot decode video {shown_name(path)}: {av_reason(err)}") from err
    if not count:
        raise CorruptVideoError(f"video {shown_name(path)} has no frames")
    return frames, count, fps


def read_clip(path: str | Path | BinaryIO, choose: Callable[[int, float], Sequence[int]]) -> tuple[np.ndarray, float]:
    """Decode only the frames of one clip: from the last keyframe at or before its first frame up to its last frame,
    converting only the clip's frames to RGB.

    Memory is that of the clip, not of the file (a minute of 1080p video is ~11 GB as RGB frames), and so is most of
    the decoding: a clip near the end of a long file starts at the keyframe before it (a seek), not at the file's
    start. Frames are identified by their presentation time, so the frames are those a decode from the start gives;
    if the seek does not deliver them (a file without presentation times, a demuxer that lands after the clip), the
    file is decoded from its start instead.

    Args:
        path: any file (or binary stream) ``av`` decodes.
        choose: ``choose(n_source, fps) -> source frame indices`` (e.g. :func:`clip_indices`), given the
            stream's frame count (its packets counted, not decoded) and its frame rate.
            If the file then decodes to fewer frames than the clip needs, or ``choose`` finds the count too
            short, the file is decoded whole and ``choose`` called again with the true count.

    Returns:
        ``(frames (len(indices), H, W, 3) uint8 RGB, fps)``.

    Raises:
        CorruptVideoError: the file is missing or cannot be decoded; what ``choose`` raises.
    """
    import av

    errors = (OSError, ValueError, IndexError, av.error.FFmpegError)
    try:
        scan = _scan_stream(path)
    except CorruptVideoError:
        raise
    except errors as err:
        raise CorruptVideoError(f"cannot decode video {shown_name(path)}: {av_reason(err)}") from err
    try:
        pick = list(choose(scan.count, scan.fps)) if scan.count else []
    except CorruptVideoError:  # too short by the count: the full decode below confirms it
        pick = []
    if pick:
        seek = scan.keyframe_before(min(pick))
        for start in ([seek] if seek else []) + [None]:  # a seek, then (if it missed frames) from the file's start
            try:
                clip = _decode_frames(path, sorted(set(pick)), scan.pts if start else None, start)
            except errors as err:
                raise CorruptVideoError(f"cannot decode video {shown_name(path)}: {av_reason(err)}") from err
            if clip is not None:
                return np.stack([clip[i] for i in pick]), scan.fps
    frames, fps = read_video(path)  # no count, or fewer frames than counted: the whole file, its true length
    return frames[list(choose(len(frames), fps))], fps


def _decode_frames(path: str | Path | BinaryIO, wanted: list[int], pts: list[int] | None,
                   start: tuple[int, int] | None) -> dict[int, np.ndarray] | None:
    """The RGB arrays of frames ``wanted`` (ascending indices), or None if the decode ends before it gives them all.

    Without ``start`` the frames are numbered in decoding output order from the file's start. With ``start = (index,
    pts)`` of a keyframe the container first seeks to it, and each frame is numbered by the rank of its presentation
    time in ``pts`` (the counted frames' times, ascending); frames before the keyframe's index are skipped (the
    leading pictures of an open GOP, which need the frames before the seek point)."""
    todo, kept = set(wanted), {}
    with _open_video(path) as container:
        stream = container.streams.video[0]
        if start is None:
            numbered = enumerate(container.decode(stream))
        else:
            container.seek(start[1], stream=stream, backward=True, any_frame=False)
            numbered = _ranked(container.decode(stream), pts, start[0])
        for i, frame in numbered:
            if i in todo:
                kept[i] = _upright_rgb(frame)
                todo.discard(i)
            if i >= wanted[-1]:
                break
    return None if todo else kept


def _ranked(frames, pts: list[int], first: int):
    """``(index, frame)`` for decoded frames whose presentation time is the ``index``-th of ``pts``, from ``first`` on;
    stops at a frame without a time (the caller then decodes from the start)."""
    for frame in frames:
        if frame.pts is None:
            return
        i = bisect.bisect_left(pts, frame.pts)
        if i >= first and i < len(pts) and pts[i] == frame.pts:
            yield i, frame


@dataclass(frozen=True)
class _StreamScan:
    """What :func:`_scan_stream` reads from the packets of a video stream.

    Attributes:
        count: frames (packets counted from the first keyframe on, see :func:`_scan_stream`).
        fps: frame rate (0 when the container gives none).
        pts: presentation times of those frames, ascending; None when a packet has none or two share one.
        keyframes: ``(index, pts)`` of the keyframes among them, by index (empty without ``pts``).
    """

    count: int
    fps: float
    pts: list[int] | None
    keyframes: list[tuple[int, int]]

    def keyframe_before(self, index: int) -> tuple[int, int] | None:
        """The last keyframe at or before frame ``index`` after the first keyframe (seeking to the first would not
        skip anything), or None."""
        before = [key for key in self.keyframes[1:] if key[0] <= index]
        return before[-1] if before else None


def _scan_stream(path: str | Path | BinaryIO) -> _StreamScan:
    """Frame count, rate and presentation times of the first video stream, from its packets (read, not decoded),
    from the first keyframe on: the header's count is not used, as it includes the frames an edit list trims
    (``ffmpeg -ss ... -c copy``) and WebM has none, and the decoder drops what precedes the first keyframe (a
    file cut mid-GOP)."""
    with _open_video(path) as container:
        stream = _video_stream(container, path)
        rate = _FrameRate(container, stream)
        count, keyed, pts, key_pts = 0, False, [], []
        for packet in container.demux(stream):
            keyed = keyed or packet.is_keyframe
            if not (keyed and packet.size and not packet.is_discard):
                continue
            count += 1
            rate.add(packet.duration)
            if pts is not None and packet.pts is None:
                pts = None
            elif pts is not None:
                pts.append(packet.pts)
                if packet.is_keyframe:
                    key_pts.append(packet.pts)
    if pts is not None:
        pts.sort()
        if len(set(pts)) != len(pts):
            pts = None
    keyframes = sorted((bisect.bisect_left(pts, t), t) for t in key_pts) if pts else []
    return _StreamScan(count, rate.fps(), pts, keyframes)


class _FrameRate:
    """A stream's frame rate: the container's average rate; for a GIF, whose frames each carry their own duration in
    hundredths of a second (8 fps alternates 0.13 s and 0.12 s), frames over the total duration, when every frame has
    one (FFmpeg's average rate of a GIF is its first frame's)."""

    def __init__(self, container, stream) -> None:
        self.header = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
        self.time_base = stream.time_base if container.format.name == "gif" else None
        self.frames, self.ticks = 0, 0

    def add(self, duration: int | None) -> None:
        """Count a frame of ``duration`` (in the stream's time base; None or 0 if unknown)."""
        if self.ticks is not None:
            self.frames += 1
            self.ticks = self.ticks + duration if duration else None

    def fps(self) -> float:
        if self.time_base and self.frames and self.ticks:
            return self.frames / float(self.ticks * self.time_base)
        return self.header


def _rewound(path: str | Path | BinaryIO) -> str | Path | BinaryIO:
    """``path``, or a binary stream seeked back to its start."""
    if hasattr(path, "seek"):
        path.seek(0)
    return path


def _open_video(path: str | Path | BinaryIO):
    """``av.open`` of a file name or of a binary stream from its start."""
    import av

    return av.open(_rewound(path) if hasattr(path, "read") else str(path))


def load_video(path: str | Path | BinaryIO, size: tuple[int, int], channels: int,
               max_frames: int | None = None) -> torch.Tensor:
    """Decode a video file and resize its frames like :func:`starflow.data.load_image` (cover, centre crop).

    Args:
        path: any file ``av`` decodes (MP4, WebM, GIF ...).
        size: ``(h, w)`` in pixels.
        channels: 1 (greyscale) or 3 (RGB).
        max_frames: keep only the first frames.

    Returns:
        ``(T, C, h, w)`` float32 in ``[-1, 1]``.

    Raises:
        CorruptVideoError: the file is missing or cannot be decoded.
    """
    if max_frames is None:
        frames, _ = read_video(path)
    else:
        frames, _ = read_clip(path, lambda n, fps: range(min(n, max_frames)))
    return _resize_frames(frames, size, channels)


def video_length(path: str | Path | BinaryIO) -> tuple[int, float]:
    """Frame count and frame rate of a video file, counted from its packets (read, not decoded; a file whose packets
    give no count is decoded).

    Returns:
        ``(frames, fps)``; fps 0.0 when the container states none (a still image).

    Raises:
        CorruptVideoError: the file is missing, has no video stream or cannot be read.
    """
    import av

    try:
        scan = _scan_stream(path)
    except CorruptVideoError:
        raise
    except (OSError, ValueError, IndexError, av.error.FFmpegError) as err:
        raise CorruptVideoError(f"cannot read video {shown_name(path)}: {av_reason(err)}") from err
    if scan.count:
        return scan.count, scan.fps
    return decoded_length(path)


def av_reason(err: BaseException) -> str:
    """The reason of a PyAV / FFmpeg error, for a message: FFmpeg's text without its errno and the path the message
    already names (``[Errno 1094995529] Invalid data found when processing input: 'x.mp4'`` -> ``Invalid data found
    when processing input``), and what to do about it."""
    import av

    if isinstance(err, av.error.FFmpegError) and getattr(err, "strerror", None):
        return (f"{err.strerror} (not a video FFmpeg can read, or a damaged one: re-encode it, e.g. "
                "ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4)")
    return str(err)


def video_size(path: str | Path | BinaryIO) -> tuple[int, int]:
    """``(width, height)`` of a video as players show it: the stream header's size, its sides swapped when the first
    frame's display rotation is a quarter turn (only that frame is decoded).

    Raises:
        CorruptVideoError: the header cannot be read.
    """
    import av

    try:
        with _open_video(path) as container:
            stream = _video_stream(container, path)
            w, h = stream.codec_context.width, stream.codec_context.height
            first = next(container.decode(stream), None)
            if first is not None and _quarter_turns(first) % 2:
                w, h = h, w
            return w, h
    except CorruptVideoError:
        raise
    except (OSError, ValueError, IndexError, av.error.FFmpegError) as err:
        raise CorruptVideoError(f"cannot read the video header of {shown_name(path)}: {av_reason(err)}") from err


def video_aspect(path: str | Path | BinaryIO) -> str:
    """The nearest aspect bucket of a video as players show it (:func:`video_size`).

    Raises:
        CorruptVideoError: the header cannot be read, or gives no size.
    """
    try:
        return nearest_aspect(*video_size(path))
    except ZeroDivisionError as err:
        raise CorruptVideoError(f"cannot read the video header of {shown_name(path)}: {av_reason(err)}") from err


def draw_rate(rates: tuple[float, ...], generator: torch.Generator) -> float:
    """One of ``rates``, uniformly (the only draw when there is a single rate is skipped: nothing is consumed)."""
    return rates[int(torch.randint(len(rates), (), generator=generator))] if len(rates) > 1 else rates[0]


def write_video(path: str | Path, frames: np.ndarray | torch.Tensor, fps: float, lossless: bool = False) -> Path:
    """Write frames as an H.264 MP4 (yuv420p, playable everywhere; ``lossless``: RGB H.264, ``libx264rgb`` at QP 0,
    which keeps every pixel exactly, as YUV, even 4:4:4 at QP 0, does not: its conversion rounds by a level).

    Args:
        path: output file (``.mp4``).
        frames: ``(T, H, W, 3)`` or ``(T, H, W)`` uint8, or a float tensor ``(T, C, H, W)`` in ``[-1, 1]``.
        fps: frames per second.
        lossless: keep every pixel (for datasets and metrics); otherwise the default quality (for viewing).
    """
    import av

    frames = to_uint8_frames(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=round(fps))
        stream.width, stream.height = w + w % 2, h + h % 2  # yuv420p needs even sides
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        if lossless:
            stream.width, stream.height = w, h
            stream.options = {"qp": "0"}
        for frame in frames:
            if (stream.width, stream.height) != (w, h):
                frame = np.pad(frame, ((0, stream.height - h), (0, stream.width - w), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def to_uint8_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(T, C, H, W)`` float in ``[-1, 1]`` (tensor) or ``(T, H, W[, C])`` uint8 -> ``(T, H, W, 3)`` uint8."""
    if isinstance(frames, torch.Tensor):
        x = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        frames = x.permute(0, 2, 3, 1).cpu().numpy()
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames


def write_gif(path: str | Path, frames: np.ndarray | torch.Tensor, fps: float, scale: int = 1) -> Path:
    """An animated GIF preview (looping), each pixel enlarged ``scale`` times.

    Args:
        path: output file (``.gif``).
        frames: as :func:`write_video`: ``(T, H, W, 3)`` or ``(T, H, W)`` uint8, or a float tensor ``(T, C, H, W)``
            in ``[-1, 1]``.
        fps: frames per second. A GIF times frames in hundredths of a second, so frame ``i`` shows from
            ``round(100 i / fps)`` to ``round(100 (i + 1) / fps)`` hundredths: 8 fps alternates 0.13 s and 0.12 s,
            and the clip lasts ``T / fps`` seconds (one rounded duration for all, 0.12 s, would play at 8.33 fps).
            Above 50 fps frames get 0.01 s, which many players stretch (to about 0.1 s): a preview plays slower.
        scale: integer enlargement (nearest neighbour), for small demo frames.
    """
    from PIL import Image

    frames = to_uint8_frames(frames)
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    images = [Image.fromarray(f) for f in frames]
    ticks = [round(100 * i / fps) for i in range(len(images) + 1)]
    durations = [10 * max(1, b - a) for a, b in zip(ticks, ticks[1:])]  # ms, whole hundredths
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)
    return path


def _resize_frames(frames: np.ndarray, size: tuple[int, int], channels: int) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, C, h, w)`` float in ``[-1, 1]`` (shorter side covers, centre crop)."""
    from PIL import Image

    h, w = size
    out = []
    for f in frames:
        img = Image.fromarray(f).convert("L" if channels == 1 else "RGB")
        if img.size != (w, h):
            scale = max(w / img.width, h / img.height)
            img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                             Image.Resampling.BICUBIC)
            left, top = (img.width - w) // 2, (img.height - h) // 2
            img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32)
        out.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)) / 127.5 - 1


def clip_indices(n_source: int, source_fps: float, frames: int, fps: float, *, random_start: bool = True,
                 generator: torch.Generator | None = None, paired: bool = False) -> list[int]:
    """Source frame indices of one clip of ``frames`` frames at ``fps``: the nearest source frame to each target
    time, from a uniformly random start (``generator``, else the global torch RNG) or from frame 0.

    With ``paired`` (``video_to_video`` files: the target clip, then the source clip, of equal length) the file's
    halves are cut at the same times: ``frames // 2`` indices drawn in the first half, then the same ones in the
    second, so target and source frames stay aligned (SPEC section 16).

    Raises:
        CorruptVideoError: the video is shorter than one clip, or a paired file has an odd number of frames.
    """
    if paired:
        if n_source % 2:
            raise CorruptVideoError(f"{n_source} frames: a video_to_video file holds the target clip then the source "
                                    "clip, two halves of equal length")
        half = n_source // 2
        pick = clip_indices(half, source_fps, frames // 2, fps, random_start=random_start, generator=generator)
        return pick + [half + i for i in pick]
    step = source_fps / fps  # source frames per clip frame
    span = (frames - 1) * step
    if span > n_source - 1 + 1e-6:
        raise CorruptVideoError(f"{n_source} frames at {source_fps:g} fps are shorter than a clip of "
                                f"{frames} frames at {fps:g} fps")
    latest = n_source - 1 - span
    start = float(torch.rand((), generator=generator).item()) * latest if random_start else 0.0
    return [min(n_source - 1, round(start + k * step)) for k in range(frames)]


class VideoFolder(torch.utils.data.Dataset):
    """Captioned clips from a folder of videos with ``metadata.jsonl``; never crashes on a bad file.

    Args:
        root: folder with ``metadata.jsonl`` and the videos.
        frames: frames per clip T.
        fps: frame rate of the clips, or several (one drawn per clip).
        size: ``(h, w)`` of the clips in pixels (without ``mix_aspect``).
        channels: 1 (greyscale) or 3 (RGB).
        random_start: a random clip start per access (training); else the first clip.
        mix_aspect: each clip in the aspect bucket nearest to its source, at ``img_size`` (read from its header).
        img_size: with ``mix_aspect``: the side S of the bucket sizes (SPEC section 13).
        multiple: with ``mix_aspect``: bucket sides are multiples of it (``vae_downsample * patch_size``).
        seed: seed of the clip draws (with the epoch, :meth:`set_epoch`, and the index).
        paired: ``video_to_video`` files (target then source): both halves are cut at the same times
            (:func:`clip_indices`); ``frames`` counts both.

    Raises:
        FileNotFoundError: no ``metadata.jsonl`` (the message explains the format).
        ValueError: malformed metadata, or none of the listed files exist.
    """

    def __init__(self, root: str | Path, frames: int, fps: float | tuple[float, ...], size: tuple[int, int],
                 channels: int = 3, random_start: bool = True, *, mix_aspect: bool = False,
                 img_size: int | None = None, multiple: int = 1, seed: int = 0, paired: bool = False) -> None:
        self.root, self.frames, self.size, self.channels = Path(root), frames, size, channels
        self.paired = paired
        self.rates = tuple(fps) if isinstance(fps, (tuple, list)) else (fps,)
        self.fps = self.rates[0]
        self.random_start, self.mix_aspect, self.multiple = random_start, mix_aspect, multiple
        self.img_size = img_size or size[0]
        self.seed, self.epoch = seed, 0
        self.paths: list[Path] = []
        self.texts: list[str] = []
        self.source_fps: list[float | None] = []
        self.buckets: list[str] = []
        self.skipped: dict[str, str] = {}
        records = read_metadata(self.root, _FORMAT_HELP)
        self.listed = len(records)
        for obj in records:
            path = self.root / obj["file_name"]
            if not path.is_file():
                self.skipped[str(path)] = "a folder, not a file" if path.is_dir() else "missing"
                continue
            bucket = "1:1"
            if mix_aspect:
                try:
                    bucket = video_aspect(path)
                except CorruptVideoError as err:
                    self.skipped[str(path)] = str(err)
                    continue
            self.paths.append(path)
            self.texts.append(obj["text"])
            self.source_fps.append(float(obj["fps"]) if obj.get("fps") else None)
            self.buckets.append(bucket)
        if self.skipped:
            logger.warning("%s: skipping %d missing or unreadable files", self.root, len(self.skipped))
        if not self.paths:
            raise ValueError(f"none of the files listed in {self.root / METADATA_FILE} exist")
        note_listing(self.root, [self.root / obj["file_name"] for obj in records], VIDEO_SUFFIXES, "video")

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose clip draws (start, rate) :meth:`__getitem__` makes."""
        self.epoch = epoch

    def clip_size(self, bucket: str) -> tuple[int, int]:
        """``(h, w)`` of the clips of an aspect bucket."""
        return aspect_to_size(bucket, self.img_size, self.multiple) if self.mix_aspect else self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | float]:
        """``{"pixels": (T, C, H, W) float32 in [-1, 1], "text": str, "aspect_ratio": str, "fps": float,
        "skipped": list[str]}``; an unreadable or too-short file is replaced by the next readable one of the same
        bucket (recorded in ``skipped`` and listed in the sample's ``"skipped"``).

        Raises:
            RuntimeError: no file of the bucket can be used.
        """
        n = len(self)
        bucket = self.buckets[index]
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        rate = draw_rate(self.rates, gen)
        newly: list[str] = []
        for k in range(n):
            j = (index + k) % n
            path = self.paths[j]
            if str(path) in self.skipped or self.buckets[j] != bucket:
                continue
            try:
                frames, _ = read_clip(path, lambda n, fps: clip_indices(
                    n, self.source_fps[j] or fps or rate, self.frames, rate, random_start=self.random_start,
                    generator=gen, paired=self.paired))
            except CorruptVideoError as err:
                self.skipped[str(path)] = str(err)
                newly.append(str(path))
                logger.warning("skipping video %s (%s)", path, err)
                continue
            return {"pixels": _resize_frames(frames, self.clip_size(bucket), self.channels),
                    "text": self.texts[j], "aspect_ratio": bucket, "fps": rate, "skipped": newly}
        raise RuntimeError(f"no usable video in {self.root}: {self.report()}")

    def report(self) -> str:
        """One line: clips listed and files skipped, with reasons for a few."""
        few = list(self.skipped.items())[:3]
        usable = sum(str(p) not in self.skipped for p in self.paths)
        return (f"{self.root}: {usable} usable of {self.listed} listed, {len(self.skipped)} skipped"
                + (f", e.g. {few}" if few else ""))
