"""``starflow inpaint`` and ``starflow edit``: training-free image applications of the flow (SPEC section 17)."""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from starflow.cli._flags import (SAMPLING_REJECT, SAMPLING_SKIP, about_flag, add_config_flags, add_device_flag,
                                 check_input_files, check_output_path, output_folder, read_text_lines)
from starflow.cli.sample import add_decoding_flags, add_model_flags, check_no_prompt, load_pipeline

__all__ = ["register", "EDIT_SEPARATOR"]

EDIT_SEPARATOR = "[edit]"
"""The official editing prompts are ``"caption [edit] instruction"``."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``inpaint`` and ``edit`` to the subcommands."""
    p = sub.add_parser(
        "inpaint", help="fill a masked region of an image (training-free)",
        description="Training-free inpainting (STARFlow): the known pixels are run through the flow and teacher-forced "
                    "at every flow block while the masked tokens are sampled under the caption. Writes result.png "
                    "(result_NNN.png with --num_samples), input.png, mask.png (the overlay: red = generated) and "
                    "side_by_side.png and settings.json; the known pixels of the result are exactly the input's. "
                    "Images are written at the sampling size (as sample writes its images); side_by_side.png is "
                    "enlarged (nearest neighbour) to panels at least 64 pixels wide.")
    _add_common(p)
    p.add_argument("--caption", default=None,
                   help="caption of the completed image (required, but for unconditional models, which take none)")
    p.add_argument("--rounds", type=int, default=1,
                   help="sampling rounds K: each round after the first re-encodes the result and samples the masked "
                        "tokens again [default: 1]")
    p.add_argument("--num_samples", type=int, default=1, help="completions (seeds seed .. seed + N - 1) [default: 1]")
    p.set_defaults(func=run_inpaint)

    p = sub.add_parser(
        "edit", help="edit an image by inversion under a new caption (training-free)",
        description="Training-free editing (STARFlow): the image is mapped to noise under --source_caption and "
                    "decoded under --caption with guidance --cfg. With --mask only the masked region changes. "
                    "--caption_file takes the official 'caption [edit] instruction' lines: the caption is the source "
                    "caption and the instruction the target caption, one edit per line. Writes edit_NNN.png, "
                    "input.png, mask.png with a mask (the overlay: red = allowed to change), side_by_side.png (input, "
                    "the mask overlay, then every edit; panels enlarged (nearest neighbour) to at least 64 pixels "
                    "wide) and settings.json, the images at the sampling size. With --cfg > 0 (the config's cfg by "
                    "default) an edit to the source caption itself still changes the image: guidance pulls it toward the caption; --cfg 0 "
                    "gives the input back, up to the noise the model was trained with and the denoising step.")
    _add_common(p, mask_required=False, skip=SAMPLING_SKIP | {"temperature"})  # no sampling noise is drawn
    p.add_argument("--source_caption", default=None, help="caption describing the input image")
    p.add_argument("--caption", default=None, help="target caption")
    p.add_argument("--caption_file", default=None,
                   help="one edit per line: 'source caption [edit] target caption' (the official editing format)")
    p.set_defaults(func=run_edit)


def _add_common(p: argparse.ArgumentParser, mask_required: bool = True, skip: frozenset = SAMPLING_SKIP) -> None:
    add_model_flags(p)
    p.add_argument("--input_image", required=True, help="the image (any PIL-readable file; resized and centre-cropped "
                                                        "to the sampling size)")
    region = "region to generate" if mask_required else "region allowed to change [default: the whole image]"
    masks = p.add_mutually_exclusive_group(required=mask_required)
    masks.add_argument("--mask", default=None,
                       help=f"mask image, white = {region}: a pixel counts as white when its grey level, after the "
                            "resizing and cropping the input image gets, is above 127 (transparent pixels are "
                            "composited onto white, so they count as white too)")
    masks.add_argument("--mask_box", default=None, metavar="x0,y0,x1,y1",
                       help=f"rectangle in the input image's pixels (x1, y1 exclusive): the {region}")
    add_decoding_flags(p, p.prog.split()[-1])
    p.add_argument("--output_dir", default=f"outputs/{p.prog.split()[-1]}",
                   help=f"folder for the PNGs and settings.json [default: outputs/{p.prog.split()[-1]}]")
    add_device_flag(p, "cpu, cuda ... [default: cuda if available]")
    add_config_flags(p, skip=skip, reject=SAMPLING_REJECT)


def _load_inputs(args: argparse.Namespace, cfg, down: int):
    """``(image (1, C, H, W), pixel mask (1, 1, H, W) bool or None)`` at the sampling size of a VAE that downsamples
    ``down`` times (before the weights load: the factor the config's ``vae`` name implies)."""
    import torch
    from PIL import Image

    from starflow.data import load_image
    from starflow.data.aspect import aspect_to_size
    from starflow.data.images import image_size, kept_region

    size = aspect_to_size(args.aspect_ratio, cfg.img_size, down * cfg.patch_size)  # (H, W) pixels
    with about_flag("input_image", args.input_image):
        image = load_image(args.input_image, size, cfg.channel_size if down == 1 else 3)[None]
        width, height = image_size(args.input_image)  # its shape as sampled: EXIF rotation applied
    if args.mask:
        with about_flag("mask", args.mask):
            mask_w, mask_h = image_size(args.mask)
            if abs(mask_w * height - mask_h * width) > max(width, height, mask_w, mask_h):
                raise ValueError(f"--mask {args.mask}: {mask_w}x{mask_h} pixels, but the input image is {width}x{height}: "
                                 "each is resized and centre-cropped on its own, so masks of another shape would not "
                                 "line up; make the mask the image's size (or its shape)")
            mask = load_image(args.mask, size, 1)[None] > 0
        if not mask.any():
            raise ValueError(f"--mask {args.mask}: no white pixel at the sampling size {size}, so nothing would change "
                             "(white = the region to generate or change)")
        return image, mask
    if not args.mask_box:
        return image, None
    try:
        x0, y0, x1, y1 = (int(v) for v in args.mask_box.split(","))
    except ValueError:
        raise ValueError(f"--mask_box {args.mask_box}: expected four integers x0,y0,x1,y1") from None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"--mask_box {args.mask_box}: needs 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
                         "(the input image's pixels)")
    box = Image.new("L", (width, height), 0)
    box.paste(255, (x0, y0, x1, y1))
    with tempfile.TemporaryDirectory() as tmp:  # resized and cropped exactly as an image mask file would be
        box.save(Path(tmp) / "mask_box.png")
        mask = load_image(Path(tmp) / "mask_box.png", size, 1)[None] > 0
    if not mask.any():
        left, top, right, bottom = kept_region(width, height, size)  # load_image: cover the size, centre-crop
        span_x, span_y = (right - left) / size[1], (bottom - top) / size[0]
        inside = x0 >= left - span_x / 2 and y0 >= top - span_y / 2 and x1 <= right + span_x / 2 \
            and y1 <= bottom + span_y / 2
        why = (f"each sampled pixel spans {span_x:.3g} x {span_y:.3g} input pixels and is masked when the box "
               "covers about half of it: enlarge the box" if inside else
               f"the input is resized and centre-cropped to it, keeping x {left:.3g}..{right:.3g} and y "
               f"{top:.3g}..{bottom:.3g} of its pixels: put the box inside that region")
        raise ValueError(f"--mask_box {args.mask_box} covers no pixel at the sampling size {size}: {why}")
    return image, torch.as_tensor(mask)


def _start(args: argparse.Namespace, settings_of):
    """``(pipeline, config, checkpoint, settings, image, mask)``: the input files, the flags (``settings_of(config)``,
    the :class:`SampleSettings`) and the image and mask (:func:`_load_inputs`) are checked before the weights load."""
    from starflow.adapters.geometry import vae_geometry
    from starflow.distributed import init_distributed

    check_input_files(args, "input_image", "mask", "caption_file")
    check_output_path(args.output_dir)  # (created once the work is done; refused now, before the weights load)
    if getattr(args, "sample_batch_size", 1) < 1:
        raise ValueError(f"--sample_batch_size {args.sample_batch_size}: must be >= 1")
    dist = init_distributed(args.device)  # (one process: SINGLE_PROCESS in starflow.cli)
    checked = {}

    def check(cfg, checkpoint: Path) -> None:  # from the config alone, before the weights load
        if cfg.is_video:
            if getattr(args, "vid_size", None):  # (the flag made it one)
                raise ValueError(f"--vid_size {args.vid_size}: {args.command} works on image models, and the flag makes "
                                 f"{checkpoint} a video model: drop it")
            raise ValueError(f"{args.command} works on image models; {checkpoint} is a video model (use sample "
                             "--input_video for continuation and video-to-video)")
        if cfg.txt_size == 0 and args.command == "edit":
            raise ValueError(f"edit turns an image from one caption to another, and {checkpoint} is unconditional "
                             "(txt_size 0): use inpaint to redraw a region")
        if cfg.txt_size == 0:
            check_no_prompt(args, ["caption"])
        elif args.command == "inpaint" and args.caption is None:
            raise ValueError("inpaint needs --caption: the caption of the completed image")
        checked["settings"] = settings_of(cfg)
        checked["inputs"] = _load_inputs(args, cfg, vae_geometry(cfg.vae).downsample)

    pipe, cfg, checkpoint = load_pipeline(args, dist, check)
    if pipe.vae.downsample != vae_geometry(cfg.vae).downsample:  # a local VAE of another factor than its name implies
        checked["inputs"] = _load_inputs(args, cfg, pipe.vae.downsample)
    return (pipe, cfg, checkpoint, checked["settings"], *checked["inputs"])


def run_inpaint(args: argparse.Namespace) -> int:
    """Inpaint ``--input_image`` inside the mask; write the result, input, overlay and side-by-side PNGs."""
    from starflow.cli.sample import sample_settings
    from starflow.distributed import cleanup_distributed
    from starflow.sampling.io import (note_earlier_files, overlay_mask, save_image, save_panels, view_scale,
                                      write_settings)

    if args.num_samples < 1 or args.rounds < 1:
        raise ValueError(f"--num_samples {args.num_samples} / --rounds {args.rounds}: both must be >= 1")
    pipe, cfg, checkpoint, settings, image, mask = _start(args, lambda cfg: sample_settings(args, cfg))
    out, before = output_folder(args.output_dir)
    results = []
    for start in range(0, args.num_samples, args.sample_batch_size):
        n = min(args.sample_batch_size, args.num_samples - start)
        results += list(pipe.inpaint([args.caption or ""] * n, image.expand(n, -1, -1, -1), mask, settings,
                                     seeds=[cfg.seed + start + k for k in range(n)], rounds=args.rounds))
    names = ["result.png"] if len(results) == 1 else [f"result_{k:03d}.png" for k in range(len(results))]
    for name, r in zip(names, results):  # at the sampled size (as sample writes its images)
        save_image(r, out / name)
    save_image(image[0], out / "input.png")
    overlay = overlay_mask(image[0], mask[0])
    save_image(overlay, out / "mask.png")
    save_panels([image[0], overlay, *results], out / "side_by_side.png", view_scale(image.shape[-1]))
    write_settings(out, {"command": "inpaint", "caption": args.caption, "checkpoint": str(checkpoint),
                         "input_image": args.input_image, "mask": args.mask, "mask_box": args.mask_box,
                         "rounds": args.rounds, "num_samples": len(results), "seed": cfg.seed,
                         "settings": vars(settings), "config": cfg.to_dict()})
    print(f"wrote {', '.join(names)}, input.png, mask.png, side_by_side.png and settings.json to {out}")
    note_earlier_files(out, before)
    del pipe  # the model goes before the process group torchrun --nproc_per_node 1 created (cleanup_distributed)
    cleanup_distributed()
    return 0


def read_edits(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(source caption, target caption)`` pairs of ``--caption_file`` (``"caption [edit] instruction"`` lines) or
    of ``--source_caption``/``--caption``."""
    if args.caption_file:
        if args.caption or args.source_caption:
            raise ValueError("--caption_file holds the captions: drop --caption/--source_caption")
        pairs = []
        for k, line in enumerate(read_text_lines("caption_file", args.caption_file), 1):
            if not line.strip():
                continue
            if line.count(EDIT_SEPARATOR) != 1:
                raise ValueError(f"{args.caption_file} line {k}: expected 'caption {EDIT_SEPARATOR} instruction' (the "
                                 f"separator in lower case), got {line!r}")
            source, target = (part.strip() for part in line.split(EDIT_SEPARATOR))
            if not source or not target:
                empty = "caption (before" if not source else "instruction (after"
                raise ValueError(f"{args.caption_file} line {k}: the {empty} {EDIT_SEPARATOR}) is empty; write "
                                 "'caption [edit] instruction'")
            pairs.append((source, target))
        if not pairs:
            raise ValueError(f"{args.caption_file} holds no edit")
        return pairs
    if args.caption is None or args.source_caption is None:
        raise ValueError("edit needs --source_caption and --caption (or --caption_file with "
                         f"'caption {EDIT_SEPARATOR} instruction' lines)")
    return [(args.source_caption, args.caption)]


def run_edit(args: argparse.Namespace) -> int:
    """Edit ``--input_image`` from its source caption to each target caption; write one PNG per edit."""
    from starflow.cli.sample import sample_settings
    from starflow.distributed import cleanup_distributed
    from starflow.sampling.io import (note_earlier_files, overlay_mask, save_image, save_panels, view_scale,
                                      write_settings)

    pairs = read_edits(args)
    # the model's sampling temperature does not apply: editing decodes the image's own inverted noise
    pipe, cfg, checkpoint, settings, image, mask = _start(
        args, lambda cfg: dataclasses.replace(sample_settings(args, cfg), temperature=1.0))
    out, before = output_folder(args.output_dir)
    edits = []
    for start in range(0, len(pairs), args.sample_batch_size):
        chunk = pairs[start : start + args.sample_batch_size]
        edits += list(pipe.edit([s for s, _ in chunk], [t for _, t in chunk], image.expand(len(chunk), -1, -1, -1),
                                settings, mask=mask, seeds=[cfg.seed] * len(chunk)))
    names = [f"edit_{k:03d}.png" for k in range(len(edits))]
    for name, e in zip(names, edits):  # at the sampled size (as sample writes its images)
        save_image(e, out / name)
    save_image(image[0], out / "input.png")
    panels = [image[0], *edits]
    if mask is not None:  # the region allowed to change, over the input (as inpaint writes it)
        panels.insert(1, overlay_mask(image[0], mask[0]))
        save_image(panels[1], out / "mask.png")
    save_panels(panels, out / "side_by_side.png", view_scale(image.shape[-1]))
    write_settings(out, {"command": "edit", "edits": [{"file": n, "source_caption": s, "caption": t}
                                                      for n, (s, t) in zip(names, pairs)],
                         "checkpoint": str(checkpoint), "input_image": args.input_image, "mask": args.mask,
                         "mask_box": args.mask_box, "seed": cfg.seed, "settings": vars(settings),
                         "config": cfg.to_dict()})
    print(f"wrote {len(edits)} edit(s), input.png, {'mask.png, ' if mask is not None else ''}side_by_side.png and "
          f"settings.json to {out}")
    note_earlier_files(out, before)
    del pipe  # the model goes before the process group torchrun --nproc_per_node 1 created (cleanup_distributed)
    cleanup_distributed()
    return 0
