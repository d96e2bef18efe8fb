"""Evaluation commands: ``starflow eval-nll`` (exact bits/dim of a model on an image folder) and
``starflow generate-set`` (a resumable sample set for metrics, over ranks) and ``starflow evaluate`` (FID, KID,
precision/recall, CLIP score of a set)."""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

from starflow import assets
from starflow.cli._flags import (SAMPLING_REJECT, SAMPLING_SKIP, add_config_flags, add_device_flag, at_least,
                                 check_input_files, check_output_path, note_once, read_text_lines)
from starflow.cli.sample import (add_decoding_flags, add_model_flags, check_checkpoint_path, check_class_names,
                                 check_no_prompt, config_classes, load_pipeline, model_config_path, sample_settings,
                                 sampling_config)

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval-nll`` to the subcommands."""
    p = sub.add_parser("eval-nll", help="exact bits/dim of a model on an image folder",
                       description="The model's exact negative log-likelihood, in bits per dimension, of the images of a "
                                   "folder with metadata.jsonl (pixels, or VAE latents: the posterior mean) plus the training noise "
                                   "(Gaussian with std noise_std, or U[0, 1) dequantisation of 8-bit pixels for "
                                   "noise_type uniform), averaged over --noise_samples noise draws per image: "
                                   "a statement about the noised data, not a bound on the clean data.")
    p.add_argument("--checkpoint_path", default=None, help="model folder or weights [default: shipped demo]")
    p.add_argument("--model_config_path", default=None, help="YAML config [default: config.yaml beside the weights]")
    p.add_argument("--data", required=True, help="image folder with metadata.jsonl")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass [default: 256]")
    p.add_argument("--noise_samples", type=int, default=1, help="noise draws per image [default: 1]")
    p.add_argument("--num_samples", type=int, default=None, help="evaluate the first N images [default: all]")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws [default: 0]")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="also write the result, with the checkpoint, data, seed and noise it was measured with, as "
                        "JSON [default: printed only]")
    add_device_flag(p, "cpu, cuda ... [default: cuda if available]")
    p.set_defaults(func=eval_nll)

    p = sub.add_parser("generate-set", help="sample a resumable set of N images for metrics (FID, CLIP score)",
                       description="Sample --num_samples images into --out as {index:06d}.png with captions.jsonl "
                                   "and set.json; image i uses caption i (the captions cycle) and its own seed, a hash of "
                                   "--seed and i (sets of different seeds share no noise), and "
                                   "every batch is padded to --sample_batch_size, so the set does not depend on the "
                                   "process count or on resuming (with --jacobi_block_size auto, the default, "
                                   "--sample_batch_size picks the Jacobi chunks, and a set continues only with its "
                                   "own). Under torchrun the "
                                   "indices are split over the ranks. Re-running the same command skips the "
                                   "images already there (a killed run resumes); with a larger --num_samples (the "
                                   "same captions, cycled) it grows the set, its images kept.")
    add_model_flags(p)
    what = p.add_mutually_exclusive_group()  # (one of them, unless the model is unconditional: set_captions)
    what.add_argument("--caption_file", default=None, help="text file, one caption per line (cycled to N)")
    what.add_argument("--caption", action="append", help="caption (repeatable; cycled to N)")
    what.add_argument("--class_names", action="store_true",
                      help="class-conditional models: cycle through the classes of the vocabulary")
    p.add_argument("--num_samples", type=int, required=True, help="images in the set, N")
    p.add_argument("--out", required=True, help="the set's folder")
    add_decoding_flags(p, "generate-set")
    add_device_flag(p, "cpu, cuda ... [default: cuda if available]")
    add_config_flags(p, skip=SAMPLING_SKIP, reject=SAMPLING_REJECT)
    p.set_defaults(func=generate_set)

    p = sub.add_parser("evaluate", help="FID, KID, precision/recall and CLIP score of a sample set",
                       description="Compare a folder of samples with real images (a folder, or the .npz statistics "
                                   "of one written by --save_stats) and/or score them against their captions "
                                   "(captions.jsonl of generate-set). FID and KID come from torchmetrics, the CLIP "
                                   "score from a transformers CLIP model. Prints a table and writes metrics.json.")
    p.add_argument("--samples", required=True, help="folder of sample images (a generate-set folder)")
    p.add_argument("--reference", default=None, help="folder of real images, or reference statistics (.npz)")
    p.add_argument("--metrics", default="fid", help="comma-separated: fid,kid,precision_recall,clip [default: fid]")
    p.add_argument("--features", default=None, choices=("inception", "digits"),
                   help="feature extractor of fid, kid and precision_recall: 'inception' (InceptionV3 pool, standard "
                        "FID; needs torch-fidelity) or 'digits' (the shipped digit classifier, for the digit demos) "
                        "[default: inception]")
    p.add_argument("--save_stats", default=None, metavar="FILE.npz",
                   help="write the reference folder's statistics, to pass as --reference next time")
    p.add_argument("--clip_model", default=None,
                   help="transformers CLIP id or folder of the clip metric [default: openai/clip-vit-large-patch14]")
    p.add_argument("--batch_size", type=at_least(1), default=256,
                   help="images per feature (and CLIP) batch [default: 256]")
    p.add_argument("--out", default=None, help="metrics file [default: SAMPLES/metrics.json]")
    add_device_flag(p, "cpu, cuda ... [default: cuda if available]")
    p.set_defaults(func=evaluate)


def eval_nll(args: argparse.Namespace) -> int:
    """:func:`starflow.evaluation.evaluate_nll` of a model folder on ``--data``."""
    import json
    from dataclasses import asdict

    from starflow.data.images import read_metadata
    from starflow.data.video import VIDEO_SUFFIXES
    from starflow.files import check_file_target, write_text_atomic
    from starflow.distributed import cleanup_distributed, init_distributed
    from starflow.evaluation import evaluate_nll
    from starflow.sampling.pipeline import Pipeline

    for flag in ("batch_size", "num_samples", "noise_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} {value}: must be >= 1")
    root = Path(args.data)  # checked before the weights load
    if not (root / "metadata.jsonl").is_file():
        what = ("no metadata.jsonl in it" if root.is_dir() else "a file, not a folder" if root.exists()
                else "no such folder")
        raise FileNotFoundError(f"--data {root}: {what}; eval-nll reads an image folder with metadata.jsonl (python "
                                "scripts/prepare_digits.py writes two)")
    videos = [r["file_name"] for r in read_metadata(root) if Path(r["file_name"]).suffix.lower() in VIDEO_SUFFIXES]
    if videos:
        raise ValueError(f"--data {root} lists videos ({videos[0]}, ...): eval-nll scores the images of a folder (a "
                         "video model scores them as one-frame clips), not clips; pass an image folder")
    out = check_file_target(args.out, "--out") if args.out else None
    checkpoint = args.checkpoint_path or str(assets.shipped(assets.DEMO_DIR))
    dist = init_distributed(args.device)
    pipe = Pipeline.from_pretrained(checkpoint, config=args.model_config_path, device=dist.device)
    r = evaluate_nll(pipe, args.data, args.batch_size, args.noise_samples, args.seed, num_samples=args.num_samples,
                     rank=dist.rank, world_size=dist.world_size)
    cleanup_distributed()
    if not dist.is_main:
        return 0
    space = "latents" if pipe.vae.downsample > 1 else "pixels"
    print(f"checkpoint: {checkpoint}; images: {r.images} x {args.noise_samples} noise draws (seed {args.seed}) from "
          f"{args.data} ({dist.world_size} process(es))")
    if r.resized:
        side = pipe.config.img_size
        print(f"note: {r.resized} of the {r.images} images are not {side}x{side} pixels, the model's size: each was "
              "resized and centre-cropped to it, so the bits/dim below are those of the resized images, not of the "
              "files ('resized' in --out)")
    if args.num_samples and args.num_samples > r.images:
        print(f"note: --num_samples {args.num_samples}: {args.data} lists {r.images} images; all of them were scored")
    spread = (f"± {r.bits_per_dim_ci95:.4f} bits/dim (95% interval over images; " if r.images > 1 else
              "bits/dim (one image: no interval over images; ")
    print(f"NLL of the noised {space}: {r.nats_per_dim:.4f} nats/dim = {r.bits_per_dim:.4f} {spread}"
          f"{'normalised latent' if space == 'latents' else 'pixels in [-1, 1]'} units)")
    uniform = pipe.config.noise_type == "uniform"
    if r.pixel_bits_per_dim is not None:
        scale = "7 = log2(128) for [-1, 1] -> [0, 256)" if uniform else "log2(127.5) for [-1, 1] -> [0, 255]"
        print(f"bits/dim on the 8-bit pixel scale: {r.pixel_bits_per_dim:.4f} (adds {scale})")
    if uniform:
        print("Noise: the flow models 8-bit pixels dequantised with U[0, 1) noise (noise_type uniform, as in "
              "training); the 8-bit figure is the usual upper bound on the discrete NLL, averaged over the noise draws.")
    else:
        print(f"Noise: the flow models x + {pipe.config.noise_std} * N(0, I) (the training noise_std); this is the "
              "exact density of that noised data, averaged over the noise draws, not a bound on the clean data.")
    if out is not None:
        record = {"checkpoint": str(Path(checkpoint).resolve()), "data": str(Path(args.data).resolve()),
                  "images": r.images, "noise_samples": args.noise_samples, "seed": args.seed,
                  "processes": dist.world_size, "space": space, "noise_type": pipe.config.noise_type,
                  "noise_std": pipe.config.noise_std, **asdict(r)}
        write_text_atomic(out, json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def set_captions(args: argparse.Namespace, classes: list[str] | None, unconditional: bool = False) -> list[str]:
    """Caption of each of the ``--num_samples`` images: the given captions (or classes), cycled; ``""`` for an
    ``unconditional`` model (``txt_size`` 0).

    Raises:
        ValueError: ``--num_samples < 1``, no caption flag (a conditional model) or one (an unconditional model), an
            empty caption file, ``--class_names`` for a text model, or a caption that is no class of a
            class-conditional model.
    """
    if args.num_samples < 1:
        raise ValueError(f"--num_samples {args.num_samples}: a set needs at least one image")
    if unconditional:
        check_no_prompt(args, ["caption", "caption_file", "class_names", "negative_prompt"])
        return [""] * args.num_samples
    if not (args.caption or args.caption_file or args.class_names):
        raise ValueError("no captions: pass --caption TEXT (repeatable), --caption_file FILE or --class_names")
    if args.class_names:
        if classes is None:
            raise ValueError("--class_names is for class-conditional models (config 'text' a .vocab file)")
        pool = list(classes)
    elif args.caption_file:
        pool = [line.strip() for line in read_text_lines("caption_file", args.caption_file) if line.strip()]
        if not pool:
            raise ValueError(f"--caption_file {args.caption_file} holds no caption")
    else:
        pool = list(args.caption)
    if classes is not None:  # checked before the set is written or the weights load
        check_class_names(pool, classes, args, "or --class_names for all of them")
    return [pool[i % len(pool)] for i in range(args.num_samples)]


def weights_files(checkpoint: Path, ema: bool) -> list[Path]:
    """The weights files a checkpoint (a file or a model folder) samples with (the EMA weights too with ``ema``)."""
    from starflow.assets import EMA_WEIGHT_NAMES, find_weights

    check_checkpoint_path(checkpoint, ema)
    files = [find_weights(checkpoint) if checkpoint.is_dir() else checkpoint]
    if ema and checkpoint.is_dir():
        files += [checkpoint / n for n in EMA_WEIGHT_NAMES if (checkpoint / n).is_file()]
    return files


def generate_set(args: argparse.Namespace) -> int:
    """:func:`starflow.evaluation.generate.generate_set` of the model's pipeline."""
    from starflow.distributed import cleanup_distributed, init_distributed, pick_device
    from starflow.evaluation.generate import check_set, set_record
    from starflow.models.jacobi import AUTO
    from starflow.evaluation.generate import generate_set as make_set
    from starflow.files import weights_fingerprint, weights_sha256
    from starflow.folder_lock import FolderLock

    if args.checkpoint_path is None:
        args.checkpoint_path = str(assets.shipped(assets.DEMO_DIR))
        note_once(f"no --checkpoint_path given: sampling from the shipped demo model ({assets.DEMO_DIR})")
    files = weights_files(Path(args.checkpoint_path), args.ema)  # (checks the path first)
    weights = weights_fingerprint(files)
    digest = functools.cache(lambda: weights_sha256(files))  # hashed at most once, and only when needed
    check_input_files(args, "caption_file")
    out = check_output_path(args.out, "out")
    if args.num_samples < 1 or args.sample_batch_size < 1:
        raise ValueError(f"--num_samples {args.num_samples} / --sample_batch_size {args.sample_batch_size}: both must "
                         "be >= 1")
    # an existing set made otherwise is refused before the weights load (minutes for the released models)
    config = model_config_path(args)
    cfg = sampling_config(config, args)
    classes = config_classes(cfg, config)
    captions = set_captions(args, classes, cfg.txt_size == 0)
    settings = sample_settings(args, cfg)
    # "auto" Jacobi chunks follow the device type as well as the batch (auto_block_size): a set continues on its own
    auto = settings.jacobi and settings.jacobi_block_size == AUTO
    record = {"checkpoint": str(Path(args.checkpoint_path).resolve()), "ema": args.ema,
              "weights": weights,
              "precision": "bf16" if args.bf16 else "fp32", "config": cfg.to_dict(),
              "auto_device": pick_device(args.device).type if auto else None}
    if not check_set(args.out, set_record(captions, settings, cfg.seed, record), digest, captions):
        tabbed = next((c for c in captions if "\t" in c), None)  # (a set made before this rule continues)
        if tabbed is not None:
            flag = f"--caption_file {args.caption_file}" if args.caption_file else "--caption"
            raise ValueError(f"{flag}: the caption {tabbed!r} holds a tab: a sample set takes one caption per sample, "
                             "without sample's 'prompt<TAB>negative prompt' (remove the tab and what follows it)")
    dist = init_distributed(args.device)
    lock = FolderLock(out, "sample set", " (or pass another --out)")
    if dist.is_main and out.is_dir():  # said before the weights load; generate_set holds it as well
        lock.acquire()
    try:
        pipe, cfg, checkpoint = load_pipeline(args, dist)
        summary = make_set(pipe, captions, Path(args.out), sample_settings(args, cfg), seed=cfg.seed,
                           batch_size=args.sample_batch_size, dist=dist, record=record, weights_digest=digest)
    finally:
        lock.release()
    if dist.is_main:
        print(f"{args.out}: {summary.total} images ({summary.existing} already there, {summary.written} written in "
              f"{summary.seconds:.1f} s, {summary.images_per_s:.1f} images/s on {dist.world_size} process(es)); "
              f"captions in captions.jsonl")
    del pipe  # a sharded model goes before its process group (cleanup_distributed)
    cleanup_distributed()
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """:func:`starflow.evaluation.evaluate.evaluate_samples`, printed as a table."""
    from starflow.distributed import pick_device
    from starflow.evaluation.evaluate import CLIP_DEFAULT, evaluate_samples, format_results

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if args.clip_model is not None and "clip" not in metrics:
        raise ValueError(f"--clip_model is for the clip metric, which --metrics {args.metrics} leaves out: drop it or "
                         "add clip")
    if args.features is not None and not [m for m in metrics if m != "clip"]:
        raise ValueError(f"--features is for fid, kid and precision_recall, which --metrics {args.metrics} leaves out: "
                         "drop it")
    record = evaluate_samples(args.samples, args.reference, metrics, features=args.features or "inception",
                              clip_model=args.clip_model or CLIP_DEFAULT, save_stats_to=args.save_stats,
                              batch_size=args.batch_size, device=pick_device(args.device), out=args.out)
    print(format_results(record))
    return 0
