"""Make the moving-digits video folders for the STARFlow-V demo (real handwritten digits, no download).

    python scripts/prepare_moving_digits.py --out data/moving_digits

writes data/moving_digits/{train,test}/ with lossless H.264 clips (12 frames, 12x12, 8 fps) and metadata.jsonl
captions such as "a handwritten digit 3 moving left".

    python scripts/prepare_moving_digits.py --out data/moving_digits_v2v --video_to_video --frames 4 --clips_per_digit 4

writes source/target pairs for a video_to_video fine-tune (configs/demo_moving_digits_v2v.yaml).
"""
import argparse
import time

from starflow.data.moving_digits import DIRECTIONS, write_moving_digits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/moving_digits", help="output folder [default: data/moving_digits]")
    p.add_argument("--frames", type=int, default=12, help="frames per source clip [default: 12]")
    p.add_argument("--canvas", type=int, default=12, help="canvas side in pixels [default: 12]")
    p.add_argument("--fps", type=int, default=8, help="frame rate [default: 8]")
    p.add_argument("--clips_per_digit", type=int, default=2, help="clips (directions) per real digit [default: 2]")
    p.add_argument("--video_to_video", action="store_true",
                   help="pairs for a video_to_video model: each file holds the target clip (another real digit on the "
                        "same path, the caption's digit), then the source clip, --frames each (4 for "
                        "configs/demo_moving_digits_v2v.yaml; longer pairs are cut at the same times in both halves)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for flag, least in (("frames", 1), ("canvas", 8), ("fps", 1), ("clips_per_digit", 1)):
        if getattr(a, flag) < least:
            p.error(f"--{flag} {getattr(a, flag)}: must be >= {least}" + (" (the digits are 8x8 pixels)" if flag == "canvas"
                                                                             else ""))
    if a.clips_per_digit > len(DIRECTIONS):
        p.error(f"--clips_per_digit {a.clips_per_digit}: each clip of a digit moves in its own direction; there are "
                f"{len(DIRECTIONS)}")
    t = time.perf_counter()
    try:
        counts = write_moving_digits(a.out, a.frames, a.canvas, a.fps, a.clips_per_digit, a.seed, a.video_to_video)
    except (ValueError, OSError) as e:  # e.g. an --out that is a file: one line, no traceback
        p.error(str(e))
    print(f"wrote {counts} clips to {a.out} in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
