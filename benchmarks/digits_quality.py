"""Quality of the shipped text-to-image demo on the real handwritten digits.

Fits a classifier on the real digits' train split (sklearn ``load_digits``, the split of
``scripts/prepare_digits.py``), samples ``--per_digit`` images per prompt "a handwritten digit {d}" (for a
class-conditional model: its class names, "zero" ... "nine") from a model folder (default: the shipped
``ckpts/demo_digits``) at its config's guidance weight, and prints
the fraction the classifier labels as the prompted digit, plus the test split's bits/dim.

    python benchmarks/digits_quality.py [--checkpoint_path ckpts/demo_digits] [--per_digit 100]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from _args import at_least, positive_float
from sklearn.preprocessing import StandardScaler

from starflow.assets import DEMO_DIR
from starflow.data import load_digit_split, write_digits
from starflow.evaluation import evaluate_nll
from starflow.sampling.io import to_uint8
from starflow.sampling.pipeline import Pipeline, SampleSettings


def fit_classifier():
    """Logistic regression on the real train split (pixels 0..255 flattened); returns it and its test accuracy."""
    x_train, y_train = load_digit_split("train")
    x_test, y_test = load_digit_split("test")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x_train.reshape(len(x_train), -1).astype(np.float32), y_train)
    acc = clf.score(x_test.reshape(len(x_test), -1).astype(np.float32), y_test)
    return clf, acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", default=str(DEMO_DIR))
    parser.add_argument("--per_digit", type=at_least(1), default=100, help="samples per digit [default: 100]")
    parser.add_argument("--cfg", type=float, default=None, help="guidance weight [default: the config's cfg]")
    parser.add_argument("--temperature", type=positive_float, default=None,
                        help="sampling temperature [default: the config's temperature]")
    parser.add_argument("--batch_size", type=at_least(1), default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    clf, real_acc = fit_classifier()
    pipe = Pipeline.from_pretrained(args.checkpoint_path)
    if (pipe.config.img_size, pipe.config.channel_size, pipe.config.is_video) != (8, 1, False):
        parser.error(f"--checkpoint_path {args.checkpoint_path}: a model of 8x8 greyscale digit images is needed (the "
                     f"classifier's input), this one makes {pipe.config.img_size}x{pipe.config.img_size}x"
                     f"{pipe.config.channel_size}{' videos' if pipe.config.is_video else ''}")
    cfg_w = pipe.config.cfg if args.cfg is None else args.cfg
    temperature = pipe.config.temperature if args.temperature is None else args.temperature
    settings = SampleSettings(cfg=cfg_w, jacobi=True, temperature=temperature)
    labels = [d for d in range(10) for _ in range(args.per_digit)]
    classes = getattr(pipe.text_encoder, "names", None)  # a class-conditional model: prompt with the class names
    prompts = [classes[d] if classes else f"a handwritten digit {d}" for d in labels]
    start = time.perf_counter()
    images = []
    for i in range(0, len(prompts), args.batch_size):
        seeds = [args.seed + j for j in range(i, min(i + args.batch_size, len(prompts)))]
        images.append(to_uint8(pipe(prompts[i : i + args.batch_size], settings, seeds=seeds)))
    seconds = time.perf_counter() - start
    pixels = np.concatenate(images)[..., 0].reshape(len(prompts), -1).astype(np.float32)
    pred = clf.predict(pixels)
    hits = pred == np.array(labels)
    with tempfile.TemporaryDirectory() as tmp:
        write_digits(tmp, captions="name" if classes else "sentence")
        nll = evaluate_nll(pipe, f"{tmp}/test", progress=False, seed=args.seed)

    print(f"model: {args.checkpoint_path}   guidance cfg = {cfg_w}   temperature {temperature:g}   samples: {len(prompts)} in {seconds:.1f} s")
    print(f"classifier: logistic regression on the real train split, real test accuracy {real_acc:.3f}")
    print()
    print(f"{'digit':>5} | {'agreement':>9}")
    print("-" * 18)
    for d in range(10):
        print(f"{d:>5} | {hits[np.array(labels) == d].mean():>9.3f}")
    print("-" * 18)
    print(f"{'all':>5} | {hits.mean():>9.3f}   (target >= 0.85)")
    print()
    print(f"test split ({nll.images} images): {nll.bits_per_dim:.4f} bits/dim of the noised pixels in [-1, 1]; "
          f"{nll.pixel_bits_per_dim:.4f} bits/dim on the 8-bit scale (noise_std {pipe.config.noise_std})")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
