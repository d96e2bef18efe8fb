"""Command line: ``starflow {train,sample,validate,download,convert,export,eval-nll}``.

Every config key is also a flag (``--img_size 256``); precedence is CLI > YAML > defaults, the same for
training and sampling. ``starflow <command> --help`` documents each flag with its default and unit.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

from starflow.config import _FIELDS, config_field_help, load_config

__all__ = ["main", "DEMO_DIR", "DEMO_PROMPTS"]

DEMO_DIR = Path(__file__).resolve().parents[1] / "ckpts" / "demo_digits"
DEMO_PROMPTS = [f"a handwritten digit {d}" for d in range(10)]


def _add_config_flags(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    group = parser.add_argument_group("config overrides (any key of the YAML config; CLI > YAML > defaults)")
    for name in _FIELDS:
        if name in skip:
            continue
        group.add_argument(f"--{name}", default=None, metavar="V",
                           help=f"{config_field_help(name)} [default: {_FIELDS[name].default}]")


def _overrides(args: argparse.Namespace, skip: set[str] = frozenset()) -> dict:
    return {k: getattr(args, k) for k in _FIELDS if k not in skip and getattr(args, k, None) is not None}


# ---------------------------------------------------------------------- train
def _train(args: argparse.Namespace) -> int:
    from starflow.adapters import build_latent_adapter
    from starflow.models import STARFlow
    from starflow.sampling.pipeline import build_text_encoder, resolve_asset
    from starflow.train.distributed import cleanup_distributed, init_distributed
    from starflow.train.trainer import Trainer, TrainingDiverged, build_dataset

    cfg = load_config(args.config, _overrides(args))
    if cfg.data is None:
        raise SystemExit("no training data: pass --data FOLDER (an image folder with metadata.jsonl; "
                         "`python scripts/prepare_digits.py` makes one)")
    dist = init_distributed(args.device)
    torch.manual_seed(cfg.seed + dist.rank)
    base = Path(args.config).parent
    vae = build_latent_adapter(resolve_asset(cfg.vae, base), channels=cfg.channel_size, device=dist.device)
    text_encoder = build_text_encoder(cfg, base, dist.device)
    dataset = build_dataset(cfg, vae, dist)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = STARFlow.from_config(cfg, txt_dim=text_encoder.hidden_size if text_encoder else None,
                                 vae_downsample=vae.downsample).to(dist.device)
    torch.manual_seed(cfg.seed + dist.rank)
    trainer = Trainer(cfg, dist, model, text_encoder, vae, dataset, Path(cfg.logdir))
    if dist.is_main:
        n = sum(p.numel() for p in model.parameters())
        size = f"{len(dataset)} training {'videos' if cfg.is_video else 'images'}" if hasattr(dataset, "__len__") \
            else f"shards in {cfg.data}"
        print(f"STARFlow: {n:,} parameters, {size}, {dist.world_size} process(es) on {dist.device}; logdir {cfg.logdir}")
    if not args.dry_run and args.resume:
        trainer.resume()
    try:
        history = trainer.fit(dry_run=args.dry_run)
    except TrainingDiverged as e:
        if dist.is_main:
            print(f"error: {e}", file=sys.stderr)
        cleanup_distributed()
        return 3
    if args.dry_run:
        m = history[-1]
        if dist.is_main:
            print(f"dry run OK: one step, loss {m['loss']:.4f}, bits/dim {m['bits_per_dim']:.4f}, "
                  f"grad norm {m['grad_norm']:.3g}")
    else:
        folder = trainer.export(Path(cfg.logdir) / "model")
        if folder is not None:
            print(f"model folder written to {folder} (sample with: starflow sample --checkpoint_path {folder})")
    cleanup_distributed()
    return 0


# ---------------------------------------------------------------------- sample
def _read_captions(args: argparse.Namespace, demo: bool) -> list[str]:
    if args.caption_file:
        lines = Path(args.caption_file).read_text(encoding="utf-8").splitlines()
        captions = [line.strip() for line in lines if line.strip()]
    elif args.caption:
        captions = list(args.caption)
    elif demo:
        captions = list(DEMO_PROMPTS)
    else:
        raise SystemExit("no prompt: pass --caption TEXT (repeatable) or --caption_file FILE")
    return [c for c in captions for _ in range(args.num_samples)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:48] or "empty"


def _save_sample(sample: torch.Tensor, stem: Path, cfg, gif: bool) -> None:
    """An image as ``stem.png``; a video ``(T, C, H, W)`` as ``stem.mp4`` (H.264) plus a poster ``stem.png``
    (the frames side by side) and, with ``gif``, an animated ``stem.gif``."""
    from starflow.sampling.io import save_image

    if sample.dim() == 3:
        save_image(sample, stem.with_suffix(".png"))
        return
    from starflow.data.video import write_gif, write_video

    fps = cfg.vid_size[1]
    write_video(stem.with_suffix(".mp4"), sample, fps)
    save_image(torch.cat(list(sample), dim=-1), stem.with_suffix(".png"))
    if gif:
        write_gif(stem.with_suffix(".gif"), sample, fps, scale=max(1, 128 // sample.shape[-1]))


def _sample(args: argparse.Namespace) -> int:
    from starflow.sampling.io import save_grid
    from starflow.sampling.jacobi import DecodeStats
    from starflow.sampling.pipeline import Pipeline, Profile, SampleSettings
    from starflow.train.distributed import cleanup_distributed, init_distributed

    demo = args.checkpoint_path is None
    checkpoint = args.checkpoint_path or DEMO_DIR
    if demo:
        if not Path(checkpoint).is_dir():
            raise SystemExit(f"the shipped demo is missing ({DEMO_DIR}); pass --checkpoint_path")
        print(f"no --checkpoint_path given: sampling from the shipped demo model ({DEMO_DIR})")
    dist = init_distributed(args.device)
    config = args.model_config_path
    if config is None:
        folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        config = folder / "config.yaml"
    cfg = load_config(config, _overrides(args))
    shard = bool(cfg.fsdp) and dist.distributed
    if dist.is_main and shard:
        print(f"fsdp: the flow is sharded over {dist.world_size} ranks (FSDP2); pass --fsdp 0 to replicate it")
    pipe = Pipeline.from_pretrained(checkpoint, config=cfg, device=dist.device,
                                    dtype=torch.bfloat16 if args.bf16 else torch.float32,
                                    asset_dir=Path(config).parent, shard=shard)
    if args.compile:
        pipe.model.compile_layers()
    captions = _read_captions(args, demo)
    settings = SampleSettings(cfg=cfg.cfg, jacobi=bool(args.jacobi), jacobi_th=args.jacobi_th,
                              jacobi_block_size=args.jacobi_block_size, aspect_ratio=args.aspect_ratio,
                              self_denoise=args.self_denoise, jacobi_stop=args.jacobi_stop,
                              target_length=args.target_length, context_length=args.context_length)
    image = None
    if args.input_image:
        if not cfg.is_video:
            raise ValueError("--input_image is for video configs (image-to-video); this config has no vid_size")
        from starflow.data import load_image

        _, c, h, w = pipe.latent_shape(args.aspect_ratio)
        down = pipe.vae.downsample
        image = load_image(args.input_image, (h * down, w * down), cfg.channel_size if down == 1 else 3)[None]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Captions split across ranks round-robin; every rank runs the same number of batches (the last ones
    # padded with a repeat whose sample is dropped), as sharded weights need all ranks in every step.
    per_rank = -(-len(captions) // dist.world_size)
    mine = list(range(dist.rank, len(captions), dist.world_size))
    mine += [None] * (per_rank - len(mine))
    profile, stats = Profile(), DecodeStats()
    from tqdm.auto import tqdm

    for start in tqdm(range(0, per_rank, args.sample_batch_size), disable=not dist.is_main, desc="sample"):
        idx = mine[start : start + args.sample_batch_size]
        real = [0 if i is None else i for i in idx]
        pixels = pipe([captions[i] for i in real], settings, seeds=[cfg.seed + i for i in real],
                      profile=profile, stats=stats,
                      input_image=None if image is None else image.expand(len(real), -1, -1, -1))
        for i, sample in zip(idx, pixels):
            if i is not None:
                _save_sample(sample, out / f"{i:05d}_{_slug(captions[i])}", cfg, args.gif)
    if dist.distributed:
        torch.distributed.barrier()
    if dist.is_main:
        from starflow.data import load_image

        h, w = pixels.shape[-2:]
        frames = pixels.shape[1] if pixels.dim() == 5 else 1
        files = [out / f"{i:05d}_{_slug(c)}.png" for i, c in enumerate(captions)]
        posters = torch.stack([load_image(f, (h, w * frames), pixels.shape[-3]) for f in files])
        save_grid(posters, out / "grid.png", nrow=args.num_samples if args.num_samples > 1 else None,
                  scale=max(1, 64 // w))
        record = {"captions": captions, "checkpoint": str(checkpoint), "settings": vars(settings),
                  "seed": cfg.seed, "world_size": dist.world_size, "config": cfg.to_dict(),
                  "input_image": args.input_image}
        (out / "settings.json").write_text(json.dumps(record, indent=1))
        kind = "videos (MP4 + poster PNG)" if cfg.is_video else "images"
        print(f"wrote {len(captions)} {kind}, grid.png and settings.json to {out}")
        if args.profile:
            print(profile.table())
    cleanup_distributed()
    return 0


# ---------------------------------------------------------------------- eval-nll
def _eval_nll(args: argparse.Namespace) -> int:
    from starflow.evaluation import evaluate_nll
    from starflow.sampling.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.checkpoint_path or DEMO_DIR, config=args.model_config_path,
                                    device=args.device or "cpu")
    r = evaluate_nll(pipe, args.data, args.batch_size, args.noise_samples, args.seed)
    space = "latents" if pipe.vae.downsample > 1 else "pixels"
    print(f"images: {r.images} x {args.noise_samples} noise draws from {args.data}")
    print(f"NLL of the noised {space}: {r.nats_per_dim:.4f} nats/dim = {r.bits_per_dim:.4f} bits/dim (data in [-1, 1])")
    if r.pixel_bits_per_dim is not None:
        print(f"bits/dim on the 8-bit pixel scale: {r.pixel_bits_per_dim:.4f} (adds log2(127.5) for [-1, 1] -> [0, 255])")
    print(f"Noise: the flow models x + {pipe.config.noise_std} * N(0, I) (the training noise_std); this is the exact "
          "density of that noised data, averaged over the noise draws, not a bound on the clean data.")
    return 0


# ---------------------------------------------------------------------- validate
def _validate(args: argparse.Namespace) -> int:
    from starflow.checkpoint import compare_layout, read_shapes
    from starflow.models import STARFlow
    from starflow.config import infer_vae_downsample
    from starflow.sizing import format_report, size_report, text_width

    cfg = load_config(args.config, _overrides(args))
    txt_dim = args.txt_dim or text_width(cfg, Path(args.config).parent)
    report = size_report(cfg, txt_dim, batch=args.batch, gpus=args.gpus)
    print(f"config {args.config}: OK ({'video ' + str(cfg.vid_size[0]) + ' frames at ' + str(cfg.vid_size[1]) + ' fps' if cfg.is_video else 'images'}, "
          f"{cfg.num_blocks} flow blocks, img_size {cfg.img_size})")
    print(format_report(report, cfg))
    if args.checkpoint is None:
        return 0
    shapes = read_shapes(args.checkpoint)
    with torch.device("meta"):
        model = STARFlow.from_config(cfg, txt_dim=txt_dim, vae_downsample=infer_vae_downsample(cfg.vae))
    layout = compare_layout(model, shapes)
    print("")
    if layout.ok:
        n = sum(1 for _ in model.state_dict())
        print(f"checkpoint {args.checkpoint}: every name and shape matches ({n} tensors, "
              f"{sum(int(torch.Size(s).numel()) for k, s in shapes.items() if k in model.state_dict()):,} parameters)")
        return 0
    print(f"checkpoint {args.checkpoint} does NOT match the config: {layout.describe(limit=10 ** 9)}")
    return 1


# ---------------------------------------------------------------------- download, convert
def _download(args: argparse.Namespace) -> int:
    from starflow.download import download

    for path in download(args.release, args.local_dir):
        print(f"ready: {path}")
    print(f"sample with e.g.: bash scripts/sample_image.sh \"a cat\"  (checkpoints are looked up in {args.local_dir})")
    return 0


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _convert(args: argparse.Namespace) -> int:
    from starflow.checkpoint import convert_checkpoint, read_shapes

    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst} exists: pass --overwrite to replace it")
    convert_checkpoint(src, dst, dtype=_DTYPES[args.dtype] if args.dtype else None)
    before, after = read_shapes(src), read_shapes(dst)
    if before != after:  # names and shapes must survive the conversion
        raise RuntimeError(f"conversion changed the layout of {src}; {dst} is not usable")
    print(f"wrote {dst} ({len(after)} tensors, {dst.stat().st_size / 2**20:.1f} MiB; names and shapes as in {src})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from starflow.checkpoint import read_shapes
    from starflow.train.export import export_checkpoint, find_checkpoint

    src, dst = find_checkpoint(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst} exists: pass --overwrite to replace it")
    export_checkpoint(src, dst, dtype=_DTYPES[args.dtype] if args.dtype else None)
    weights = dst if dst.is_file() else dst / "model.safetensors"
    print(f"wrote {dst} from {src} ({len(read_shapes(weights))} tensors, {weights.stat().st_size / 2**20:.1f} MiB, "
          "official layout)")
    return 0


# ---------------------------------------------------------------------- parser
def _add_output_flags(p: argparse.ArgumentParser, dst_help: str) -> None:
    """DST, --dtype and --overwrite of the commands that write weights."""
    p.add_argument("dst", help=dst_help)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast floating tensors [default: keep]")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="starflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a STARFlow (single process or under torchrun)",
                       description="Train on an image folder with metadata.jsonl. Resumes from the latest "
                                   "checkpoint in --logdir unless --no-resume.")
    p.add_argument("--config", required=True, help="YAML config (official format or plain mapping)")
    p.add_argument("--dry_run", action="store_true", help="build everything, run one step, exit")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the latest checkpoint in logdir [default: on]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available]")
    _add_config_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="sample images from prompts",
                       description="Sample images. Without --checkpoint_path, samples the shipped demo.")
    p.add_argument("--checkpoint_path", default=None, help="model folder or weights file [default: shipped demo]")
    p.add_argument("--model_config_path", default=None, help="YAML config [default: config.yaml beside the weights]")
    p.add_argument("--caption", action="append", help="prompt (repeat for several)")
    p.add_argument("--caption_file", default=None, help="text file, one prompt per line")
    p.add_argument("--num_samples", type=int, default=1, help="images per prompt [default: 1]")
    p.add_argument("--jacobi", type=int, default=1, help="1: block-wise Jacobi iteration, 0: sequential [default: 1]")
    p.add_argument("--jacobi_th", type=float, default=1e-4,
                   help="Jacobi stopping threshold on the relative squared change of a chunk [default: 1e-4; "
                        "the official scripts use 1e-3]")
    p.add_argument("--jacobi_block_size", type=int, default=64,
                   help="tokens per Jacobi chunk (4x after the first frame of a video) [default: 64; the official "
                        "scripts use 16 for images, 32 for video]")
    p.add_argument("--jacobi_stop", choices=("sample", "batch"), default="sample",
                   help="Jacobi stopping rule: 'sample' stops and freezes each sample on its own change, so an "
                        "image does not depend on its batch or the number of ranks; 'batch' is the official rule "
                        "(change over the whole batch) [default: sample]")
    p.add_argument("--aspect_ratio", default="1:1", help="w:h, e.g. 16:9 [default: 1:1]")
    p.add_argument("--sample_batch_size", type=int, default=16, help="images per forward batch [default: 16]")
    p.add_argument("--output_dir", default="outputs/samples", help="folder for PNGs, grid.png, settings.json")
    p.add_argument("--self_denoise", action=argparse.BooleanOptionalAction, default=True,
                   help="remove the training noise with one score step [default: on]")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (flow arithmetic stays float32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the flow layers (dynamic shapes; the first batch pays the compilation)")
    p.add_argument("--input_image", default=None,
                   help="video configs: the first frame (any PIL-readable file; resized and centre-cropped): "
                        "image-to-video")
    p.add_argument("--target_length", type=int, default=None,
                   help="video configs: frames to generate [default: the config's vid_size]; longer than trained "
                        "samples window by window")
    p.add_argument("--context_length", type=int, default=None,
                   help="video configs: latent frames carried into each new window [default: min(16, window - 1)]")
    p.add_argument("--gif", action="store_true", help="video configs: also write an animated GIF per sample")
    p.add_argument("--profile", action="store_true",
                   help="print the seconds and sequential flow evaluations per stage: text encoding, each flow "
                        "block, denoising, VAE decoding")
    p.add_argument("--device", default=None, help="cpu, cuda ... [default: cuda if available]")
    _add_config_flags(p, skip={"data"})
    p.set_defaults(func=_sample)

    p = sub.add_parser("validate", help="check a config (and a checkpoint) without data or weights",
                       description="Build the model on the meta device and print parameters per block, latent "
                                   "shapes and token counts, and estimated memory in fp32 and bf16. With "
                                   "--checkpoint, compare every parameter name and shape with the file (read "
                                   "memory-mapped, no tensor loaded) and list all mismatches. Exit 0 when valid, "
                                   "1 on a layout mismatch, 2 on a bad config or unreadable file.")
    p.add_argument("config", help="YAML config (official format or plain mapping)")
    p.add_argument("--checkpoint", default=None, help="weights file (.pth or .safetensors) to compare")
    p.add_argument("--batch", type=int, default=1, help="samples per device for the memory estimates [default: 1]")
    p.add_argument("--gpus", type=int, default=1, help="devices the weights and optimizer are sharded over [default: 1]")
    p.add_argument("--txt_dim", type=int, default=None,
                   help="text encoder width (default: from the encoder's config; 2048 for flan-t5-xl)")
    _add_config_flags(p, skip={"data"})
    p.set_defaults(func=_validate)

    p = sub.add_parser("download", help="fetch released weights with their T5 and VAE from the Hugging Face Hub",
                       description="Download apple/starflow checkpoints plus the T5 encoder and VAE they need into "
                                   "--local-dir (models in subfolders named like their Hub ids, where sampling "
                                   "looks first). Resumes partial downloads, checks file sizes. Offline it lists "
                                   "the files and where to place them by hand.")
    p.add_argument("release", choices=("t2i", "t2v", "all"), help="t2i: STARFlow 3B, t2v: STARFlow-V 7B, all: both")
    p.add_argument("--local-dir", "--local_dir", dest="local_dir", default="ckpts", help="destination [default: ckpts]")
    p.set_defaults(func=_download)

    p = sub.add_parser("convert", help="convert weights between .pth and .safetensors, keeping every name",
                       description="Convert a checkpoint (.pth/.pt/.bin <-> .safetensors); the suffix of DST picks "
                                   "the format. Torch files are read weights-only and memory-mapped; safetensors "
                                   "holds no pickle.")
    p.add_argument("src", help="checkpoint to read")
    _add_output_flags(p, "file to write (.safetensors or .pth)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="write one consolidated weights file from a sharded training checkpoint",
                       description="Read the model of a DCP training checkpoint (any number of shards) and write it "
                                   "in the official layout: a .pth or .safetensors file, or a model folder for "
                                   "starflow sample.")
    p.add_argument("src", help="a run's logdir (latest checkpoint), its checkpoints/ folder, or a step_XXXXXXXX folder")
    _add_output_flags(p, "output: model.pth, model.safetensors, or a folder")
    p.set_defaults(func=_export)

    p = sub.add_parser("eval-nll", help="exact bits/dim of a model on an image folder")
    p.add_argument("--checkpoint_path", default=None, help="model folder or weights [default: shipped demo]")
    p.add_argument("--model_config_path", default=None, help="YAML config [default: config.yaml beside the weights]")
    p.add_argument("--data", required=True, help="image folder with metadata.jsonl")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--noise_samples", type=int, default=1, help="noise draws per image [default: 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_eval_nll)

    from starflow.data.shards import add_cli as add_data_cli
    add_data_cli(sub)  # pack, cache-latents
    return parser


def main(argv: list[str] | None = None) -> int:
    from starflow.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, CheckpointError) as e:
        if os.environ.get("STARFLOW_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
