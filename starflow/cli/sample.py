"""``starflow sample``: prompts -> image or video files (one process or under ``torchrun``)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

import starflow
from starflow import assets
from starflow.cli._flags import (SAMPLING_REJECT, SAMPLING_SKIP, about_flag, add_config_flags, add_device_flag,
                                 check_input_files, check_output_path, config_overrides, is_rank0, note_once,
                                 output_folder, read_text_lines)
from starflow.config import CONFIG_FIELDS, check_inactive, load_config
from starflow.cli._video_inputs import (check_input_clip, check_input_headers, check_video_flags, read_video_inputs,
                                        without_sampler_tag)
from starflow.models.jacobi import AUTO, JACOBI_BLOCK_SIZE, JACOBI_MAX_ITER, JACOBI_THRESHOLD

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sample`` to the subcommands."""
    p = sub.add_parser("sample", help="sample images or videos from prompts",
                       description="Sample images (image models) or videos (video models: text-to-video, "
                                   "image-to-video, continuation, video-to-video). Without --checkpoint_path, samples "
                                   "the shipped demo. A rerun draws every sample again: for large sets that a rerun "
                                   "continues where a killed run stopped (e.g. for metrics), use starflow generate-set.")
    add_model_flags(p)
    p.add_argument("--caption", action="append",
                   help="prompt (repeat for several); as in --caption_file, 'prompt<TAB>negative prompt' gives it its "
                        "own negative prompt. Sample i of a run gets the seed seed + i")
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
    p.add_argument("--output_dir", "--save_folder", dest="output_dir", default="outputs/samples",
                   help="folder for PNGs (MP4s), grid.png, settings.json (--save_folder: the official name) "
                        "[default: outputs/samples]")
    p.add_argument("--return_sequence", action="store_true",
                   help="also write NAME_sequence.png (.mp4 for videos) per sample: the noise, the latents after each "
                        "flow block (deep block first, before denoising) and the result, each decoded, side by side "
                        "(sampling from noise and image-to-video; not with --input_video)")
    p.add_argument("--out_fps", type=int, default=None,
                   help="video configs: the frame rate in the prompt (fps_cond models) and of the written files "
                        "[default: the config's vid_size fps]")
    p.add_argument("--dry_run", action="store_true",
                   help="print the plan (samples, sizes, tokens, batches, memory estimate) and exit without loading "
                        "weights or sampling; with --model_config_path the weights need not be downloaded yet")
    p.add_argument("--input_image", default=None,
                   help="video configs: the first frame (any PIL-readable file; resized and centre-cropped): "
                        "image-to-video")
    p.add_argument("--input_video", default=None,
                   help="video configs: a clip (any file av decodes; resized and centre-cropped). A model trained "
                        "with video_to_video turns it into the target clip (the '(v2v) ' prompt; its first vid_size "
                        "frames are used); any other model continues it: the clip's last --context_length latent "
                        "frames are the context, then --target_length new frames follow (the output is the clip and "
                        "its continuation; a still image is a one-frame clip: the image then --target_length frames, which "
                        "begin as --input_image's clip does). WAN2.2 latents need 4k+1 input frames. The clip's frames "
                        "are taken as they are, at the model's frame rate (a note says when the file's rate differs: "
                        "resample it for the trained motion speed)")
    p.add_argument("--last_image", default=None,
                   help="video configs trained with last_frame_cond: the end frame (the '(last) ' prompt); with "
                        "--input_image as well, the clip runs from one to the other")
    p.add_argument("--target_length", type=int, default=None,
                   help="video configs: frames of the sampled video, --input_image's frame included (the VAE decodes "
                        "tk+1 frames, t its temporal factor: 4 for WAN2.2, 1 without a VAE) [default: the config's "
                        "vid_size]; longer than trained samples window by window; with --input_video (continuation): "
                        "the frames added after the clip, a multiple of t [default: vid_size - 1 rounded down to a "
                        "multiple of t, at least t; vid_size itself when t is 1]")
    p.add_argument("--context_length", type=int, default=None,
                   help="video configs: latent frames carried into each new window [default: min(16, window - 1)]")
    p.add_argument("--gif", action="store_true", help="video configs: also write an animated GIF per sample")
    p.add_argument("--lossless_mp4", action="store_true",
                   help="video configs: write the MP4s losslessly (RGB H.264, libx264rgb at QP 0: the exact frames, "
                        "e.g. for video metrics; fewer players take it) [default: yuv420p at the encoder's default "
                        "quality, for viewing; the poster PNG is exact either way]")
    p.add_argument("--profile", action="store_true",
                   help="print the seconds and sequential flow evaluations per stage: text encoding, each flow "
                        "block, denoising, VAE decoding")
    add_device_flag(p, "cpu, cuda ... [default: cuda if available]")
    add_config_flags(p, skip=SAMPLING_SKIP, reject=SAMPLING_REJECT)  # --ema and --compile are switches here
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


JACOBI_DEFAULTS = {"jacobi_th": JACOBI_THRESHOLD, "jacobi_block_size": AUTO, "jacobi_max_iter": JACOBI_MAX_ITER,
                   "jacobi_stop": "sample"}
"""The Jacobi flags and their defaults, declared once: ``--jacobi 0`` refuses any of them set to another value."""


def add_decoding_flags(p: argparse.ArgumentParser, command: str = "sample") -> None:
    """Jacobi decoding, size, batch and denoising flags (names as the official ``sample.py``), with the help texts of
    ``command``: ``sample``, ``generate-set``, or ``inpaint``/``edit`` (an input image fixes the shape)."""
    image_input = command in ("inpaint", "edit")
    p.add_argument("--jacobi", type=int, choices=(0, 1), default=1,
                   help="1: block-wise Jacobi iteration, 0: sequential (then the other --jacobi_* flags are refused) "
                        "[default: 1]")
    p.add_argument("--jacobi_th", type=float, default=JACOBI_DEFAULTS["jacobi_th"],
                   help="Jacobi stopping threshold on the relative squared change of a chunk [default: 1e-4; "
                        "the official scripts use 1e-3]")
    p.add_argument("--jacobi_block_size", type=_block_size, default=JACOBI_DEFAULTS["jacobi_block_size"],
                   metavar="K|auto",
                   help="tokens per Jacobi chunk (4x after the first frame of a video); 'auto': chosen per flow block "
                        "from its rows at --sample_batch_size and the device (GPU 64; CPU: the largest of 64/32 with "
                        "rows x K <= 256, else sequential decoding, which is faster on a CPU for large batches); "
                        "every batch of a job, a smaller last one included, decodes with the chunks chosen for "
                        f"--sample_batch_size. A fixed K (e.g. {JACOBI_BLOCK_SIZE}) gives the same images at any "
                        "--sample_batch_size [default: auto; the official scripts use 16 for images, 32 for video]")
    p.add_argument("--jacobi_stop", choices=("sample", "batch"), default=JACOBI_DEFAULTS["jacobi_stop"],
                   help="Jacobi stopping rule: 'sample' stops and freezes each sample on its own change, so an "
                        "image does not depend on its batch or the number of ranks; 'batch' is the official rule "
                        "(change over the whole batch) [default: sample]")
    p.add_argument("--aspect_ratio", default="1:1",
                   help=("w:h of the samples, e.g. 16:9; the input image (and mask) are resized and centre-cropped "
                         "to it" if image_input else
                         "w:h, e.g. 16:9; 'random': each sample draws one of the nine trained ratios from its seed "
                         "(models trained with mix_aspect)") + " [default: 1:1]")
    p.add_argument("--sample_batch_size", type=int, default=16,
                   help="images per forward batch on each process" + (
                       "; also the images per process of a single prompt without --num_samples (the official "
                       "sample.py)" if command == "sample" else "") + " [default: 16]")
    p.add_argument("--jacobi_max_iter", type=int, default=JACOBI_DEFAULTS["jacobi_max_iter"],
                   help="at most this many model evaluations per Jacobi chunk [default: 32, as the official]")
    p.add_argument("--guide_top", type=int, default=None,
                   help="guidance only in the first K flow blocks in sampling order (the deep block is the first); "
                        "the rest run unguided; for cond_top_only 0 models (a cond_top_only model reads the text in "
                        "its deep block alone) [default: every text-conditioned block]")
    p.add_argument("--attn_temp", type=float, default=1.0,
                   help="attention temperature of the unconditional guidance rows: their attention logits are divided "
                        "by it in every layer (TARFlow's guidance); needs --cfg > 0 [default: 1 = plain guidance]")
    p.add_argument("--annealed_guidance", action="store_true",
                   help="guidance weight grows linearly over the tokens, w (t + 1) / N at token t (SPEC section 8)")
    p.add_argument("--self_denoise", action=argparse.BooleanOptionalAction, default=True,
                   help="remove the training noise with one score step [default: on]")
    p.add_argument("--disable_learnable_denoiser", action="store_true",
                   help="video models with a learnable denoiser: take the Tweedie step of the flow's own likelihood "
                        "instead (as images)")
    p.add_argument("--target_noise_std", type=float, default=None,
                   help="the noise level to sample at: announced in the prompt of cond_noise_level models, added to "
                        "input frames, and removed by the Tweedie step [default: the config's noise_std]")
    p.add_argument("--self_denoising_lr", type=float, default=None,
                   help="step of the denoising update: factor of the Tweedie step x - lr * noise_std^2 * grad "
                        "[default: 1], or the learnable denoiser's x - lr * D(x, y) [default: 0.3]")
    p.add_argument("--denoising_batch_size", type=int, default=None,
                   help="samples per denoising pass (the Tweedie step runs a backward pass: lower it if that runs out "
                        "of memory) [default: the sampling batch]")


def _block_size(value: str) -> int | str:
    """``--jacobi_block_size``: a positive integer or ``auto``."""
    if value == AUTO:
        return AUTO
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a number of tokens or 'auto'") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"{k}: must be >= 1 (1 = sequential decoding)")
    return k


def check_checkpoint_path(checkpoint: str | Path, ema: bool = False) -> None:
    """Refuse a ``--checkpoint_path`` where nothing exists, or a weights file with ``--ema``, before any work.

    Raises:
        FileNotFoundError: the message says where the official weights come from.
        ValueError: ``ema`` with a weights file (the EMA weights are a model folder's ``ema.safetensors``).
    """
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint_path {checkpoint}: checkpoint not found (a model folder or a weights "
                                "file; the official weights: starflow download t2i|t2v)")
    if ema and Path(checkpoint).is_file():
        raise ema_with_weights_file(checkpoint)


def ema_with_weights_file(checkpoint: str | Path) -> ValueError:
    """The error of ``--ema`` with a weights file as ``--checkpoint_path``."""
    return ValueError(f"--ema reads a model folder's ema.safetensors, and --checkpoint_path {checkpoint} is a weights "
                      "file: pass the folder, or drop --ema (an EMA weights file is passed as it is)")


VIDEO_LAYOUT_KEYS = ("temporal_causal", "shallow_block_local", "denoiser_window")
"""Model keys that act on videos alone (frames): sampling an image model refuses them."""

TRAINED_MODES = ("video_to_video", "last_frame_cond")
"""Config keys of how a video model was trained to be conditioned: sampling may turn one off, not on."""

WEIGHTS_BOUND_KEYS = ("img_size", "txt_size", "head_dim", "rope", "pt_seq_len", "seq_order", "sos", "use_softplus",
                      "cond_top_only", "soft_clip", "temporal_causal", "shallow_block_local", "denoiser_window",
                      "local_attn_window", "noise_std", "cond_noise_level", "fps_cond", "mix_aspect")
"""Model keys whose value the weights were trained with but whose change no weight's shape reveals (the sample size,
the prompt length, what the flow computes): a sampling flag that changes one is honoured (command line > YAML) with a
note naming the trained value."""


def sampling_config(config: str | Path, args: argparse.Namespace):
    """The model's config with the sampling flags' config overrides (``--KEY V``).

    A key of :data:`WEIGHTS_BOUND_KEYS` set to another value than the model's gets a note on stderr.

    Raises:
        ValueError: an override that turns on a conditioning mode the model was not trained with (:data:`TRAINED_MODES`),
            a video layout key (:data:`VIDEO_LAYOUT_KEYS`) for an image model, or what
            :func:`~starflow.config.load_config` raises.
    """
    overrides = config_overrides(args, skip=SAMPLING_SKIP)
    trained = load_config(config)
    video_only = [key for key in VIDEO_LAYOUT_KEYS if key in overrides]
    if video_only and not (trained.is_video or overrides.get("vid_size")):
        raise ValueError(f"--{video_only[0]} sets how a video model attends across frames; this config has no vid_size "
                         "(an image model): drop it")
    for key in TRAINED_MODES:
        value = overrides.get(key)
        if str(value).strip().lower() in ("1", "true", "yes", "on") and not getattr(trained, key):
            raise ValueError(f"--{key} {value}: this model was trained without {key} (its config says 0) and sampling "
                             "cannot add it: drop the flag, or use a model fine-tuned with it")
    cfg = load_config(config, overrides)
    check_inactive(cfg, overrides, lambda message: None)  # (a saved model's own unused keys are its business)
    for key in WEIGHTS_BOUND_KEYS:
        if key in overrides and getattr(cfg, key) != getattr(trained, key):
            note_once(f"note: --{key} {overrides[key]} overrides the model's {key} ({getattr(trained, key)}), which its "
                      "weights were trained with")
    return cfg


def check_sharding(args: argparse.Namespace, cfg, world_size: int) -> bool:
    """Whether the flow is sharded (``fsdp`` over more than one rank: one rank would shard nothing), refusing the
    flags a sharded flow cannot honour.

    Raises:
        ValueError: ``--jacobi_stop batch`` with a sharded flow.
    """
    shard = bool(cfg.fsdp) and world_size > 1
    if world_size == 1 and cfg.fsdp and getattr(args, "fsdp", None) is not None:  # (given as a flag: not the config's)
        note_once("note: --fsdp 1 shards the flow over the processes of torchrun; one process samples it whole")
    if shard and getattr(args, "jacobi_stop", "sample") == "batch":
        raise ValueError("--jacobi_stop batch stops each rank on its own batch, but the sharded flow (fsdp: 1) needs "
                         "every rank to iterate as often as the others: use --jacobi_stop sample, or --fsdp 0")
    return shard


def load_pipeline(args: argparse.Namespace, dist, check: Callable[[Any, Path], None] | None = None):
    """``(pipeline, config, checkpoint)`` of ``--checkpoint_path`` (the shipped demo without one, with a note),
    with the config's keys overridden by their flags, sharded over the ranks with ``fsdp``. ``check(config,
    checkpoint)`` runs before the weights load (minutes for 3B / 7B), to refuse flags from the config alone.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: what ``check`` raises.
    """
    from starflow.sampling.pipeline import Pipeline

    checkpoint = args.checkpoint_path or assets.shipped(assets.DEMO_DIR)
    if args.checkpoint_path is None and dist.is_main:
        print(f"no --checkpoint_path given: sampling from the shipped demo model ({assets.DEMO_DIR})")
    check_checkpoint_path(checkpoint, args.ema)
    config = model_config_path(args)
    cfg = sampling_config(config, args)
    if check is not None:
        check(cfg, Path(checkpoint))
    shard = check_sharding(args, cfg, dist.world_size)
    if dist.is_main and shard:
        print(f"fsdp: the flow is sharded over {dist.world_size} ranks (FSDP2); pass --fsdp 0 to replicate it")
    built = cfg
    if cfg.txt_size and cfg.text == assets.TINY_TEXT_ENCODER:  # drawn from the config's seed, not from --seed (the
        built = dataclasses.replace(cfg, seed=load_config(config).seed)  # flow learnt that encoder's embeddings)
    pipe = Pipeline.from_pretrained(checkpoint, config=built, device=dist.device,
                                    dtype=torch.bfloat16 if args.bf16 else torch.float32,
                                    asset_dir=Path(config).parent, shard=shard, ema=args.ema)
    if args.compile:
        pipe.model.compile_layers()
    return pipe, cfg, checkpoint


def check_aspect_ratio(aspect_ratio: str, cfg) -> None:
    """Accept a ``w:h`` the model was trained on: ``1:1`` without ``mix_aspect``; any ratio with it, sized as SPEC
    section 13, with a note on stderr when it is not one of the nine trained buckets.

    Raises:
        ValueError: a malformed ratio, or another shape than the one a ``mix_aspect 0`` model was trained on.
    """
    from starflow.data.aspect import ASPECT_RATIOS, aspect_to_size, bucket_name, parse_aspect
    from starflow.adapters.geometry import vae_geometry

    try:
        ratio = parse_aspect(aspect_ratio)
    except ValueError as e:
        raise ValueError(f"--aspect_ratio {aspect_ratio}: {e}; e.g. 16:9") from None
    if not cfg.mix_aspect:
        if ratio != 1.0:
            raise ValueError(f"--aspect_ratio {aspect_ratio}: this model was trained on square {cfg.img_size}x"
                             f"{cfg.img_size} samples only (mix_aspect 0); drop the flag (1:1) or use a model trained "
                             "with mix_aspect 1")
        return
    if bucket_name(aspect_ratio) not in ASPECT_RATIOS:  # (16:9 spelled 32:18 is that bucket: SampleSettings)
        h, w = aspect_to_size(aspect_ratio, cfg.img_size, vae_geometry(cfg.vae).downsample * cfg.patch_size)
        note_once(f"note: --aspect_ratio {aspect_ratio} is outside the trained buckets ({' '.join(ASPECT_RATIOS)}); "
                  f"sampling {w}x{h} pixels")


SETTING_FLAGS = {"fps": "out_fps", "anneal_guidance": "annealed_guidance",
                 "negative prompts": "negative_prompt / caption-file negatives"}
"""The :class:`~starflow.sampling.pipeline.SampleSettings` fields whose ``starflow sample`` flag has another name."""


def as_flags(message: str) -> str:
    """A settings error as the command line says it: its leading field name (``attn_temp 2: ...``) becomes the flag
    (``--attn_temp 2: ...``; ``fps`` is ``--out_fps``)."""
    field = next((f for f in SETTING_FLAGS if message.startswith(f + " ")), message.split(" ", 1)[0])
    return f"--{SETTING_FLAGS.get(field, field)}{message[len(field):]}"


def note_idle_jacobi_flags(args: argparse.Namespace, rows: int) -> None:
    """Note that ``--jacobi_th`` / ``--jacobi_max_iter`` / ``--jacobi_stop`` act on nothing where ``--jacobi_block_size
    auto`` decodes ``rows`` rows (batch x 2 with guidance) token by token on this device: in every flow block then,
    since video blocks that decode frames apart have more rows still."""
    from starflow.distributed import pick_device
    from starflow.models.jacobi import auto_block_size

    given = [f"--{k}" for k in ("jacobi_th", "jacobi_max_iter", "jacobi_stop") if getattr(args, k) != JACOBI_DEFAULTS[k]]
    device = pick_device(getattr(args, "device", None))
    if given and auto_block_size(rows, device) == 1:
        verb = "acts" if len(given) == 1 else "act"
        note_once(f"note: --jacobi_block_size auto decodes {rows} rows on {device.type} token by token (faster there "
                  f"than Jacobi), so {', '.join(given)} {verb} on nothing; pass --jacobi_block_size K to iterate in "
                  "chunks")


def sample_settings(args: argparse.Namespace, cfg):
    """The :class:`~starflow.sampling.pipeline.SampleSettings` of the decoding flags (video flags if present),
    checked against the config.

    Raises:
        ValueError: a flag out of range or one that would not act on this model, named with the fix.
    """
    from starflow.sampling.batch import RANDOM_ASPECT
    from starflow.sampling.settings import SampleSettings, check_settings

    if args.sample_batch_size is not None and args.sample_batch_size < 1:
        raise ValueError(f"--sample_batch_size {args.sample_batch_size}: must be >= 1")
    try:  # the ranges of the flags that are fields of SampleSettings (same names, but --out_fps), first
        settings = SampleSettings(cfg=cfg.cfg, jacobi=bool(args.jacobi), jacobi_th=args.jacobi_th,
                                  jacobi_block_size=args.jacobi_block_size, jacobi_max_iter=args.jacobi_max_iter,
                                  # the batch "auto" chooses for; a fixed block size does not depend on it
                                  jacobi_auto_batch=getattr(args, "sample_batch_size", None)
                                  if args.jacobi_block_size == AUTO else None,
                                  aspect_ratio=args.aspect_ratio, self_denoise=args.self_denoise,
                                  jacobi_stop=args.jacobi_stop, anneal_guidance=args.annealed_guidance,
                                  guide_top=args.guide_top, attn_temp=args.attn_temp, temperature=cfg.temperature,
                                  fps=getattr(args, "out_fps", None), target_noise_std=args.target_noise_std,
                                  self_denoising_lr=args.self_denoising_lr,
                                  learnable_denoiser=not args.disable_learnable_denoiser,
                                  denoising_batch_size=args.denoising_batch_size,
                                  target_length=getattr(args, "target_length", None),
                                  context_length=getattr(args, "context_length", None))
    except ValueError as e:
        raise ValueError(as_flags(str(e))) from None
    try:  # the rules that depend on the model, shared with the Python API
        check_settings(settings, cfg)
    except ValueError as e:
        raise ValueError(as_flags(str(e))) from None
    if not args.jacobi:
        given = [flag for flag, default in JACOBI_DEFAULTS.items() if getattr(args, flag) != default]
        if given:
            raise ValueError(f"--{given[0]} sets Jacobi decoding, which --jacobi 0 turns off (sequential): drop one")
    elif args.jacobi_block_size == AUTO and args.sample_batch_size is not None:
        note_idle_jacobi_flags(args, args.sample_batch_size * (2 if settings.cfg > 0 else 1))
    # sample i draws with seed + i, its inputs' noise with seed + i + an offset: all of them fit in 64 bits
    if not -2**62 < cfg.seed < 2**62:
        raise ValueError(f"--seed {cfg.seed}: must be below 2^62 in size (sample i uses seed + i, plus offsets, in a "
                         "64-bit generator)")
    if not args.self_denoise:
        for flag in ("self_denoising_lr", "denoising_batch_size", "disable_learnable_denoiser"):
            if getattr(args, flag) not in (None, False):
                raise ValueError(f"--{flag} sets the denoising step, which --no-self_denoise turns off: drop one")
        known_input = cfg.is_video or getattr(args, "command", None) in ("inpaint", "edit")  # noised known latents
        if args.target_noise_std is not None and not (known_input or cfg.cond_noise_level):
            raise ValueError("--target_noise_std sets the noise level of the denoising step, which --no-self_denoise "
                             "turns off, and this model's prompt does not state it (cond_noise_level 0): drop one")
    target = getattr(args, "target_length", None)
    if target is not None and cfg.is_video:
        from starflow.adapters.geometry import vae_geometry

        t = vae_geometry(cfg.vae).temporal_downsample
        if not getattr(args, "input_video", None):
            vae_geometry(cfg.vae).check_decodable(target, "--target_length")
        if getattr(args, "input_video", None) and not cfg.video_to_video and target % t:
            lower = target // t * t
            raise ValueError(f"--target_length {target}: a continuation adds whole latent frames of {t} pixel frames "
                             f"each (the VAE's temporal factor): use {lower or t}" + (f" or {lower + t}" if lower else ""))
    if args.disable_learnable_denoiser and not cfg.learnable_self_denoiser:
        raise ValueError("--disable_learnable_denoiser: this model has no learnable denoiser (learnable_self_denoiser "
                         "0); it already denoises with the Tweedie step")
    if args.disable_learnable_denoiser and not cfg.is_video:
        raise ValueError("--disable_learnable_denoiser: images always denoise with the Tweedie step; the learnable "
                         "denoiser acts on video models only (SPEC section 10): drop the flag")
    if args.aspect_ratio == RANDOM_ASPECT:
        if not cfg.mix_aspect:
            raise ValueError("--aspect_ratio random draws from the nine trained ratios of a mix_aspect model; this "
                             "one was trained on one shape (mix_aspect 0): give a ratio such as 1:1")
        inputs = [flag for flag in ("input_image", "input_video", "last_image", "mask", "mask_box")
                  if getattr(args, flag, None)]
        if inputs or getattr(args, "command", None) in ("inpaint", "edit"):
            what = f"--{inputs[0]}" if inputs else "an input image"
            raise ValueError(f"--aspect_ratio random draws a ratio per sample, but {what} fixes the samples' shape: "
                             "give the ratio to sample at (e.g. the input's, such as 4:3)")
    else:
        check_aspect_ratio(args.aspect_ratio, cfg)
    return settings


def read_captions(args: argparse.Namespace, demo: bool, classes: list[str] | None = None,
                  world_size: int = 1, unconditional: bool = False) -> list[str]:
    """The prompts of ``--caption_file``, ``--caption`` or ``--class_id`` (the demo prompts for the demo), each
    repeated ``--num_samples`` times; without ``--num_samples``, a single ``--caption``/``--class_id`` is repeated
    ``sample_batch_size x world_size`` times (the official ``sample.py``) and several prompts once each.

    Raises:
        ValueError: ``--num_samples`` below 1, an unknown class (prompt or negative prompt), or a caption file without
            a caption.
    """
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num_samples {args.num_samples}: must be >= 1 (images per prompt)")
    sources = [flag for flag in ("class_id", "caption_file", "caption") if getattr(args, flag)]
    if unconditional:  # (txt_size 0): the empty prompt, --num_samples times
        check_no_prompt(args, [*sources, "negative_prompt"])
        return [""] * (args.num_samples or args.sample_batch_size * world_size)
    if len(sources) > 1:
        raise ValueError(f"--{sources[0]} and --{sources[1]} both give the prompts: pass one of them")
    if args.class_id:
        if classes is None:
            raise ValueError("--class_id is for class-conditional models (config 'text' a .vocab file); pass --caption")
        bad = [k for k in args.class_id if not 0 <= k < len(classes)]
        if bad:
            raise ValueError(f"--class_id {bad[0]}: the model has classes 0..{len(classes) - 1} ({classes})")
        captions = [classes[k] for k in args.class_id]
    elif args.caption_file:
        lines = read_text_lines("caption_file", args.caption_file)
        captions = [line.strip() for line in lines if line.strip()]
        if not captions:
            raise ValueError(f"--caption_file {args.caption_file}: no caption in it (one per line)")
    elif args.caption:
        captions = list(args.caption)
    elif demo:
        captions = list(assets.DEMO_PROMPTS)
    else:
        raise SystemExit("no prompt: pass --caption TEXT (repeatable) or --caption_file FILE")
    if classes is not None:  # a class-conditional model takes class names: check them before any work
        prompts, negatives = split_negatives(captions, args.negative_prompt or "")
        check_class_names(prompts, classes, args, "or --class_id K")
        unknown = sorted({n for n in negatives if n and n not in classes})
        if unknown:
            flag = f"--negative_prompt {args.negative_prompt}" if args.negative_prompt else "negative prompts"
            raise ValueError(f"{flag}: {unknown} are not classes of this model: use one of {classes}")
    repeat = args.num_samples
    if repeat is None:
        single = not args.caption_file and len(captions) == 1 and (args.caption or args.class_id)
        repeat = args.sample_batch_size * world_size if single else 1
    return [c for c in captions for _ in range(repeat)]


def check_no_prompt(args: argparse.Namespace, flags: list[str]) -> None:
    """Refuse the prompt flags among ``flags`` that are given for an unconditional model (``txt_size`` 0).

    Raises:
        ValueError: naming the first such flag.
    """
    given = [flag for flag in flags if getattr(args, flag, None)]
    if given:
        raise ValueError(f"--{given[0]}: this model is unconditional (txt_size 0) and takes no prompt: drop it "
                         "(--num_samples N sets how many samples)")


def check_class_names(prompts: list[str], classes: list[str], args: argparse.Namespace, alternative: str) -> None:
    """Refuse prompts of a class-conditional model that are no class name (``""`` is the unconditional label), naming
    the flag that gave them.

    Raises:
        ValueError: every unknown name listed, with the classes and ``alternative`` (another flag to use).
    """
    unknown = sorted({c for c in prompts if c and c not in classes})
    if unknown:
        flag = "--caption_file " + args.caption_file if args.caption_file else "--caption " + unknown[0]
        raise ValueError(f"{flag}: {unknown} are not classes of this model: use one of {classes}, {alternative}")


def checked_settings(args: argparse.Namespace, cfg, negatives: list[str]):
    """The :func:`sample_settings` of ``starflow sample`` with its own checks: the video flags
    (:func:`check_video_flags`) and the negative prompts (``--negative_prompt`` or caption-file ones), which act through
    guidance. Sampling and ``--dry_run`` both come here, so they refuse the same commands.

    Raises:
        ValueError: as :func:`sample_settings` and :func:`check_video_flags`; a negative prompt with ``cfg`` 0.
    """
    from starflow.sampling.settings import check_settings

    settings = sample_settings(args, cfg)
    check_video_flags(args, cfg)
    try:
        check_settings(settings, cfg, negatives)
    except ValueError as e:
        raise ValueError(as_flags(str(e))) from None
    return settings


def split_negatives(captions: list[str], default: str = "") -> tuple[list[str], list[str]]:
    """``prompt<TAB>negative`` lines -> ``(prompts, negative prompts)``; lines without a tab get ``default``
    (``--negative_prompt``).

    Raises:
        ValueError: a line with more than one tab, or a ``default`` that no line takes (each names its own).
    """
    prompts, negatives = [], []
    for line in captions:
        prompt, tab, negative = line.partition("\t")
        if "\t" in negative:
            raise ValueError(f"caption line {line!r} holds more than one TAB: write PROMPT<TAB>NEGATIVE PROMPT")
        prompts.append(prompt.strip())
        negatives.append(negative.strip() if tab else default)
    if default and captions and all("\t" in line for line in captions):
        raise ValueError(f"--negative_prompt {default!r}: every caption line names its own negative prompt (after a "
                         "TAB), so it would apply to none: drop it, or drop the lines' own")
    return prompts, negatives


def config_classes(cfg, config: Path) -> list[str] | None:
    """The class names of a class-conditional config (``text`` a ``.vocab`` file, resolved beside ``config``), read
    without loading the model; None for a text model."""
    from starflow.adapters.labels import is_vocab, read_vocab

    return read_vocab(assets.resolve_asset(cfg.text, config.parent)) if is_vocab(cfg.text) else None


def model_config_path(args: argparse.Namespace, dry_run: bool = False) -> Path:
    """``--model_config_path``, or ``config.yaml`` beside ``--checkpoint_path`` (the shipped demo without one).

    Raises:
        ValueError: ``--model_config_path`` without ``--checkpoint_path`` (the demo's weights fit only its own config),
            unless for a ``dry_run``'s plan, which needs the config alone.
    """
    if args.model_config_path is not None:
        if args.checkpoint_path is None and not dry_run:
            raise ValueError(f"--model_config_path {args.model_config_path}: pass the weights of that config with "
                             "--checkpoint_path (without it the shipped demo is sampled, whose weights fit only its "
                             "own config)")
        return Path(args.model_config_path)
    checkpoint = Path(args.checkpoint_path or assets.shipped(assets.DEMO_DIR))
    return (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.yaml"


def sample_plan(args: argparse.Namespace, world_size: int, dry_run: bool = False) -> str:
    """What ``starflow sample`` would do (``--dry_run``): samples, sizes, tokens, batches and a memory estimate per
    process, from the config alone (no weights loaded, nothing written). ``dry_run``: the weights need not exist yet
    when ``--model_config_path`` gives their config (the plan says so), as for sizing a released model before its
    download; sampling itself calls this with ``dry_run=False`` to refuse a missing checkpoint before any work.

    Raises:
        FileNotFoundError: the checkpoint (unless ``dry_run`` with ``--model_config_path``) or its config is missing.
        ValueError: a bad flag (as sampling would report it).
    """
    import math

    from starflow.adapters.geometry import vae_geometry
    from starflow.data.aspect import aspect_to_size
    from starflow.data.video import video_length
    from starflow.sampling.batch import sample_aspect_ratios
    from starflow.sampling.pipeline import DEFAULT_CONTEXT_FRAMES, continuation_frames
    from starflow.sizing import GIB, size_report, text_width

    from_config = dry_run and args.model_config_path is not None and args.checkpoint_path is None
    checkpoint = weights = None if from_config else Path(args.checkpoint_path or assets.shipped(assets.DEMO_DIR))
    absent = dry_run and args.model_config_path is not None and checkpoint is not None and not checkpoint.exists()
    if absent:
        if args.ema and checkpoint.suffix:  # (a weights file's name: sampling would refuse --ema with it)
            raise ema_with_weights_file(checkpoint)
    elif not from_config:
        check_checkpoint_path(checkpoint, args.ema)
        weights = assets.find_weights(checkpoint, ema=args.ema) if checkpoint.is_dir() else checkpoint
        if not weights.is_file():
            raise FileNotFoundError(f"--checkpoint_path {checkpoint}: no weights at {weights}")
    config = model_config_path(args, dry_run)
    if not config.is_file():
        raise FileNotFoundError(f"--model_config_path {config}: no such config (pass the YAML of the weights)"
                                if args.model_config_path else
                                f"no {config.name} beside the weights ({config}): pass their YAML with "
                                "--model_config_path (the official models' are in configs/ of the repository)")
    cfg = sampling_config(config, args)
    sharded = check_sharding(args, cfg, world_size)
    check_output_path(args.output_dir)  # (sampling creates it once every input has been read)
    classes = config_classes(cfg, config)
    captions = read_captions(args, args.checkpoint_path is None, classes, world_size, cfg.txt_size == 0)
    settings = checked_settings(args, cfg, split_negatives(captions, args.negative_prompt)[1])
    check_input_headers(args)  # (sampling reads the files themselves)
    geometry = vae_geometry(cfg.vae)
    ratios = sorted(set(sample_aspect_ratios(settings.aspect_ratio, cfg.seed, len(captions))))
    frames = settings.target_length or (cfg.vid_size[0] if cfg.is_video else 1)
    clip_line = note = None
    if cfg.is_video and args.input_video:
        with about_flag("input_video", args.input_video):
            clip, clip_fps = video_length(args.input_video)
        note = check_input_clip(args.input_video, clip, clip_fps, cfg, args.out_fps)
        if cfg.video_to_video:
            frames = cfg.vid_size[0]
            clip_line = (f"input: {args.input_video} ({clip} frames): its first {frames} frames are redrawn; the flow "
                         "runs over the source's tokens, then the target's")
        else:
            added = continuation_frames(cfg, geometry.temporal_downsample, settings.target_length)
            window = geometry.latent_frames(cfg.vid_size[0])
            context = min(geometry.latent_frames(clip), settings.context_length or min(DEFAULT_CONTEXT_FRAMES, window - 1))
            clip_line = (f"input: {args.input_video} ({clip} frames) continued by {added} frames, its last {context} "
                         "latent frame(s) the context; the output is the clip and its continuation")
            frames = clip + added
    latent_frames = geometry.latent_frames(frames) if cfg.is_video else 1
    multiple = geometry.downsample * cfg.patch_size
    batch = args.sample_batch_size
    per_rank = -(-len(captions) // world_size)
    txt_dim = text_width(cfg, config.parent)
    report = size_report(cfg, txt_dim, batch=min(batch, per_rank) or 1, gpus=world_size if sharded else 1)
    lines = [f"dry run (nothing loaded or sampled): {config} alone (no --checkpoint_path: sampling needs its "
             "weights, e.g. from starflow download t2i|t2v)" if from_config else
             f"dry run (nothing loaded or sampled): {weights} with {config}"
             + (" (the weights are not there yet: the plan needs only the config; sampling needs them, e.g. "
                "from starflow download t2i|t2v)" if absent else ""),
             f"samples: {len(captions)} ({len(set(captions))} distinct prompt(s)) over {world_size} process(es), "
             f"{per_rank} per process in {math.ceil(per_rank / batch)} batch(es) of up to {batch}",
             f"{'aspect':<8}{'pixels (T, H, W)':<20}{'latent (T, C, H, W)':<24}{'tokens':>8}{'text tokens':>13}"]
    for ratio in ratios:
        h, w = aspect_to_size(ratio, cfg.img_size, multiple)
        latent = (latent_frames, cfg.channel_size, h // geometry.downsample, w // geometry.downsample)
        tokens = latent_frames * (h // multiple) * (w // multiple)
        lines.append(f"{ratio:<8}{str((frames, h, w)):<20}{str(latent):<24}{tokens:>8,}{cfg.txt_size:>13}")
    block = settings.jacobi_block_size
    if block == AUTO and not cfg.is_video:  # what "auto" picks for this batch and device (video: per flow block)
        from starflow.distributed import pick_device
        from starflow.models.jacobi import auto_block_size

        rows = batch * (2 if settings.cfg > 0 else 1)  # (chosen for --sample_batch_size, as sampling does)
        chosen = auto_block_size(rows, pick_device(args.device))
        block = f"auto: {chosen if chosen > 1 else 'token by token'} for {rows} rows on {pick_device(args.device)}"
    mode = (f"Jacobi (block {block}, th {settings.jacobi_th:g}, max {settings.jacobi_max_iter} iterations)"
            if settings.jacobi else "sequential")
    lines.append(f"decoding: {mode}; guidance {settings.cfg:g}"
                 + (f" (uncond rows doubled, attn_temp {settings.attn_temp:g})" if settings.cfg > 0 else "")
                 + f"; denoising {'on' if settings.self_denoise else 'off'}")
    mem = {m.dtype: m for m in report.memory}["bf16" if args.bf16 else "fp32"]
    lines.append(f"memory per process ({mem.dtype} weights, batch {report.batch}, largest trained bucket): weights "
                 f"{mem.weights / GIB:.3f} GiB" + (f" (the flow sharded over {world_size} processes, FSDP2)" if sharded
                                                   else "") + f", KV cache {mem.kv_cache / GIB:.3f} GiB, "
                 f"{report.total_parameters:,} flow parameters")
    lines += [clip_line] if clip_line else []
    kind = ("MP4 + poster PNG" + (" + GIF" if args.gif else "")) if cfg.is_video else "PNG"
    lines.append(f"output: {args.output_dir} ({len(captions)} {kind} files, grid.png, settings.json)")
    lines += [note] if note else []
    return "\n".join(lines)


def used_target_length(args: argparse.Namespace, cfg, target_length: int | None) -> int:
    """The ``--target_length`` a video run used, its default resolved: the frames added after ``--input_video``
    (a continuation), the source's ``vid_size`` frames (video-to-video), else the sampled video's frames."""
    from starflow.adapters.geometry import vae_geometry
    from starflow.sampling.pipeline import continuation_frames

    if args.input_video and cfg.video_to_video:
        return cfg.vid_size[0]
    if args.input_video:
        return continuation_frames(cfg, vae_geometry(cfg.vae).temporal_downsample, target_length)
    return target_length or cfg.vid_size[0]


def run(args: argparse.Namespace) -> int:
    """Sample every caption into ``--output_dir``, then (rank 0) write ``grid.png`` and ``settings.json``."""
    import os

    from starflow.distributed import cleanup_distributed, init_distributed
    from starflow.models.jacobi import DecodeStats
    from starflow.sampling.batch import RANDOM_ASPECT, sample_aspect_ratios, write_samples
    from starflow.sampling.io import (GRID_MAX, note_earlier_files, sample_file_names, sample_stem, save_poster_grid,
                                      view_scale, write_settings)
    from starflow.sampling.settings import Profile

    demo = args.checkpoint_path is None
    if demo:
        assets.shipped(assets.DEMO_DIR)
    check_input_files(args, "caption_file", "input_image", "input_video", "last_image")
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num_samples {args.num_samples}: must be >= 1 (images per prompt)")
    if args.sample_batch_size < 1:
        raise ValueError(f"--sample_batch_size {args.sample_batch_size}: must be >= 1")
    if args.dry_run:
        if args.profile:
            raise ValueError("--profile times the sampling, which --dry_run does not run: drop one of them")
        plan = sample_plan(args, int(os.environ.get("WORLD_SIZE", 1)), dry_run=True)
        if is_rank0():  # (under torchrun every rank plans; one prints)
            print(plan)
        return 0
    dist = init_distributed(args.device)
    sample_plan(args, dist.world_size)  # the checks that need no weights, before they load (minutes for 3B / 7B)
    pipe, cfg, checkpoint = load_pipeline(args, dist)
    captions = read_captions(args, demo, getattr(pipe.text_encoder, "names", None), dist.world_size, cfg.txt_size == 0)
    per_prompt = len(captions) // len(set(captions)) if captions else 1
    captions, negatives = split_negatives(captions, args.negative_prompt)
    captions = without_sampler_tag(captions, args, cfg, dist.is_main)
    settings = checked_settings(args, cfg, negatives)
    still = cfg.is_video and not args.last_image and pipe.latent_shape("1:1", settings.target_length)[0] == 1
    if dist.is_main and still and cfg.fps_cond and settings.fps:
        print(f"note: a one-frame sample is prompted as an image ('An image:'), as such samples were trained; "
              f"--out_fps {settings.fps} sets only the written file's rate")
    if dist.is_main and cfg.video_to_video and not args.input_video:
        print("note: this model was trained for video-to-video (every training sample came with a source clip); "
              "without --input_video it samples from the caption alone, which it was not trained to do")
    inputs = read_video_inputs(args, pipe, cfg, dist.is_main)
    out, before = output_folder(args.output_dir)
    random_ratio = settings.aspect_ratio == RANDOM_ASPECT
    if dist.is_main:  # written first: samples of an interrupted run are described too
        flags = {k: v for k, v in vars(args).items() if k != "func" and not (k in CONFIG_FIELDS and v is None)}
        record = {"captions": captions, "seeds": f"seed + i for the i-th caption (seed {cfg.seed})",
                  "checkpoint": str(checkpoint), "settings": vars(settings), "seed": cfg.seed,
                  "world_size": dist.world_size, "device": str(dist.device), "torch": torch.__version__,
                  "starflow": starflow.__version__, "config": cfg.to_dict(),
                  "input_image": args.input_image, "input_video": args.input_video,
                  "last_image": args.last_image, "negative_prompts": negatives, "ema": args.ema, "flags": flags}
        if random_ratio:
            record["aspect_ratios"] = sample_aspect_ratios(RANDOM_ASPECT, cfg.seed, len(captions))
        if cfg.is_video:
            record["target_length"] = used_target_length(args, cfg, settings.target_length)
        kind, step, std = pipe.denoising(settings, video=cfg.is_video)  # (the defaults above, resolved)
        record["denoising"] = {"kind": kind, "step": step, "noise_std": std}
        write_settings(out, record)
    profile = Profile()
    shape = write_samples(pipe, captions, settings, out, seed=cfg.seed, batch_size=args.sample_batch_size, dist=dist,
                          gif=args.gif, lossless=args.lossless_mp4, inputs=inputs, profile=profile,
                          stats=DecodeStats(),
                          negatives=negatives, return_sequence=args.return_sequence)
    if dist.is_main:
        h, w = pipe.latent_shape("1:1")[-2:] if random_ratio else shape[-2:]
        if random_ratio:  # the grid shows centre crops at the square size
            h, w = h * pipe.vae.downsample, w * pipe.vae.downsample
        frames = shape[1] if len(shape) == 5 else 1
        files = [sample_stem(out, i, c).with_suffix(".png") for i, c in enumerate(captions)]
        save_poster_grid(files, out / "grid.png", (h, w * frames), shape[-3],
                         nrow=per_prompt if 1 < per_prompt <= 16 else None, scale=view_scale(w))
        kind = ("video" if cfg.is_video else "image") + ("s" if len(captions) != 1 else "")
        kind += (" (MP4 + poster PNG" + (" + GIF" if args.gif else "") + ")") if cfg.is_video else ""
        shown = f" (the first {GRID_MAX})" if len(captions) > GRID_MAX else ""
        print(f"wrote {len(captions)} {kind}, grid.png{shown} and settings.json to {out}")
        ours = [name for f in files for name in sample_file_names(f.stem, cfg.is_video, args.gif, args.return_sequence)]
        note_earlier_files(out, before, ours=ours)  # (other ranks' files are this run's too)
        if args.profile:
            print(profile.table())
    del pipe  # a sharded model goes before its process group (cleanup_distributed)
    cleanup_distributed()
    return 0
