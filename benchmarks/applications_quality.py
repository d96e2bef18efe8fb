"""Quality of the training-free applications on the shipped demos (SPEC section 17), on real test data.

(a) Inpainting: ``--n`` real test digits with the lower half masked and the prompt "a handwritten digit k" for a
    *random* k: the fraction the shipped digit classifier (``ckpts/digit_features``) labels k, and the largest
    pixel error (0..255) in the known upper half. References put the number in context: the same images with the
    lower half of a real train-split digit k pasted in, either a random one (a completion drawn from the data) or
    the one whose upper half is nearest (a completion from the data that fits the known half); the model prompted
    with the true digit; and, as a bound, the fraction of images for which *some* real train-split lower half
    (of any digit) makes the classifier say k: a completion has to be picked for the classifier to get there.
(b) Editing: the same digits, inverted under their true caption and decoded under a random other digit: the
    fraction labelled as the target (and, separately, real "3" -> "8").
(c) Continuation: real moving-digit clips from the test split (``vid_size`` frames, random start and direction)
    continued by ``--continue_frames`` frames with the shipped moving-digits demo: digit and direction agreement
    of the new frames (the classifier of ``benchmarks/moving_digits_quality.py``).
(d) Video-to-video: real moving-digit clips redrawn by the ``video_to_video`` demo (``ckpts/demo_moving_digits_v2v``)
    as a random digit: digit and direction agreement, and how closely the result follows the source's path (mean
    centre-of-mass distance per frame), beside a real digit of the prompted class on the same path.

    python benchmarks/applications_quality.py [--n 200] [--cfg 2.0] [--rounds 1] [--clips 200] [--video_temperature T]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _args import at_least, positive_float

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from moving_digits_quality import fit_classifier, score  # noqa: E402

from starflow.data import load_digit_split  # noqa: E402
from starflow.data.moving_digits import DIRECTIONS, circular_centre, moving_caption, render_clip  # noqa: E402
from starflow.evaluation.features import DigitClassifier  # noqa: E402
from starflow.sampling.io import to_uint8  # noqa: E402
from starflow.sampling.pipeline import Pipeline, SampleSettings  # noqa: E402

DIGITS = ROOT / "ckpts" / "demo_digits"
MOVING = ROOT / "ckpts" / "demo_moving_digits"
V2V = ROOT / "ckpts" / "demo_moving_digits_v2v"


def caption(d: int) -> str:
    return f"a handwritten digit {d}"


def classify(clf: DigitClassifier, pixels: torch.Tensor) -> np.ndarray:
    """Labels of ``(B, 1, 8, 8)`` pixels in ``[-1, 1]``, quantised to 8 bits first (as saved files are)."""
    u8 = torch.from_numpy(to_uint8(pixels)[..., 0]).float()[:, None] / 255.0
    with torch.no_grad():
        return clf(u8).argmax(1).numpy()


def batched(fn, n: int, batch: int):
    return torch.cat([fn(slice(i, min(i + batch, n))) for i in range(0, n, batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=at_least(1), default=200,
                        help="real test digits for (a) and (b), at most the 359 of the test split [default: 200]")
    parser.add_argument("--cfg", type=float, default=None, help="guidance [default: each demo's config]")
    parser.add_argument("--rounds", type=at_least(1), default=1, help="inpainting rounds [default: 1]")
    parser.add_argument("--clips", type=at_least(1), default=200,
                        help="real clips to continue in (c) and to redraw in (d) [default: 200]")
    parser.add_argument("--continue_frames", type=at_least(1), default=8, help="frames added to each clip [default: 8]")
    parser.add_argument("--video_temperature", type=positive_float, default=None,
                        help="sampling temperature of (c) and (d) [default: each video demo's config, 0.6; 1 = the "
                             "official sampling]")
    parser.add_argument("--batch_size", type=at_least(1), default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    clf = DigitClassifier.load()

    pipe = Pipeline.from_pretrained(DIGITS)
    cfg = pipe.config.cfg if args.cfg is None else args.cfg
    settings = SampleSettings(cfg=cfg, jacobi=True, temperature=pipe.config.temperature)
    images, labels = load_digit_split("test")
    if args.n > len(images):
        parser.error(f"--n {args.n}: the test split has {len(images)} digits")
    pick = rng.choice(len(images), args.n, replace=False)
    x = torch.from_numpy(images[pick]).float()[:, None] / 127.5 - 1
    truth = labels[pick]
    target = rng.integers(0, 10, args.n)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[4:] = True
    seeds = list(range(args.seed, args.seed + args.n))
    print(f"(a) inpainting the lower half of {args.n} real test digits (guidance {cfg:g}, {args.rounds} round(s))")
    start = time.perf_counter()
    out = batched(lambda s: pipe.inpaint([caption(d) for d in target[s]], x[s], mask, settings, seeds=seeds[s],
                                         rounds=args.rounds), args.n, args.batch_size)
    seconds = time.perf_counter() - start
    known_error = np.abs(to_uint8(out)[:, :4].astype(int) - images[pick][:, :4, :, None].astype(int)).max()
    agree = (classify(clf, out) == target).mean()
    own = batched(lambda s: pipe.inpaint([caption(d) for d in truth[s]], x[s], mask, settings, seeds=seeds[s],
                                         rounds=args.rounds), args.n, args.batch_size)
    train, train_labels = load_digit_split("train")
    pasted, nearest = images[pick].copy(), images[pick].copy()
    reachable = np.zeros(args.n, dtype=bool)
    for i, d in enumerate(target):
        donors = train[train_labels == d]
        pasted[i, 4:] = donors[rng.integers(len(donors))][4:]
        upper_distance = ((donors[:, :4].astype(int) - images[pick][i, :4].astype(int)) ** 2).sum((1, 2))
        nearest[i, 4:] = donors[upper_distance.argmin()][4:]
        every = np.repeat(images[pick][i][None], len(train), 0)
        every[:, 4:] = train[:, 4:]
        reachable[i] = (classify(clf, torch.from_numpy(every).float()[:, None] / 127.5 - 1) == d).any()

    def agreement(u8: np.ndarray) -> float:
        return (classify(clf, torch.from_numpy(u8).float()[:, None] / 127.5 - 1) == target).mean()

    print(f"{'':<4}{'case':<72}{'agreement':>10}")
    print(f"{'':<4}{'random prompted digit':<72}{agree:>10.3f}")
    print(f"{'':<4}{'reference: real lower half of the prompted digit pasted in':<72}{agreement(pasted):>10.3f}")
    print(f"{'':<4}{'reference: lower half of the prompted digit whose upper half is nearest':<72}"
          f"{agreement(nearest):>10.3f}")
    print(f"{'':<4}{'reference: prompted with the true digit':<72}{(classify(clf, own) == truth).mean():>10.3f}")
    print(f"{'':<4}{'bound: some real lower half (any digit) makes the classifier say it':<72}{reachable.mean():>10.3f}")
    print(f"    known upper half: max pixel error {known_error} (0..255); {seconds:.1f} s")

    print(f"\n(b) editing {args.n} real test digits: true caption -> a random other digit (guidance {cfg:g})")
    other = (truth + rng.integers(1, 10, args.n)) % 10
    settings = dataclasses.replace(settings, temperature=1.0)  # editing decodes the images' own noise
    edited = batched(lambda s: pipe.edit([caption(d) for d in truth[s]], [caption(d) for d in other[s]], x[s],
                                         settings, seeds=seeds[s]), args.n, args.batch_size)
    print(f"    labelled as the target digit: {(classify(clf, edited) == other).mean():.3f}")
    threes = torch.from_numpy(images[labels == 3]).float()[:, None] / 127.5 - 1
    eights = batched(lambda s: pipe.edit([caption(3)] * len(threes[s]), [caption(8)] * len(threes[s]), threes[s],
                                         settings, seeds=list(range(args.seed + s.start, args.seed + s.stop))),
                     len(threes), args.batch_size)
    print(f"    real 3 -> 8 ({len(threes)} test digits): labelled 8 {(classify(clf, eights) == 8).mean():.3f}")

    video = Pipeline.from_pretrained(MOVING)
    frames, canvas = video.config.vid_size[0], video.config.img_size
    vcfg = video.config.cfg if args.cfg is None else args.cfg
    vclf, _ = fit_classifier(canvas, args.seed)
    names = list(DIRECTIONS)
    pick = rng.choice(len(images), args.clips, replace=args.clips > len(images))
    dirs = [names[k] for k in rng.integers(0, 4, args.clips)]
    clips = np.stack([render_clip(images[i], frames, canvas, tuple(rng.integers(0, canvas, 2)), d)
                      for i, d in zip(pick, dirs)])
    clip_px = torch.from_numpy(clips).float()[:, :, None] / 127.5 - 1
    vsettings = SampleSettings(cfg=vcfg, jacobi=True, target_length=args.continue_frames,
                               temperature=args.video_temperature or video.config.temperature)
    print(f"\n(c) continuing {args.clips} real moving-digit clips ({frames} frames) by {args.continue_frames} frames "
          f"(guidance {vcfg:g}, temperature {vsettings.temperature:g})")
    start = time.perf_counter()
    cont = batched(lambda s: video([moving_caption(labels[i], d) for i, d in zip(pick[s], dirs[s])], vsettings,
                                   seeds=list(range(args.seed + s.start, args.seed + s.stop)),
                                   input_video=clip_px[s]),
                   args.clips, args.batch_size)
    seconds = time.perf_counter() - start
    new = to_uint8(cont[:, frames:].flatten(0, 1))[..., 0].reshape(args.clips, -1, canvas, canvas)
    digit_ok, dir_ok = score(new, list(labels[pick]), dirs, vclf)
    print(f"    {'direction':<12}{'digit':>8}{'direction':>11}")
    for name in names:
        sel = np.array([d == name for d in dirs])
        if not sel.any():
            print(f"    {name:<12}{'-':>8}{'-':>11}   (no clip drew this direction)")
            continue
        print(f"    {name:<12}{digit_ok[sel].mean():>8.3f}{dir_ok[sel].mean():>11.3f}")
    print(f"    {'all':<12}{digit_ok.mean():>8.3f}{dir_ok.mean():>11.3f}   ({seconds:.1f} s)")

    if V2V.is_dir():
        video_to_video(args, rng, images, labels, vclf)
    else:
        print(f"\n(d) skipped: no video-to-video model at {V2V}")


def path_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per clip: the mean over frames of the torus distance (pixels) between the centres of mass of ``a`` and
    ``b``, both ``(N, T, H, W)``."""
    n, t, h, _ = a.shape
    ca = np.array([circular_centre(f) for f in a.reshape(n * t, h, h)]).reshape(n, t, 2)
    cb = np.array([circular_centre(f) for f in b.reshape(n * t, h, h)]).reshape(n, t, 2)
    d = (ca - cb + h / 2) % h - h / 2
    return np.sqrt((d ** 2).sum(-1)).mean(1)


def video_to_video(args, rng, images, labels, vclf) -> None:
    """(d): real test clips redrawn as a random digit by the video-to-video demo."""
    pipe = Pipeline.from_pretrained(V2V)
    frames, canvas = pipe.config.vid_size[0], pipe.config.img_size
    cfg = pipe.config.cfg if args.cfg is None else args.cfg
    settings = SampleSettings(cfg=cfg, jacobi=True, temperature=args.video_temperature or pipe.config.temperature)
    names = list(DIRECTIONS)
    pick = rng.choice(len(images), args.clips, replace=args.clips > len(images))
    dirs = [names[k] for k in rng.integers(0, 4, args.clips)]
    starts = [tuple(rng.integers(0, canvas, 2)) for _ in range(args.clips)]
    target = rng.integers(0, 10, args.clips)
    source = np.stack([render_clip(images[i], frames, canvas, st, d) for i, st, d in zip(pick, starts, dirs)])
    # reference: a real digit of the target class on the same path (what the training pairs show)
    donors = [rng.choice(np.flatnonzero(labels == k)) for k in target]
    real = np.stack([render_clip(images[j], frames, canvas, st, d) for j, st, d in zip(donors, starts, dirs)])
    print(f"\n(d) video-to-video: {args.clips} real moving-digit clips ({frames} frames) redrawn as a random digit "
          f"(guidance {cfg:g}, temperature {settings.temperature:g})")
    start = time.perf_counter()
    src_px = torch.from_numpy(source).float()[:, :, None] / 127.5 - 1
    out = batched(lambda s: pipe.video_to_video([moving_caption(k, d) for k, d in zip(target[s], dirs[s])],
                                                src_px[s], settings,
                                                seeds=list(range(args.seed + s.start, args.seed + s.stop))),
                  args.clips, args.batch_size)
    seconds = time.perf_counter() - start
    result = to_uint8(out.flatten(0, 1))[..., 0].reshape(args.clips, frames, canvas, canvas)
    digit_ok, dir_ok = score(result, list(target), dirs, vclf)
    err = path_error(result, source)
    ref_digit, _ = score(real, list(target), dirs, vclf)
    ref_err = path_error(real, source)
    print(f"    {'case':<50}{'digit':>8}{'direction':>11}{'path error (px)':>17}")
    print(f"    {'redrawn by the model':<50}{digit_ok.mean():>8.3f}{dir_ok.mean():>11.3f}{np.median(err):>17.2f}")
    print(f"    {'reference: a real digit of that class, same path':<50}{ref_digit.mean():>8.3f}{'':>11}"
          f"{np.median(ref_err):>17.2f}")
    print(f"    path error: median over clips of the mean centre-of-mass distance to the source; "
          f"within 1.5 px: {(err <= 1.5).mean():.3f} (reference {(ref_err <= 1.5).mean():.3f}); {seconds:.1f} s")


if __name__ == "__main__":
    main()
