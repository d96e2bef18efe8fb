"""Quality of the shipped STARFlow-V demo on moving real handwritten digits.

For every prompt "a handwritten digit {d} moving {direction}" (10 digits x 4 directions) samples ``--per_prompt``
videos from a model folder (default: the shipped ``ckpts/demo_moving_digits``), at the trained length and at
``--long`` times that length (sliding window), and prints

* digit: the fraction of videos whose frames a classifier fitted on the real digits labels (majority over
  frames) as the prompted digit. Each frame is recentred on its circular centre of mass (the canvas is a
  torus) and cropped to 8x8; the classifier (logistic regression) is fitted on real train-split digits
  rendered and recentred the same way.
* direction: the fraction whose centre of mass moves in the prompted direction (mean frame-to-frame
  displacement on the torus, dominant axis and sign).

Rows per direction and a line per prompted digit follow each length.

    python benchmarks/moving_digits_quality.py [--checkpoint_path ckpts/demo_moving_digits] [--per_prompt 20] \
        [--temperature T]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from _args import at_least, positive_float
from sklearn.preprocessing import StandardScaler

from starflow.data import load_digit_split
from starflow.data.moving_digits import DIRECTIONS, circular_centre, moving_caption, recentre, render_clip
from starflow.sampling.io import to_uint8
from starflow.sampling.pipeline import Pipeline, SampleSettings

DEMO = Path(__file__).resolve().parents[1] / "ckpts" / "demo_moving_digits"


def fit_classifier(canvas: int, seed: int = 0):
    """Logistic regression on real digits rendered on the torus at random positions and recentred."""
    rng = np.random.default_rng(seed)
    data = {}
    for split in ("train", "test"):
        images, labels = load_digit_split(split)
        feats = [recentre(render_clip(img, 1, canvas, tuple(rng.integers(0, canvas, 2)), "left")[0]) for img in images]
        data[split] = (np.stack(feats).reshape(len(feats), -1).astype(np.float32), labels)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    clf.fit(*data["train"])
    return clf, clf.score(*data["test"])


def score(videos: np.ndarray, digits: list[int], directions: list[str], clf) -> tuple[np.ndarray, np.ndarray]:
    """Per video: prompted digit recognised (majority over frames), motion in the prompted direction."""
    n, t, h, w = videos.shape
    frames = np.stack([recentre(f) for f in videos.reshape(n * t, h, w)]).reshape(n * t, -1).astype(np.float32)
    pred = clf.predict(frames).reshape(n, t)
    digit_ok = np.array([np.bincount(p, minlength=10).argmax() == d for p, d in zip(pred, digits)])
    dir_ok = []
    for video, name in zip(videos, directions):
        centres = np.array([circular_centre(f) for f in video])
        step = (np.diff(centres, axis=0) + h / 2) % h - h / 2  # shortest displacement on the torus
        mean = step.mean(0)
        axis = int(np.abs(mean).argmax())
        moved = [0, 0]
        moved[axis] = int(np.sign(mean[axis]))
        dir_ok.append(tuple(moved) == DIRECTIONS[name])
    return digit_ok, np.array(dir_ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", default=str(DEMO))
    parser.add_argument("--per_prompt", type=at_least(1), default=20, help="videos per prompt [default: 20]")
    parser.add_argument("--long", type=at_least(2), default=3,
                        help="length factor of the long videos, >= 2 [default: 3]")
    parser.add_argument("--batch_size", type=at_least(1), default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=None,
                        help="guidance weight [default: the model's config cfg]")
    parser.add_argument("--temperature", type=positive_float, default=None,
                        help="sampling temperature [default: the model's config temperature]")
    args = parser.parse_args()

    pipe = Pipeline.from_pretrained(args.checkpoint_path)
    frames, canvas = pipe.config.vid_size[0], pipe.config.img_size
    clf, real_acc = fit_classifier(canvas, args.seed)
    prompts = [(d, name) for d in range(10) for name in DIRECTIONS for _ in range(args.per_prompt)]
    print(f"classifier accuracy on recentred real test digits: {real_acc:.3f}")
    cfg = pipe.config.cfg if args.cfg is None else args.cfg
    temperature = pipe.config.temperature if args.temperature is None else args.temperature
    print(f"{len(prompts)} videos per length ({args.per_prompt} per prompt), guidance {cfg}, "
          f"temperature {temperature}, model {args.checkpoint_path}")
    print(f"{'length':<20}{'frames':>7}{'digit':>8}{'direction':>11}{'seconds':>9}")
    for factor in (1, args.long):
        settings = SampleSettings(cfg=cfg, jacobi=True, target_length=frames * factor, temperature=temperature)
        start, videos = time.perf_counter(), []
        for i in range(0, len(prompts), args.batch_size):
            chunk = prompts[i : i + args.batch_size]
            seeds = [args.seed + i + j for j in range(len(chunk))]
            pixels = pipe([moving_caption(d, name) for d, name in chunk], settings, seeds=seeds)
            videos.append(to_uint8(pixels.flatten(0, 1))[..., 0].reshape(len(chunk), -1, canvas, canvas))
        seconds = time.perf_counter() - start
        digit_ok, dir_ok = score(np.concatenate(videos), [d for d, _ in prompts], [n for _, n in prompts], clf)
        label = "trained length" if factor == 1 else f"{factor}x (sliding window)"
        print(f"{label:<20}{frames * factor:>7}{digit_ok.mean():>8.3f}{dir_ok.mean():>11.3f}{seconds:>9.1f}")
        for name in DIRECTIONS:
            sel = np.array([n == name for _, n in prompts])
            print(f"  {name:<18}{'':>7}{digit_ok[sel].mean():>8.3f}{dir_ok[sel].mean():>11.3f}")
        per_digit = [digit_ok[np.array([d == k for d, _ in prompts])].mean() for k in range(10)]
        print("  digit agreement per digit 0-9: " + " ".join(f"{a:.2f}" for a in per_digit))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
