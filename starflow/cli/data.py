"""``starflow pack`` and ``starflow cache-latents``: captioned folders -> webdataset shards / latent caches."""
from __future__ import annotations

import argparse
from pathlib import Path

from starflow.cli._flags import add_config_flags, add_device_flag, at_least, config_overrides
from starflow.config import CONFIG_FIELDS, TRAINING_KEYS
from starflow.data.latent_cache import CACHE_KEYS

__all__ = ["register"]

_STORAGE_DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pack`` and ``cache-latents`` to the subcommands."""
    p = sub.add_parser("pack", help="pack an image or video folder into webdataset tar shards",
                       description="Pack a folder with metadata.jsonl into OUT/shard-*.tar and OUT/index.json. "
                                   "Missing or undecodable files are skipped and listed in the index.")
    p.add_argument("src", help="image or video folder with metadata.jsonl")
    p.add_argument("out", help="output folder")
    p.add_argument("--shard_size", type=at_least(1), default=1000, help="samples per shard [default: 1000]")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards already in OUT (a run that fails keeps them; a set that a killed run left "
                        "half-replaced is replaced anyway)")
    p.set_defaults(func=pack)

    p = sub.add_parser("cache-latents", help="encode a dataset once with the config's VAE and text encoder",
                       description="Write VAE latents and T5 embeddings of every sample of --data (a folder with "
                                   "metadata.jsonl or a shard folder) to --out as shards, with the settings they "
                                   "depend on; training checks them against its config. A VAE's latents are its "
                                   "posterior mean (training from the images draws from the posterior, seeded per "
                                   "sample). A stopped run keeps its full shards in OUT/.staging-resume: the same "
                                   "command resumes from them (other data, settings, --dtype or --shard_size start "
                                   "afresh).")
    p.add_argument("--config", required=True, help="training config (YAML)")
    p.add_argument("--data", required=True, help="image/video folder with metadata.jsonl, or a shard folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch", type=at_least(1), default=16, help="samples per encoder batch [default: 16]")
    p.add_argument("--shard_size", type=at_least(1), default=1000, help="samples per shard [default: 1000]")
    p.add_argument("--dtype", choices=_STORAGE_DTYPES, default="float32",
                   help="storage dtype of latents and embeddings [default: float32]")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a cache already in --out (a run that fails keeps it; a cache that a killed run left "
                        "half-replaced is replaced anyway)")
    add_device_flag(p, "cpu, cuda ... [default: cuda if available]")
    add_config_flags(p, skip={"data"}, reject={k: None if k in TRAINING_KEYS else
                                               "it reads only the keys the encoded data depends on: sizes, VAE, text "
                                               "encoder, prompt conditioning"
                                               for k in set(CONFIG_FIELDS) - CACHE_KEYS - {"data"}})
    p.set_defaults(func=cache)


def _check_out_folder(flag: str, path: str) -> None:
    """The shard folder a command writes must not be a file (one process writes it: ``SINGLE_PROCESS`` in
    :mod:`starflow.cli`).

    Raises:
        ValueError: ``path`` is an existing file.
        OSError: ``path`` cannot be written (checked before any work: a model loads first in ``cache-latents``).
    """
    from starflow.files import check_writable

    if Path(path).is_file():
        raise ValueError(f"{flag} {path}: is a file; pass a folder for the shards")
    check_writable(path, flag)


def pack(args: argparse.Namespace) -> int:
    """``starflow pack SRC OUT``: :func:`starflow.data.pack_folder`."""
    from starflow.data.shards import pack_folder

    _check_out_folder("OUT", args.out)
    index = pack_folder(args.src, args.out, shard_size=args.shard_size, overwrite=args.overwrite)
    few = ", ".join(s["file_name"] for s in index["skipped"][:3])
    print(f"packed {index['total']} {index['kind']}s into {len(index['shards'])} shards in {args.out}; "
          f"skipped {len(index['skipped'])}" + (f" (e.g. {few})" if few else ""))
    return 0


def cache(args: argparse.Namespace) -> int:
    """``starflow cache-latents``: :func:`starflow.data.cache_latents` with the config's VAE and text encoder."""
    import torch

    from starflow.adapters import build_text_encoder, build_vae
    from starflow.config import load_config
    from starflow.data.latent_cache import cache_latents, check_cache_inputs
    from starflow.distributed import pick_device
    from starflow.train.trainer import check_drop_image

    _check_out_folder("--out", args.out)
    cfg = load_config(args.config, config_overrides(args, skip={"data"}))
    check_drop_image(cfg)  # (training refuses it on images: no run could read the cache)
    check_cache_inputs(args.data, args.out, cfg, args.overwrite)  # (before the VAE and the text encoder load)
    device = pick_device(args.device)
    base = Path(args.config).parent
    vae = build_vae(cfg, base, device=device)
    text_encoder = build_text_encoder(cfg, base, device=device)
    index = cache_latents(args.data, args.out, cfg, vae, text_encoder, batch_size=args.batch,
                          dtype=getattr(torch, args.dtype), shard_size=args.shard_size, overwrite=args.overwrite)
    if cfg.is_video:
        print(f"note: each video is cached as its first {cfg.vid_size[0]}-frame clip; training from the videos "
              "themselves draws a clip at a random start each epoch")
    lost = sum(s.get("count", 1) for s in index["skipped"])
    few = ", ".join(f"{s['file_name']} ({s['reason']})" for s in index["skipped"][:3])
    print(f"cached {index['total']} latents into {len(index['shards'])} shards in {args.out}; "
          f"skipped {lost}" + (f" (e.g. {few})" if few else "") + f"; train with --data {args.out}")
    return 0
