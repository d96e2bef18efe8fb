"""``starflow sample``: prompts -> image or video files (one process or under ``torchrun``)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from starflow import assets
from starflow.cli._flags import add_config_flags, add_device_flag, config_overrides
from starflow.config import load_config
from starflow.models.jacobi import JACOBI_BLOCK_SIZE, JACOBI_THRESHOLD

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sample`` to the subcommands."""
    p = sub.add_parser("sample", help="sample images from prompts",
                       description="Sample images. Without --checkpoint_path, samples the shipped demo.")
    add_model_flags(p)
    p.add_argument("--caption", action="append", help="prompt (repeat for several)")
    p.add_argument("--caption_file", default=None,
                   help="text file, one prompt per line; 'prompt<TAB>negative prompt' gives that line its own "
                        "negative prompt")
    p.add_argument("--negative_prompt", default="",
                   help="text the unconditional guidance rows encode instead of the empty prompt: guidance steers "
                        "away from it (needs --cfg > 0; not in the official scripts) [default: '' = plain guidance]")
    p.add_argument("--class_id", type=int, action="append",
                   help="class-conditional models (a .vocab 'text'): sample class K of the vocabulary (repeatable); "
                        "--caption takes the class name instead")
    p.add_argument("--num_samples", type=int, default=None,
                   help="images per prompt. Default as the official sample.py: a single prompt (one --caption or "
                        "--class_id) gives sample_batch_size x world_size images, several prompts (repeated flags, "
                        "a --caption_file, the demo's prompts) one image each")
    add_decoding_flags(p)
    p.add_argument("--output_dir", default="outputs/samples", help="folder for PNGs, grid.png, settings.json")
    p.add_argument("--input_image", default=None,
                   help="video configs: the first frame (any PIL-readable file; resized and centre-cropped): "
                        "image-to-video")
    p.add_argument("--input_video", default=None,
                   help="video configs: a clip (any file av decodes; resized and centre-cropped). A model trained "
                        "with video_to_video turns it into the target clip (the '(v2v) ' prompt; its first vid_size "
                        "frames are used); any other model continues it: the clip's last --context_length latent "
                        "frames are the context, then --target_length new frames follow (the output is the clip and "
                        "its continuation). WAN2.2 latents need 4k+1 input frames")
    p.add_argument("--last_image", default=None,
                   help="video configs trained with last_frame_cond: the end frame (the '(last) ' prompt); with "
                        "--input_image as well, the clip runs from one to the other")
    p.add_argument("--target_length", type=int, default=None,
                   help="video configs: frames to generate [default: the config's vid_size]; longer than trained "
                        "samples window by window; with --input_video (continuation): frames added after the clip")
    p.add_argument("--context_length", type=int, default=None,
                   help="video configs: latent frames carried into each new window [default: min(16, window - 1)]")
    p.add_argument("--gif", action="store_true", help="video configs: also write an animated GIF per sample")
    p.add_argument("--profile", action="store_true",
                   help="print the seconds and sequential flow evaluations per stage: text encoding, each flow "
                        "block, denoising, VAE decoding")
    add_device_flag(p, "cpu, cuda ... [default: cuda if available]")
    add_config_flags(p, skip={"data", "ema", "ema_start", "init_from"})  # training-only keys; --ema is a switch here
    p.set_defaults(func=run)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The model to sample from: ``--checkpoint_path``, ``--model_config_path``, ``--ema``, ``--bf16``, ``--compile``."""
    p.add_argument("--checkpoint_path", default=None, help="model folder or weights file [default: shipped demo]")
    p.add_argument("--model_config_path", default=None, help="YAML config [default: config.yaml beside the weights]")
    p.add_argument("--ema", action="store_true",
                   help="sample with the moving average of the weights (ema.safetensors of a model folder trained "
                        "with config key 'ema')")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (flow arithmetic stays float32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the flow layers (dynamic shapes; the first batch pays the compilation)")


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """Jacobi decoding, size, batch and denoising flags (names as the official ``sample.py``)."""
    p.add_argument("--jacobi", type=int, default=1, help="1: block-wise Jacobi iteration, 0: sequential [default: 1]")
    p.add_argument("--jacobi_th", type=float, default=JACOBI_THRESHOLD,
                   help="Jacobi stopping threshold on the relative squared change of a chunk [default: 1e-4; "
                        "the official scripts use 1e-3]")
    p.add_argument("--jacobi_block_size", type=int, default=JACOBI_BLOCK_SIZE,
                   help="tokens per Jacobi chunk (4x after the first frame of a video) [default: 64; the official "
                        "scripts use 16 for images, 32 for video]")
    p.add_argument("--jacobi_stop", choices=("sample", "batch"), default="sample",
                   help="Jacobi stopping rule: 'sample' stops and freezes each sample on its own change, so an "
                        "image does not depend on its batch or the number of ranks; 'batch' is the official rule "
                        "(change over the whole batch) [default: sample]")
    p.add_argument("--aspect_ratio", default="1:1", help="w:h, e.g. 16:9 [default: 1:1]")
    p.add_argument("--sample_batch_size", type=int, default=16,
                   help="images per forward batch on each process; also the images per process of a single prompt in "
                        "starflow sample without --num_samples (the official sample.py) [default: 16]")
    p.add_argument("--self_denoise", action=argparse.BooleanOptionalAction, default=True,
                   help="remove the training noise with one score step [default: on]")


def load_pipeline(args: argparse.Namespace, dist, demo_allowed: bool = True):
    """``(pipeline, config, checkpoint)`` of ``--checkpoint_path`` (the shipped demo without one, when allowed),
    with the config's keys overridden by their flags, sharded over the ranks with ``fsdp``.

    Raises:
        SystemExit: no checkpoint (and no demo).
    """
    from starflow.sampling.pipeline import Pipeline

    checkpoint = args.checkpoint_path or assets.DEMO_DIR
    config = args.model_config_path
    if config is None:
        folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        config = folder / "config.yaml"
    cfg = load_config(config, config_overrides(args, skip={"ema"}))
    shard = bool(cfg.fsdp) and dist.distributed
    if dist.is_main and shard:
        print(f"fsdp: the flow is sharded over {dist.world_size} ranks (FSDP2); pass --fsdp 0 to replicate it")
    pipe = Pipeline.from_pretrained(checkpoint, config=cfg, device=dist.device,
                                    dtype=torch.bfloat16 if args.bf16 else torch.float32,
                                    asset_dir=Path(config).parent, shard=shard, ema=args.ema)
    if args.compile:
        pipe.model.compile_layers()
    return pipe, cfg, checkpoint


def sample_settings(args: argparse.Namespace, cfg):
    """The :class:`~starflow.sampling.pipeline.SampleSettings` of the decoding flags (video flags if present)."""
    from starflow.sampling.pipeline import SampleSettings

    return SampleSettings(cfg=cfg.cfg, jacobi=bool(args.jacobi), jacobi_th=args.jacobi_th,
                          jacobi_block_size=args.jacobi_block_size, aspect_ratio=args.aspect_ratio,
                          self_denoise=args.self_denoise, jacobi_stop=args.jacobi_stop,
                          target_length=getattr(args, "target_length", None),
                          context_length=getattr(args, "context_length", None))


def read_captions(args: argparse.Namespace, demo: bool, classes: list[str] | None = None,
                  world_size: int = 1) -> list[str]:
    """The prompts of ``--caption_file``, ``--caption`` or ``--class_id`` (the demo prompts for the demo), each
    repeated ``--num_samples`` times; without ``--num_samples``, a single ``--caption``/``--class_id`` is repeated
    ``sample_batch_size x world_size`` times (the official ``sample.py``) and several prompts once each.

    Raises:
        ValueError: ``--num_samples`` below 1, an unknown class, or a caption file without a caption.
    """
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num_samples {args.num_samples}: must be >= 1 (images per prompt)")
    if args.class_id:
        if classes is None:
            raise ValueError("--class_id is for class-conditional models (config 'text' a .vocab file); pass --caption")
        bad = [k for k in args.class_id if not 0 <= k < len(classes)]
        if bad:
            raise ValueError(f"--class_id {bad[0]}: the model has classes 0..{len(classes) - 1} ({classes})")
        captions = [classes[k] for k in args.class_id]
    elif args.caption_file:
        lines = Path(args.caption_file).read_text(encoding="utf-8").splitlines()
        captions = [line.strip() for line in lines if line.strip()]
        if not captions:
            raise ValueError(f"--caption_file {args.caption_file}: no caption in it (one per line)")
    elif args.caption:
        captions = list(args.caption)
    elif demo:
        captions = list(assets.DEMO_PROMPTS)
    else:
        raise SystemExit("no prompt: pass --caption TEXT (repeatable) or --caption_file FILE")
    repeat = args.num_samples
    if repeat is None:
        single = not args.caption_file and len(captions) == 1 and (args.caption or args.class_id)
        repeat = args.sample_batch_size * world_size if single else 1
    return [c for c in captions for _ in range(repeat)]


def read_video_inputs(args: argparse.Namespace, pipe, cfg) -> dict:
    """``--input_image``, ``--input_video`` and ``--last_image`` as pixels at the sampling size, each ``(1, ...)``.

    Raises:
        ValueError: a video input with an image model, or a clip whose frame count the VAE does not accept.
    """
    given = {flag: getattr(args, flag) for flag in ("input_image", "input_video", "last_image") if getattr(args, flag)}
    if given and not cfg.is_video:
        raise ValueError(f"--{next(iter(given))} is for video configs (image-to-video, continuation, video-to-video, "
                         "end frame); this config has no vid_size")
    if not given:
        return {}
    if "last_image" in given and not cfg.last_frame_cond:
        raise ValueError("--last_image needs a model trained with last_frame_cond (its config says 0): the end frame "
                         "conditions only such models")
    from starflow.data import load_image
    from starflow.data.video import load_video

    _, c, h, w = pipe.latent_shape(args.aspect_ratio)
    down = pipe.vae.downsample
    size, channels = (h * down, w * down), cfg.channel_size if down == 1 else 3
    inputs = {}
    for flag, path in given.items():
        if flag != "input_video":
            inputs[flag] = load_image(path, size, channels)[None]
            continue
        clip = load_video(path, size, channels, max_frames=cfg.vid_size[0] if cfg.video_to_video else None)
        t = pipe.vae.temporal_downsample
        if cfg.video_to_video and clip.shape[0] < cfg.vid_size[0]:
            raise ValueError(f"--input_video {path}: {clip.shape[0]} frames; this video_to_video model needs "
                             f"{cfg.vid_size[0]} (vid_size)")
        if (clip.shape[0] - 1) % t:
            keep = 1 + (clip.shape[0] - 1) // t * t
            raise ValueError(f"--input_video {path}: {clip.shape[0]} frames; the VAE encodes {t}k+1 frames "
                             f"(temporal factor {t}): trim the clip to {keep} frames")
        inputs[flag] = clip[None]
    return inputs


def split_negatives(captions: list[str], default: str = "") -> tuple[list[str], list[str]]:
    """``prompt<TAB>negative`` lines -> ``(prompts, negative prompts)``; lines without a tab get ``default``."""
    prompts, negatives = [], []
    for line in captions:
        prompt, tab, negative = line.partition("\t")
        prompts.append(prompt.strip())
        negatives.append(negative.strip() if tab else default)
    return prompts, negatives


def run(args: argparse.Namespace) -> int:
    """Sample every caption into ``--output_dir``, then (rank 0) write ``grid.png`` and ``settings.json``."""
    from starflow.distributed import cleanup_distributed, init_distributed
    from starflow.models.jacobi import DecodeStats
    from starflow.sampling.batch import write_samples
    from starflow.sampling.io import sample_stem, save_poster_grid, write_settings
    from starflow.sampling.pipeline import Profile

    demo = args.checkpoint_path is None
    if demo:
        if not Path(assets.DEMO_DIR).is_dir():
            raise SystemExit(f"the shipped demo is missing ({assets.DEMO_DIR}); pass --checkpoint_path")
        print(f"no --checkpoint_path given: sampling from the shipped demo model ({assets.DEMO_DIR})")
    dist = init_distributed(args.device)
    pipe, cfg, checkpoint = load_pipeline(args, dist)
    captions = read_captions(args, demo, getattr(pipe.text_encoder, "names", None), dist.world_size)
    per_prompt = len(captions) // len(set(captions)) if captions else 1
    captions, negatives = split_negatives(captions, args.negative_prompt)
    settings = sample_settings(args, cfg)
    if any(negatives) and not settings.cfg > 0:
        raise ValueError(f"--negative_prompt / caption-file negatives act through guidance: they need --cfg > 0 "
                         f"(got {settings.cfg:g})")
    inputs = read_video_inputs(args, pipe, cfg)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    profile = Profile()
    shape = write_samples(pipe, captions, settings, out, seed=cfg.seed, batch_size=args.sample_batch_size, dist=dist,
                          gif=args.gif, inputs=inputs, profile=profile, stats=DecodeStats(),
                          negatives=negatives)
    if dist.is_main:
        h, w = shape[-2:]
        frames = shape[1] if len(shape) == 5 else 1
        files = [sample_stem(out, i, c).with_suffix(".png") for i, c in enumerate(captions)]
        save_poster_grid(files, out / "grid.png", (h, w * frames), shape[-3],
                         nrow=per_prompt if 1 < per_prompt <= 16 else None, scale=max(1, 64 // w))
        write_settings(out, {"captions": captions, "checkpoint": str(checkpoint), "settings": vars(settings),
                             "seed": cfg.seed, "world_size": dist.world_size, "config": cfg.to_dict(),
                             "input_image": args.input_image, "input_video": args.input_video,
                             "last_image": args.last_image, "negative_prompts": negatives, "ema": args.ema})
        kind = "videos (MP4 + poster PNG)" if cfg.is_video else "images"
        print(f"wrote {len(captions)} {kind}, grid.png and settings.json to {out}")
        if args.profile:
            print(profile.table())
    cleanup_distributed()
    return 0
