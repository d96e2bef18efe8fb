"""Weights on disk: ``starflow validate``, ``download``, ``convert`` and ``export``."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from starflow.cli._flags import DTYPES, add_config_flags, add_weights_io_flags, at_least, config_overrides, note_once
from starflow.config import check_inactive, load_config

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``validate``, ``download``, ``convert`` and ``export`` to the subcommands."""
    p = sub.add_parser("validate", help="check a config (and a checkpoint) without data or weights",
                       description="Build the model on the meta device and print parameters per block, latent "
                                   "shapes and token counts, and estimated memory in fp32 and bf16. With "
                                   "--checkpoint, compare every parameter name and shape with the file (read "
                                   "memory-mapped, no tensor loaded) and list all mismatches. Exit 0 when valid, "
                                   "1 on a layout mismatch, 2 on a bad config or unreadable file.")
    p.add_argument("config", help="YAML config (official format or plain mapping)")
    p.add_argument("--checkpoint", default=None,
                   help="weights to compare: a .pth/.safetensors file, a model folder, a training checkpoint step "
                        "folder or a run's logdir")
    p.add_argument("--batch", type=at_least(1), default=1,
                   help="samples per device for the memory estimates [default: 1]")
    p.add_argument("--gpus", type=at_least(1), default=1,
                   help="devices the weights and optimizer are sharded over [default: 1]")
    p.add_argument("--txt_dim", type=at_least(1), default=None,
                   help="text encoder width (default: from the encoder's config; 2048 for flan-t5-xl)")
    add_config_flags(p, skip={"data"})
    p.set_defaults(func=validate)

    p = sub.add_parser("download", help="fetch released weights with their T5 and VAE from the Hugging Face Hub",
                       description="Download apple/starflow checkpoints plus the T5 encoder and VAE they need into "
                                   "--local-dir (models in subfolders named like their Hub ids, where sampling "
                                   "looks first). Resumes partial downloads, checks file sizes. Offline it lists "
                                   "the files and where to place them by hand.")
    p.add_argument("release", choices=("t2i", "t2v", "all"), help="t2i: STARFlow 3B, t2v: STARFlow-V 7B, all: both")
    p.add_argument("--local-dir", "--local_dir", dest="local_dir", default="ckpts", help="destination [default: ckpts]")
    p.add_argument("--revision", action="append", type=_repo_revision, default=[], metavar="REPO=REV",
                   help="fetch Hub repository REPO at revision REV (a commit hash, branch or tag), e.g. "
                        "apple/starflow=<commit>; repeat for several repositories [default: each one's newest commit; "
                        "the commits fetched are recorded in LOCAL_DIR/downloads.json]")
    p.set_defaults(func=download)

    p = sub.add_parser("convert", help="convert weights between .pth and .safetensors, keeping every name",
                       description="Convert a checkpoint (.pth/.pt/.bin <-> .safetensors); the suffix of DST picks "
                                   "the format. Torch files are read weights-only and memory-mapped; safetensors "
                                   "holds no pickle.")
    add_weights_io_flags(p, "checkpoint to read", "file to write (.safetensors or .pth)")
    p.set_defaults(func=convert)

    p = sub.add_parser("export", help="write one consolidated weights file from a sharded training checkpoint",
                       description="Read the model of a DCP training checkpoint (any number of shards) and write it "
                                   "in the official layout: a .pth or .safetensors file, or a model folder for "
                                   "starflow sample.")
    add_weights_io_flags(p, "a run's logdir (latest checkpoint), its checkpoints/ folder, or a step_XXXXXXXX folder",
                         "output: a weights file (.safetensors, .pth, .pt or .bin) or a model folder (a name without "
                         "a suffix)")
    p.add_argument("--ema", action="store_true", help="export the moving average of the weights (config 'ema')")
    p.add_argument("--merge_lora", action="store_true",
                   help="a LoRA run: fold its adapters into the base weights (config 'init_from') and write plain "
                        "official-layout weights")
    p.set_defaults(func=export)


def validate(args: argparse.Namespace) -> int:
    """Print the size report (:mod:`starflow.sizing`); with ``--checkpoint``, compare its layout."""
    import torch

    from starflow.checkpoint import compare_layout
    from starflow.models.lora import LORA_MARK
    from starflow.sizing import build_meta_model, format_report, size_report, text_width
    from starflow.train.trainer import check_batch_split, check_training

    cfg = load_config(args.config, config_overrides(args))
    check_inactive(cfg, config_overrides(args), note_once)
    try:  # what train would refuse from the config alone (the data comes with train); the model itself is fine
        check_training(cfg, has_secondary=True)
        check_batch_split(cfg, args.gpus)
        refused = None
    except ValueError as e:
        refused = str(e)
    shapes = None if args.checkpoint is None else _checkpoint_shapes(Path(args.checkpoint))  # (before any report)
    txt_dim = args.txt_dim if args.txt_dim is not None else text_width(cfg, Path(args.config).parent)
    report = size_report(cfg, txt_dim, batch=args.batch, gpus=args.gpus)
    rates = "/".join(str(f) for f in cfg.fps_choices)
    kind = f"video {cfg.vid_size[0]} frames at {rates} fps" if cfg.is_video else "images"
    print(f"config {args.config}: OK ({kind}, {cfg.num_blocks} flow blocks, img_size {cfg.img_size})")
    print(format_report(report, cfg))
    if refused:
        print(f"\nnote: train would refuse this config as it is (sampling takes it): {refused}")
    if shapes is None:
        return 0
    if any(LORA_MARK in k for k in shapes):
        print(f"\ncheckpoint {args.checkpoint} holds a LoRA run's adapters ({len(shapes)} tensors), not a whole model: "
              "the base weights come from the run's init_from; validate the merged weights instead (starflow export "
              "--merge_lora RUN OUT, then --checkpoint OUT)")
        return 1
    model = build_meta_model(cfg, txt_dim)
    layout = compare_layout(model, shapes)
    print("")
    if layout.ok:
        n = sum(1 for _ in model.state_dict())
        print(f"checkpoint {args.checkpoint}: every name and shape matches ({n} tensors, "
              f"{sum(int(torch.Size(s).numel()) for k, s in shapes.items() if k in model.state_dict()):,} parameters)")
        return 0
    print(f"checkpoint {args.checkpoint} does NOT match the config: {layout.describe(limit=10 ** 9)}")
    return 1


def _checkpoint_shapes(path: Path) -> dict:
    """``{name: shape}`` of the weights ``validate --checkpoint`` names: a weights file, a model folder, a training
    checkpoint step folder, or a run's logdir (its latest checkpoint); no tensor is read.

    Raises:
        FileNotFoundError: nothing there, or no weights in the folder.
        CheckpointError: an unreadable file.
    """
    from starflow.checkpoint import read_shapes
    from starflow.train.export import find_checkpoint
    from starflow.train.init_from import read_init_shapes

    if not path.is_dir():
        return read_shapes(path)
    try:
        return read_init_shapes(path)  # a model folder or a step folder
    except FileNotFoundError:
        try:
            return read_init_shapes(find_checkpoint(path))  # a logdir or its checkpoints/
        except FileNotFoundError:
            raise FileNotFoundError(f"--checkpoint {path}: no weights in this folder; pass a weights file, a model "
                                    "folder (model.safetensors), a training checkpoint step folder or a run's "
                                    "logdir") from None


def _repo_revision(text: str) -> tuple[str, str]:
    """``--revision REPO=REV`` as ``(REPO, REV)``."""
    repo, sep, revision = text.partition("=")
    if not (sep and repo.strip() and revision.strip()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected REPO=REV, e.g. apple/starflow=main")
    return repo.strip(), revision.strip()


def download(args: argparse.Namespace) -> int:
    """:func:`starflow.download.download` into ``--local-dir``."""
    from starflow.assets import PACKAGE_CKPTS
    from starflow.download import RELEASES
    from starflow.download import download as fetch

    if Path(args.local_dir).exists() and not Path(args.local_dir).is_dir():
        raise ValueError(f"--local-dir {args.local_dir}: is a file; pass a folder for the weights")
    repos = [repo for repo, _ in args.revision]
    twice = sorted({r for r in repos if repos.count(r) > 1})
    if twice:
        raise ValueError(f"--revision names {twice[0]} more than once: give one revision per repository")
    for path in fetch(args.release, args.local_dir, revisions=dict(args.revision)):
        print(f"ready: {path}")
    scripts = {"t2i": 'scripts/sample_image.sh "a red fox in the snow"',
               "t2v": 'scripts/sample_video.sh "a corgi running on the beach"'}
    for release in RELEASES if args.release == "all" else (args.release,):
        ckpt = Path(args.local_dir) / RELEASES[release][0].patterns[0]
        where = "" if Path(args.local_dir).resolve() == PACKAGE_CKPTS.resolve() else f"CKPT={ckpt} "
        print(f"sample with e.g.: {where}bash {scripts[release]}")
    return 0


def _output(args: argparse.Namespace):
    """``(DST, dtype or None)`` of a weights-writing command; refuses to replace DST without ``--overwrite``."""
    from starflow.files import check_writable

    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst} exists: pass --overwrite to replace it")
    above = next((q for q in dst.parents if q.exists()), None)  # (before any checkpoint is read)
    if above is not None and not above.is_dir():
        raise ValueError(f"DST {dst}: {above} is a file, so {dst} cannot be made there; pass another place")
    check_writable(dst, "DST")
    return dst, DTYPES[args.dtype] if args.dtype else None


def convert(args: argparse.Namespace) -> int:
    """:func:`starflow.checkpoint.convert_checkpoint`, then check that names and shapes survived."""
    from starflow.checkpoint import convert_checkpoint, read_shapes

    if Path(args.dst).is_dir():  # (before --overwrite is asked for: it would not help)
        raise IsADirectoryError(f"{args.dst} is a folder: DST names the weights file to write (e.g. "
                                f"{Path(args.dst) / 'model.safetensors'})")
    src, (dst, dtype) = Path(args.src), _output(args)
    convert_checkpoint(src, dst, dtype=dtype)
    with warnings.catch_warnings():  # what reading src warns about was said once already
        warnings.simplefilter("ignore")
        before = read_shapes(src)
    after = read_shapes(dst)
    if before != after:  # names and shapes must survive the conversion
        raise RuntimeError(f"conversion changed the layout of {src}; {dst} is not usable")
    print(f"wrote {dst} ({len(after)} tensors, {dst.stat().st_size / 2**20:.1f} MiB; names and shapes as read from {src})")
    return 0


def export(args: argparse.Namespace) -> int:
    """:func:`starflow.train.export.export_checkpoint` of a run's (latest) checkpoint."""
    from starflow.checkpoint import read_shapes
    from starflow.train.export import export_checkpoint, find_checkpoint

    src, (dst, dtype) = find_checkpoint(args.src), _output(args)
    step, target = src.resolve(), dst.resolve()
    if target in (Path(args.src).resolve(), step, *step.parents[:2]) or step.parent in target.parents:
        raise ValueError(f"DST {dst}: that is the run or a folder of its checkpoints ({src}), whose files the export "
                         "would replace: export to a folder of its own (e.g. models/NAME)")
    export_checkpoint(src, dst, dtype=dtype, ema=args.ema, merge_lora=args.merge_lora)
    weights = dst if dst.is_file() else dst / "model.safetensors"
    print(f"wrote {dst} from {src}{' (EMA weights)' if args.ema else ''} ({len(read_shapes(weights))} tensors, "
          f"{weights.stat().st_size / 2**20:.1f} MiB, official layout)")
    return 0
