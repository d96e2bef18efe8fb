"""The video inputs of ``starflow sample``: ``--input_image``, ``--input_video`` (continuation, video-to-video) and
``--last_image``, checked from the config alone (so ``--dry_run`` refuses what sampling would) and read at the
sampling size."""
from __future__ import annotations

import argparse

from starflow.cli._flags import about_flag

__all__ = ["check_video_flags", "read_video_inputs", "check_input_clip", "check_input_headers", "without_sampler_tag"]


def check_video_flags(args: argparse.Namespace, cfg) -> None:
    """Refuse the video flags of ``starflow sample`` that would not act on this config, from the config alone (so
    ``--dry_run`` refuses what sampling would).

    Raises:
        ValueError: a video flag with an image model; ``--last_image`` without ``last_frame_cond``; ``--input_video``
            with ``--input_image``/``--last_image``; ``--return_sequence`` with ``--input_video``;
            ``--target_length`` or ``--context_length`` with video-to-video; a ``--target_length`` that leaves
            ``--input_image`` nothing to sample; a ``--target_length`` beyond one window with ``--last_image``;
            ``--context_length`` where no window is carried over, or not below the
            window.
    """
    from starflow.adapters.geometry import vae_geometry

    flags = {flag: getattr(args, flag, None) for flag in ("input_image", "input_video", "last_image", "target_length",
                                                          "context_length", "gif", "lossless_mp4")}
    given = [flag for flag, value in flags.items() if value]
    if not cfg.is_video:
        if given:
            raise ValueError(f"--{given[0]} is for video configs (image-to-video, continuation, video-to-video, end "
                             "frame, longer videos); this config has no vid_size")
        return
    if flags["last_image"] and not cfg.last_frame_cond:
        raise ValueError("--last_image needs a model trained with last_frame_cond (its config says 0): the end frame "
                         "conditions only such models")
    if flags["input_video"] and (flags["input_image"] or flags["last_image"]):
        raise ValueError("--input_video (continuation, video-to-video) cannot be combined with --input_image or "
                         "--last_image: the clip gives the frames")
    if flags["input_video"] and getattr(args, "return_sequence", False):
        raise ValueError("--return_sequence shows a sample drawn from noise, block by block; with --input_video the "
                         "clip's frames are given, not drawn: drop one of them")
    context = flags["context_length"]
    if flags["input_video"] and cfg.video_to_video:
        redraw = [flag for flag in ("target_length", "context_length") if flags[flag]]
        if redraw:
            raise ValueError(f"--{redraw[0]}: a video_to_video model redraws the clip's first {cfg.vid_size[0]} frames "
                             "(vid_size), in one window: drop the flag")
        return
    geometry = vae_geometry(cfg.vae)
    window = geometry.latent_frames(cfg.vid_size[0])
    if flags["input_image"] and flags["target_length"] and geometry.latent_frames(flags["target_length"]) < 2:
        raise ValueError(f"--target_length {flags['target_length']}: --input_image is the first of these frames, so "
                         f"none would be sampled; use {1 + geometry.temporal_downsample} or more")
    if flags["last_image"] and flags["target_length"] and geometry.latent_frames(flags["target_length"]) > window:
        from starflow.sampling.pipeline import last_image_beyond_window

        raise ValueError(last_image_beyond_window(flags["target_length"], cfg.vid_size[0]))
    if context is None:
        return
    if flags["input_video"]:  # continuation: the clip's last latent frames are the context
        if context >= window:
            raise ValueError(f"--context_length {context}: continuation needs 1 <= context_length < {window} (the "
                             "trained clip's latent frames)")
        return
    trained = window + (1 if cfg.last_frame_cond else 0)
    sampled = geometry.latent_frames(flags["target_length"] or cfg.vid_size[0]) + (1 if flags["last_image"] else 0)
    if sampled <= trained:
        raise ValueError(f"--context_length {context}: {sampled} latent frames fit in one window of {trained}, so no "
                         "context is carried over; it acts with a longer --target_length or with --input_video")
    if context >= trained:
        raise ValueError(f"--context_length {context}: must be below the window of {trained} latent frames")


def read_video_inputs(args: argparse.Namespace, pipe, cfg, is_main: bool = True) -> dict:
    """``--input_image``, ``--input_video`` and ``--last_image`` as pixels at the sampling size, each ``(1, ...)``;
    ``is_main``: print the clip's frame-rate note (:func:`check_input_clip`) here.

    The flags themselves are checked before (:func:`checked_settings`).

    Raises:
        ValueError: a video file where an image is expected, or a clip whose frame count the VAE does not accept.
    """
    given = {flag: getattr(args, flag) for flag in ("input_image", "input_video", "last_image") if getattr(args, flag)}
    if not given:
        return {}
    from starflow.data import load_image
    from starflow.data.images import image_frames, image_size
    from starflow.data.video import load_video, video_length, video_size

    _, c, h, w = pipe.latent_shape(args.aspect_ratio)
    down = pipe.vae.downsample
    size, channels = (h * down, w * down), cfg.channel_size if down == 1 else 3
    inputs = {}
    for flag, path in given.items():
        image = flag != "input_video"
        if image:
            _refuse_a_video(flag, path)
        with about_flag(flag, path):
            source = image_size(path) if image else video_size(path)
        if is_main and source != size[::-1]:
            print(f"note: --{flag} {path} is {source[0]}x{source[1]}; it is resized and centre-cropped to the samples' "
                  f"{size[1]}x{size[0]}")
        if image:
            with about_flag(flag, path):
                inputs[flag] = load_image(path, size, channels)[None]
                if is_main and image_frames(path) > 1:
                    role = "first" if flag == "input_image" else "end"
                    print(f"note: --{flag} {path} has {image_frames(path)} frames; only its first is used, as the "
                          f"{role} frame (a clip to continue goes to --input_video)")
            continue
        with about_flag(flag, path):
            clip = load_video(path, size, channels, max_frames=cfg.vid_size[0] if cfg.video_to_video else None)
            length, fps = video_length(path)
        note = check_input_clip(path, clip.shape[0], fps, cfg, getattr(args, "out_fps", None))
        if note and is_main:
            print(note)
        if cfg.video_to_video and length > clip.shape[0] and is_main:
            print(f"note: --input_video {path} has {length} frames; the model redraws clips of {clip.shape[0]} "
                  f"(vid_size), so its first {clip.shape[0]} are redrawn and the rest are left out")
        inputs[flag] = clip[None]
    return inputs


def check_input_clip(path: str, frames: int, fps: float, cfg, out_fps: int | None = None) -> str | None:
    """Refuse an ``--input_video`` clip whose frame count the model or the VAE does not take (sampling and
    ``--dry_run`` alike); returns a note when the file's frame rate is not the one its frames are sampled at.

    Args:
        path: the clip (for the messages).
        frames: its frame count (a ``video_to_video`` model's clip: those kept, at most ``vid_size``).
        fps: the file's frame rate (0 when it states none).
        cfg: the model's config.
        out_fps: ``--out_fps`` [default: the config's fps].

    Raises:
        ValueError: a ``video_to_video`` clip shorter than ``vid_size``, or a frame count the VAE does not encode.
    """
    from starflow.adapters.geometry import vae_geometry

    t = vae_geometry(cfg.vae).temporal_downsample
    if cfg.video_to_video and frames < cfg.vid_size[0]:
        raise ValueError(f"--input_video {path}: {frames} frame(s); this video_to_video model redraws {cfg.vid_size[0]} "
                         f"(vid_size): give a clip of at least {cfg.vid_size[0]} frames (longer ones are cut to them)")
    frames = min(frames, cfg.vid_size[0]) if cfg.video_to_video else frames
    if (frames - 1) % t:
        raise ValueError(f"--input_video {path}: {frames} frames; the VAE encodes {t}k+1 frames (temporal factor {t}): "
                         f"trim the clip to {1 + (frames - 1) // t * t} frames")
    rate = out_fps or cfg.fps
    if frames > 1 and fps > 0 and rate and abs(fps - rate) > 0.01 * rate:
        return (f"note: --input_video {path} is {fps:g} fps and its frames are sampled as {rate:g} fps frames, as they "
                f"are (its motion plays {rate / fps:.3g}x as fast as in the file); resample it to {rate:g} fps to keep "
                "its speed")
    return None


def _refuse_a_video(flag: str, path: str) -> None:
    """Raises ``ValueError`` for a video file (by its suffix) given to an image flag."""
    from starflow.data.video import VIDEO_SUFFIXES

    if str(path).lower().endswith(VIDEO_SUFFIXES):
        raise ValueError(f"--{flag} {path}: a video file, where an image is expected; pass a clip as --input_video "
                         "(continuation, video-to-video)")


def check_input_headers(args: argparse.Namespace) -> None:
    """Read the headers of ``--input_image``, ``--last_image`` and ``--input_video`` (no pixel decoded), so that
    ``--dry_run`` refuses an unreadable input as sampling would.

    Raises:
        OSError: an input that is not a readable image or video (named by its flag).
        ValueError: a video file given as an image.
    """
    from starflow.data.images import image_aspect
    from starflow.data.video import video_aspect

    for flag, read in (("input_image", image_aspect), ("last_image", image_aspect), ("input_video", video_aspect)):
        path = getattr(args, flag, None)
        if path:
            if flag != "input_video":
                _refuse_a_video(flag, path)
            with about_flag(flag, path):
                read(path)


def without_sampler_tag(captions: list[str], args: argparse.Namespace, cfg, is_main: bool = True) -> list[str]:
    """The captions without the caption tag the sampler adds itself (``"(v2v) "`` for video-to-video, ``"(last) "``
    with ``--last_image``), which a prompt typed with it would get twice; ``is_main``: print a note when one is removed."""
    from starflow.prompts import LAST_FRAME_PREFIX, V2V_PREFIX

    if cfg.is_video and cfg.video_to_video and getattr(args, "input_video", None):
        tag = V2V_PREFIX.strip()
    elif cfg.is_video and getattr(args, "last_image", None):
        tag = LAST_FRAME_PREFIX.strip()
    else:
        return captions
    stripped = [c[len(tag):].lstrip() if c.startswith(tag) else c for c in captions]
    if stripped != captions and is_main:
        print(f"note: the sampler adds the caption tag {tag!r} itself: removed it from the prompt(s) that began with it")
    return stripped
