"""The training data a config names: a captioned folder (images or videos) or a folder of shards."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from starflow.config import Config
from starflow.data.images import IMAGE_SUFFIXES, ImageFolder
from starflow.data.video import CLIP_OR_IMAGE_SUFFIXES, VIDEO_SUFFIXES
from starflow.data.latent_cache import check_cache_settings
from starflow.data.shards import read_index
from starflow.data.stream import ShardStream

__all__ = ["build_dataset", "build_secondary_dataset", "check_data_folder", "clip_frames"]

Once = Callable[[Callable[[], Any]], Any]
"""How work done once for all ranks is run: ``once(make) -> make()``'s result on every rank (the trainer passes
:func:`starflow.distributed.from_rank0`: made on rank 0, sent to the others)."""


def _here(make: Callable[[], Any]) -> Any:
    return make()


def check_data_folder(data: str | Path) -> Path:
    """``data`` as a folder (cheap, so a run can check it before loading its text encoder and VAE).

    Raises:
        FileNotFoundError: no such folder (or a file).
    """
    root = Path(data)
    if not root.is_dir():
        what = f"a file, not a folder (pass {root.parent})" if root.is_file() else "no such folder"
        raise FileNotFoundError(f"--data {root}: {what}; --data is an image or video folder with metadata.jsonl, or "
                                "a folder of shards from starflow pack / cache-latents")
    return root


def clip_frames(cfg: Config) -> int:
    """Pixel frames read per training clip: ``vid_size`` frames, twice that with ``video_to_video`` (target then
    source, SPEC section 16)."""
    return cfg.vid_size[0] * (2 if cfg.video_to_video else 1)


def build_dataset(cfg: Config, *, downsample: int, rank: int = 0, world_size: int = 1, once: Once = _here):
    """The training data named by ``cfg.data``: a folder with ``metadata.jsonl`` (images or videos), or a folder
    of webdataset shards with ``index.json`` (``starflow pack``; or cached latents, ``starflow cache-latents``).

    With ``wds: 1`` and a plain folder the folder is read directly, with a note on how to pack it. The kind of
    data is decided, and a folder indexed (a stat and, for aspect buckets, a header read per file), through
    ``once``: under a process group the trainer passes :func:`starflow.distributed.from_rank0`, so rank 0 does
    it for all (every rank must then call this).

    Args:
        cfg: the training config (``data``, sizes, ``batch_size``, ``grad_accum``, ``mix_aspect``, ``seed``).
        downsample: the VAE's spatial factor (1 for pixels): sizes are multiples of ``downsample * patch_size``.
        rank, world_size: this process's place among the training processes (shard streams split by rank).
        once: how work done once for all ranks runs (:data:`Once`; default: here).

    Returns:
        An :class:`ImageFolder`, a :class:`~starflow.data.video.VideoFolder` or a :class:`ShardStream`.

    Raises:
        ValueError: a latent cache made with other settings (the message names the keys); shards of images for a
            video config or of videos for an image config.
        FileNotFoundError: no ``metadata.jsonl`` / ``index.json`` in the folder.
    """
    root = check_data_folder(cfg.data)
    pixel_channels = cfg.channel_size if downsample == 1 else 3
    if once(lambda: (root / "index.json").is_file()):  # shards: each rank streams its own share
        kind = read_index(root)[1]["kind"]
        if kind == "latent":
            check_cache_settings(root, cfg)
        elif (kind == "video") != cfg.is_video:
            want = "video" if cfg.is_video else "image"
            raise ValueError(f"--data {root}: shards of {kind}s (its index.json), but this is {'a' if cfg.is_video else 'an'}"
                             f" {want} config: pack a folder of {want}s (GIFs alone are packed as videos when animated)")
        micro = cfg.batch_size // (world_size * cfg.grad_accum)
        video = dict(frames=clip_frames(cfg), fps=cfg.fps_choices, size=(cfg.img_size, cfg.img_size),
                     paired=bool(cfg.video_to_video)) if cfg.is_video else {}
        return ShardStream(root, micro, img_size=cfg.img_size, channels=pixel_channels,
                           multiple=downsample * cfg.patch_size, mix_aspect=cfg.mix_aspect, seed=cfg.seed,
                           rank=rank, world_size=world_size, **video)
    return once(lambda: _indexed(_folder_dataset(cfg, root, pixel_channels, downsample)))


def _folder_dataset(cfg: Config, root: Path, pixel_channels: int, downsample: int):
    """The image or video folder ``root`` as a dataset (see :func:`build_dataset`)."""
    if cfg.wds:
        tqdm.write(f"note: config key 'wds' is 1 but {root} is a plain folder (no index.json); reading it directly. "
                   f"For sharded reading at scale run `starflow pack {root} SHARDS_DIR` and pass --data SHARDS_DIR")
    if cfg.is_video:
        from starflow.data.video import VideoFolder

        _check_data_kind(root, video=True)
        return VideoFolder(root, frames=clip_frames(cfg), fps=cfg.fps_choices, size=(cfg.img_size, cfg.img_size),
                           channels=pixel_channels, mix_aspect=cfg.mix_aspect, img_size=cfg.img_size,
                           multiple=downsample * cfg.patch_size, seed=cfg.seed, paired=bool(cfg.video_to_video))
    _check_data_kind(root, video=False)
    return ImageFolder(root, cfg.img_size, pixel_channels, mix_aspect=cfg.mix_aspect,
                       multiple=downsample * cfg.patch_size)


def _check_data_kind(root: Path, video: bool) -> None:
    """A config pointed at a folder of the other kind (an image config at videos, a video config at images): say so at
    once, from the first ``metadata.jsonl`` entry, instead of skipping every file as unreadable.

    Raises:
        ValueError: the folder's first file is of the other kind.
    """
    import json

    if not (root / "metadata.jsonl").is_file():  # (a FIFO would block the open)
        return  # the dataset reports a missing metadata.jsonl with its fix
    try:
        with open(root / "metadata.jsonl", encoding="utf-8") as f:
            first = json.loads(next((line for line in f if line.strip()), "{}"))
    except (OSError, ValueError):
        return  # the dataset reports a missing or corrupt metadata.jsonl with its line
    name = str(first.get("file_name", "")) if isinstance(first, dict) else ""
    if not video and name.lower().endswith(VIDEO_SUFFIXES):
        raise ValueError(f"--data {root}: holds videos ({name}), but this is an image config (no vid_size): train "
                         "a video config on it, or pass an image folder")
    if video and name.lower().endswith(IMAGE_SUFFIXES) and not name.lower().endswith(CLIP_OR_IMAGE_SUFFIXES):
        raise ValueError(f"--data {root}: holds images ({name}), but this is a video config (vid_size): train an "
                         "image config on it, pass a video folder, or give images to a video model as "
                         "secondary_data")


def build_secondary_dataset(cfg: Config, *, downsample: int, once: Once = _here) -> ImageFolder | None:
    """The secondary image data of a video config (``secondary_data`` at ``secondary_img_size``, aspect buckets
    with ``mix_aspect``), trained as one-frame videos; None without ``secondary_data``. Indexed through
    ``once``, as in :func:`build_dataset`.

    Raises:
        FileNotFoundError: no ``metadata.jsonl`` in the folder.
    """
    if cfg.secondary_data is None:
        return None
    channels = cfg.channel_size if downsample == 1 else 3
    size, multiple = cfg.secondary_img_size or cfg.img_size, downsample * cfg.patch_size
    return once(lambda: _indexed(ImageFolder(Path(cfg.secondary_data), size, channels, mix_aspect=cfg.mix_aspect,
                                             multiple=multiple)))


def _indexed(dataset):
    """A folder dataset with its aspect buckets read (so they travel with it from rank 0)."""
    dataset.buckets  # noqa: B018 - read from the files' headers on first use
    return dataset
