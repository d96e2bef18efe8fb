"""Writes scikit-learn's handwritten digits as captioned image folders for the demo model.

Usage (from the repository root, with `starflow` installed or `PYTHONPATH=.`):
    python scripts/prepare_digits.py --out data/digits --size 8
"""

import argparse

from starflow.data.digits import write_digits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(
            "Write the 1797 real handwritten digits of sklearn.datasets.load_digits() (8x8, greyscale) "
            "as two image folders OUT/train and OUT/test, each with PNGs and a metadata.jsonl "
            '({"file_name": ..., "text": "a handwritten digit 7", "label": 7}) readable by '
            "starflow.data.ImageFolder. The split is a fixed seeded permutation."
        )
    )
    parser.add_argument("--out", default="data/digits", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--size", type=int, default=8, help="image side in pixels, nearest-neighbour upscaled from 8 (default: %(default)s)"
    )
    parser.add_argument(
        "--test_fraction", type=float, default=0.2, help="share of digits in the test split (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split permutation (default: %(default)s)")
    parser.add_argument("--captions", choices=("sentence", "name"), default="sentence",
                        help="'sentence': \"a handwritten digit 7\"; 'name': \"seven\", the class names of "
                             "configs/digits.vocab for the class-conditional demo (default: %(default)s)")
    args = parser.parse_args()
    try:
        counts = write_digits(args.out, size=args.size, test_fraction=args.test_fraction, seed=args.seed,
                              captions=args.captions)
    except (ValueError, OSError) as e:  # a bad --size / --test_fraction, an --out that is a file: one line, no traceback
        parser.error(str(e))
    for split, n in counts.items():
        print(f"{args.out}/{split}: {n} images")


if __name__ == "__main__":
    main()
