"""Latent caches: every sample's VAE latent and text embedding computed once and stored as shards.

Training on a cache skips the frozen VAE and T5 in every step. The cache stores the posterior mean
(no sampling noise; the trainer still adds ``noise_std`` noise) and the T5 embedding of the caption
templated exactly as the trainer templates it (:func:`starflow.prompts.prompt_from_config`; SPEC section 12), plus, for
``drop_image > 0``, that of ``EXTEND_PREFIX + caption``. ``uncond.pt`` holds the empty prompt's embedding
(caption dropout) per aspect bucket. ``index.json`` records the config keys the cache depends on;
:func:`check_cache_settings` compares them with a training config.
"""
from __future__ import annotations

import io
import json
from collections.abc import Container, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from starflow.assets import TINY_TEXT_ENCODER
from starflow.data.aspect import ASPECT_RATIOS
from starflow.data.images import METADATA_FILE, read_metadata
from starflow.prompts import EXTEND_PREFIX, prompt_from_config
from starflow.data.shards import (
    INDEX_FILE,
    UNCOND_FILE,
    SampleDecoder,
    ShardProgress,
    check_replaceable,
    folder_kind,
    folder_samples,
    replaced_output,
    read_index,
    read_shards,
    write_shards,
)

if TYPE_CHECKING:  # the adapters pull in transformers and diffusers: imported where used
    from starflow.adapters import LatentAdapter, TextEncoder
    from starflow.config import Config

__all__ = ["CACHE_KEYS", "UNCOND_FILE", "cache_latents", "cache_settings", "check_cache_inputs",
           "check_cache_settings", "check_cacheable", "load_uncond"]

_SETTING_KEYS = ("img_size", "vid_size", "vae", "text", "txt_size", "channel_size", "fps_cond",
                 "cond_noise_level", "noise_std", "mix_aspect")
CACHE_KEYS = frozenset(_SETTING_KEYS) | {"drop_image", "patch_size", "fps", "seed"}
"""The config keys a cache is made with (``seed``: the tiny preset text encoder's weights); ``cache-latents`` refuses
the others as flags."""


def cache_settings(cfg: Config) -> dict[str, Any]:
    """The config values a latent cache depends on (JSON-safe): the keys above, ``drop_image`` as
    ``drop_image > 0``, ``patch_size`` with ``mix_aspect`` (bucket sides are its multiples) and ``seed`` with the
    built-in tiny text encoder (its weights are drawn from it)."""
    d = cfg.to_dict()
    settings = {k: d[k] for k in _SETTING_KEYS}
    settings["drop_image"] = cfg.drop_image > 0
    settings["patch_size"] = cfg.patch_size if cfg.mix_aspect else None
    settings["seed"] = cfg.seed if cfg.txt_size > 0 and cfg.text == TINY_TEXT_ENCODER else None
    return settings


def check_cache_settings(index: Mapping[str, Any] | str | Path, cfg: Config) -> None:
    """Checks that a latent cache was made for ``cfg``.

    Args:
        index: The cache's index (``read_index(root)[1]``), its folder or its ``index.json``.
        cfg: The training config.

    Raises:
        ValueError: Not a latent cache, or settings differ (each key named, with both values and the fix).
    """
    if not isinstance(index, Mapping):
        index = read_index(index)[1]
    if index.get("kind") != "latent":
        raise ValueError(f"not a latent cache (kind {index.get('kind')!r}); make one with `starflow cache-latents`")
    stored, wanted = index.get("settings", {}), cache_settings(cfg)
    diff = [f"{k}: cache {stored.get(k)!r}, config {v!r}" for k, v in wanted.items() if stored.get(k) != v]
    if diff:
        seed = (f"; a run that trained on it resumes with --seed {stored['seed']} (its tiny text encoder is drawn from "
                "the seed)" if stored.get("seed") is not None and stored.get("seed") != wanted["seed"] else "")
        raise ValueError(f"the latent cache was made with other settings ({'; '.join(diff)}); re-run "
                         "`starflow cache-latents --config CONFIG --data SRC --out OUT --overwrite` with this config"
                         + seed)


def load_uncond(root: str | Path, aspect_ratio: str | None = None) -> torch.Tensor:
    """The empty prompt's embedding ``(L, D)`` float32 from a latent cache.

    Args:
        root: The cache folder.
        aspect_ratio: The bucket (``"w:h"``); needed only for ``mix_aspect`` caches, which hold one per bucket.

    Raises:
        FileNotFoundError: The cache has no ``uncond.pt`` (made without a text encoder).
        KeyError: ``aspect_ratio`` is missing or unknown for a ``mix_aspect`` cache.
    """
    path = read_index(root)[0] / UNCOND_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: the cache was made without a text encoder (txt_size 0)")
    table = torch.load(path, map_location="cpu", weights_only=True)
    if len(table) == 1:
        return next(iter(table.values())).float()
    if aspect_ratio not in table:
        raise KeyError(f"{path} holds one embedding per aspect ratio; pass one of {sorted(table)}")
    return table[aspect_ratio].float()


def _tensor_bytes(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(x.detach().cpu().clone(), buf)  # clone: a row of a batch would save the whole batch
    return buf.getvalue()


class _Encoder:
    """Encodes decoded samples in batches and yields the cache's raw samples."""

    def __init__(self, cfg: Config, vae: LatentAdapter, text_encoder: TextEncoder | None, dtype: torch.dtype) -> None:
        self.cfg, self.vae, self.text_encoder, self.dtype = cfg, vae, text_encoder, dtype

    def embed(self, texts: list[str], aspects: list[str]) -> torch.Tensor:
        """``(B, L, D)`` embeddings of templated captions."""
        prompts = [prompt_from_config(t, self.cfg, a) for t, a in zip(texts, aspects)]
        return self.text_encoder.encode_templated(texts, prompts)

    def batch(self, items: list[tuple[dict, dict]]) -> Iterator[dict]:
        """``items``: (raw sample, decoded sample) pairs of one bucket."""
        decoded = [d for _, d in items]
        texts, aspects = [d["text"] for d in decoded], [d["aspect_ratio"] for d in decoded]
        pixels = torch.stack([d["pixels"] for d in decoded])  # (B, [T,] C, H, W); the adapter moves it
        latents = self.vae.encode(pixels, sample=False).to(self.dtype)
        emb = extend = None
        if self.text_encoder is not None:
            emb = self.embed(texts, aspects).to(self.dtype)  # (B, L, D)
            if self.cfg.drop_image > 0:
                extend = self.embed([EXTEND_PREFIX + t for t in texts], aspects).to(self.dtype)
        for i, (raw, d) in enumerate(items):
            out = {"__key__": raw["__key__"], "__source__": _source_name(raw),  # (__source__: not written)
                   "latent.pth": _tensor_bytes(latents[i]), "txt": raw["txt"],
                   "json": _with_aspect(raw.get("json"), d["aspect_ratio"])}
            if emb is not None:
                out["txt.pth"] = _tensor_bytes(emb[i])
            if extend is not None:
                out["txt_extend.pth"] = _tensor_bytes(extend[i])
            yield out


def _with_aspect(meta: bytes | None, aspect_ratio: str) -> bytes:
    return json.dumps(dict(json.loads(meta) if meta else {}, aspect_ratio=aspect_ratio)).encode("utf-8")


def _source(src: Path, skipped: list[dict], done: Container[str]) -> tuple[str, Iterator[dict]]:
    """``(kind, raw samples)`` of a shard folder (read in order) or a captioned folder, without the samples whose
    :func:`_source_name` is in ``done`` (a folder's: unread). The samples of a shard folder that never arrive (a
    missing or truncated shard) are counted into ``skipped`` once it is read."""
    if (src / INDEX_FILE).is_file():
        root, index = read_index(src)
        samples = _counted(read_shards([root / s["name"] for s in index["shards"]]), index, skipped)
        return index["kind"], (raw for raw in samples if _source_name(raw) not in done)
    return folder_samples(src, skipped, done)


def check_cache_inputs(src: str | Path, out: str | Path, cfg: Config, overwrite: bool = False) -> None:
    """What :func:`cache_latents` refuses, checked without encoders and without reading a sample: for a command to
    check before models load.

    Raises:
        FileNotFoundError, FileExistsError, ValueError: as :func:`cache_latents`.
    """
    check_cacheable(cfg)
    src = Path(src)
    if (src / INDEX_FILE).is_file():
        kind = read_index(src)[1]["kind"]
    else:
        kind = folder_kind([r["file_name"] for r in read_metadata(src)], src)
    _check_source(kind, src, Path(out), cfg, overwrite)


def _check_source(kind: str, src: Path, out: Path, cfg: Config, overwrite: bool) -> None:
    """Refuse a source of ``kind`` or an output folder that :func:`cache_latents` cannot use (the config: see
    :func:`check_cacheable`)."""
    if kind == "latent":
        raise ValueError(f"{src} is already a latent cache; pass the image or video data")
    if (kind == "video") != cfg.is_video:
        raise ValueError(f"{src} holds {kind}s, and the config is for {'videos (vid_size)' if cfg.is_video else 'images'}"
                         f": cache {'videos' if cfg.is_video else 'images'} with it, or use a config for {kind}s")
    if len(cfg.fps_choices) > 1:
        raise ValueError(f"vid_size {cfg.to_dict()['vid_size']!r} draws a clip rate per step; a latent cache holds one "
                         "clip per video: train on the videos (or their shards) instead")
    check_replaceable(out, overwrite, src)


def _counted(samples: Iterator[dict], index: Mapping[str, Any], skipped: list[dict]) -> Iterator[dict]:
    seen = 0
    for sample in samples:
        seen += 1
        yield sample
    expected = sum(s["samples"] for s in index["shards"])
    if seen < expected:
        skipped.append({"file_name": f"{expected - seen} of the {expected} samples listed in the shard index",
                        "reason": "missing or damaged shard", "count": expected - seen})


def check_cacheable(cfg: Config) -> None:
    """Refuse a config whose training a latent cache cannot feed.

    Raises:
        ValueError: ``video_to_video`` or ``last_frame_cond``: each clip is encoded in parts (SPEC section 16), which a
            cache of whole-clip latents does not hold.
    """
    if cfg.video_to_video or cfg.last_frame_cond:
        raise ValueError("video_to_video / last_frame_cond encode parts of each clip, which a latent cache of whole "
                         "clips does not hold: train on the videos (or their shards)")


def cache_latents(src: str | Path, out: str | Path, cfg: Config, vae: LatentAdapter, text_encoder: TextEncoder | None,
                  batch_size: int = 16, dtype: torch.dtype = torch.float32, shard_size: int = 1000,
                  overwrite: bool = False) -> dict:
    """Encodes every sample of a folder or shard folder once into a latent cache.

    Samples are decoded as the trainer's datasets decode them (``img_size``, aspect buckets of
    ``vae.downsample * patch_size`` with ``mix_aspect``; videos: the first ``vid_size`` clip), batched per
    bucket, and stored as ``latent.pth`` (``vae.encode(pixels, sample=False)``: ``(C, h, w)`` or
    ``(T', C, h, w)``), ``txt.pth`` and, with ``drop_image > 0``, ``txt_extend.pth`` (``(L, D)``), plus the
    caption and ``json`` (with ``aspect_ratio``).

    Args:
        src: Captioned folder (``metadata.jsonl``) or shard folder (``index.json`` of kind image/video).
        out: Output folder: ``shard-*.tar``, ``index.json`` (kind ``"latent"``, ``settings``), ``uncond.pt``.
        cfg: The training config.
        vae: Latent adapter (as built for training).
        text_encoder: Text encoder, or None for ``txt_size: 0``.
        batch_size: Samples per encoder batch.
        dtype: Storage dtype of latents and embeddings (read back as float32).
        shard_size: Samples per shard.
        overwrite: Replace a cache already in ``out`` (once the new one is complete: a failed run keeps it).

    Resumable: a run that fails or is stopped keeps its full shards in ``out/.staging-resume`` (with
    ``progress.json``, :class:`~starflow.data.shards.ShardProgress`); the next run of the same source, listing,
    settings, ``dtype`` and ``shard_size`` keeps them and encodes the other samples only (a folder's samples are named
    by their line in ``metadata.jsonl`` and left unread; a shard folder's by shard and key, read again but not
    decoded). A run of other inputs discards them. A sample cached before a resume stays cached as it was when read
    (a file changed or removed since is not noticed; an unreadable one made readable is cached by the resume).

    Returns:
        The index written to ``out/index.json``.

    Raises:
        FileNotFoundError: ``src`` has neither ``metadata.jsonl`` nor ``index.json``.
        FileExistsError: ``out`` holds shards and ``overwrite`` is off.
        ValueError: ``src`` is a latent cache or ``out`` itself, holds videos for an image config (or the reverse),
            or no sample is usable; a config :func:`check_cacheable` refuses.
    """
    src, out = Path(src), Path(out)
    skipped: list[dict] = []
    check_cacheable(cfg)
    done: set[str] = set()  # (filled from the progress of an interrupted run before the samples are read)
    kind, samples = _source(src, skipped, done)
    _check_source(kind, src, out, cfg, overwrite)
    channels = cfg.channel_size if vae.downsample == 1 else 3
    decoder = SampleDecoder(kind, img_size=cfg.img_size, channels=channels, multiple=vae.downsample * cfg.patch_size,
                            mix_aspect=cfg.mix_aspect, frames=cfg.vid_size[0] if cfg.vid_size else None,
                            fps=cfg.fps or None, size=(cfg.img_size, cfg.img_size),
                            random_start=False)
    encoder = _Encoder(cfg, vae, text_encoder, dtype)
    inputs = {"source": str(src.resolve()), "listing": _listing_sha(src), "settings": cache_settings(cfg),
              "dtype": str(dtype).removeprefix("torch."), "shard_size": shard_size}
    with replaced_output(out, overwrite, src, resume=True) as staging, torch.no_grad():
        progress = ShardProgress(staging, inputs)
        done.update(progress.done)
        if text_encoder is not None:
            aspects = ASPECT_RATIOS if cfg.mix_aspect else ("1:1",)
            table = encoder.embed([""] * len(aspects), list(aspects)).to(dtype).cpu()  # as the samples: loadable anywhere
            torch.save({a: table[i].clone() for i, a in enumerate(aspects)}, staging / UNCOND_FILE)
        return write_shards(staging, _encoded(samples, decoder, encoder, batch_size, skipped, src), shard_size,
                            {"kind": "latent", "settings": cache_settings(cfg), "source": str(src), "skipped": skipped},
                            shown=out, progress=progress, expected=_source_size(src), desc="cache-latents")


def _source_size(src: Path) -> int:
    """The number of samples the source lists (its shard index's, or its ``metadata.jsonl`` lines)."""
    if (src / INDEX_FILE).is_file():
        return sum(s["samples"] for s in read_index(src)[1]["shards"])
    return len(read_metadata(src))


def _source_name(raw: dict) -> str:
    """What names a raw sample of the source across runs: its shard and key (a folder's samples: the key, its line
    in ``metadata.jsonl``)."""
    url = raw.get("__url__")
    return f"{Path(url).name}/{raw['__key__']}" if url else str(raw["__key__"])


def _listing_sha(src: Path) -> str:
    """A hash of what lists the source's samples (``index.json`` of a shard folder, else ``metadata.jsonl``): a
    resumed run of a changed listing starts afresh. (The files themselves are not hashed: see :func:`cache_latents`.)"""
    import hashlib

    listing = src / INDEX_FILE if (src / INDEX_FILE).is_file() else src / METADATA_FILE
    return hashlib.sha256(listing.read_bytes()).hexdigest()[:16]


def _encoded(samples: Iterable[dict], decoder: SampleDecoder, encoder: _Encoder, batch_size: int,
             skipped: list[dict], src: Path) -> Iterator[dict]:
    """Cache samples of ``samples``, encoded in batches of one aspect bucket; undecodable ones go to ``skipped``."""
    buffers: dict[str, list[tuple[dict, dict]]] = {}
    for raw in samples:
        bucket = decoder.bucket(raw)
        item = decoder.decode(raw, bucket) if bucket is not None else None
        if item is None:
            skipped.append({"file_name": f"sample {raw.get('__key__')} of {raw.get('__url__', src)}",
                            "reason": "corrupt sample"})
            continue
        buf = buffers.setdefault(bucket, [])
        buf.append((raw, item))
        if len(buf) == batch_size:
            yield from encoder.batch(buf)
            buf.clear()
    for buf in buffers.values():  # the short batches too: every sample is cached
        if buf:
            yield from encoder.batch(buf)
