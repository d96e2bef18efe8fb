"""FID in digit-feature space of the shipped text-to-image demo, beside the real-vs-real floor and a bad model.

1. ``starflow generate-set`` samples ``--num_samples`` digits (prompts "a handwritten digit 0" ... "9", cycled)
   from the shipped ``ckpts/demo_digits`` and from the same architecture at its untrained initialisation;
2. ``starflow evaluate --features digits`` compares each set with the real test split (FID, KID, precision and
   recall in the 64-d feature space of the shipped digit classifier, ``ckpts/digit_features``);
3. the floor is the real test split against the real train split.

    python benchmarks/eval_demo.py [--num_samples 2000] [--cfg 1.0] [--work_dir runs/eval_demo] [--device cpu]

KID's std is over its subsets: with few samples KID is noise (it can be negative).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _args import at_least

from starflow.adapters import build_text_encoder, build_vae, vae_geometry
from starflow.assets import DEMO_DIR
from starflow.cli import main as starflow
from starflow.config import load_config
from starflow.data import write_digits
from starflow.models import STARFlow
from starflow.sampling.pipeline import Pipeline


def untrained_folder(out: Path) -> Path:
    """The demo's config with freshly initialised weights, as a model folder."""
    cfg = load_config(DEMO_DIR / "config.yaml")
    text = build_text_encoder(cfg, DEMO_DIR)
    torch.manual_seed(cfg.seed)
    model = STARFlow.from_config(cfg, txt_dim=text.hidden_size, vae_downsample=vae_geometry(cfg.vae).downsample)
    Pipeline(model, text, build_vae(cfg), cfg).save_pretrained(out)
    return out


def run(argv: list[str]) -> None:
    """``starflow ARGV`` in this process; a failure ends the benchmark with the command that failed."""
    if starflow(argv) != 0:
        sys.exit(f"failed: starflow {' '.join(argv)}")


def evaluate(samples: Path, reference: Path, out: Path) -> dict:
    run(["evaluate", "--samples", str(samples), "--reference", str(reference), "--features", "digits",
         "--metrics", "fid,kid,precision_recall", "--out", str(out)])
    return json.loads(out.read_text())["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=at_least(1), default=2000, help="samples per model [default: 2000]")
    parser.add_argument("--work_dir", default="runs/eval_demo")
    parser.add_argument("--cfg", type=float, default=1.0,
                        help="guidance weight of the demo's samples (its config says 2.0: sharper digits, less "
                             "diverse, a higher FID) [default: %(default)s]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the samples are drawn [default: cuda if available, else cpu]")
    parser.add_argument("--sample_batch_size", type=at_least(1), default=250, help="[default: 250]")
    args = parser.parse_args()
    work = Path(args.work_dir)
    write_digits(work / "digits")
    real_test, real_train = work / "digits" / "test", work / "digits" / "train"
    models = {"shipped demo": DEMO_DIR, "untrained initialisation": untrained_folder(work / "untrained")}
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(f"a handwritten digit {d}" for d in range(10)) + "\n")
    rows, seconds = {}, {}
    for name, folder in models.items():
        out = work / f"set_{name.split()[0]}_cfg{args.cfg:g}"
        start = time.perf_counter()
        run(["generate-set", "--checkpoint_path", str(folder), "--caption_file", str(prompts),
             "--num_samples", str(args.num_samples), "--out", str(out), "--sample_batch_size",
             str(args.sample_batch_size), "--cfg", str(args.cfg), "--device", args.device])
        seconds[name] = time.perf_counter() - start
        rows[name] = evaluate(out, real_test, out / "metrics.json")
    rows["real test vs real train (floor)"] = evaluate(real_test, real_train, work / "metrics_floor.json")
    print()
    print(f"digit-feature metrics against the real test split ({args.num_samples} samples per model at guidance "
          f"{args.cfg:g}; features: ckpts/digit_features)")
    print(f"{'set':<34}{'FID':>9}{'KID':>10}{'KID std':>9}{'precision':>11}{'recall':>8}{'x floor':>9}")
    floor = rows["real test vs real train (floor)"]["fid"]
    for name, m in rows.items():
        print(f"{name:<34}{m['fid']:>9.3f}{m['kid_mean']:>10.4f}{m['kid_std']:>9.4f}{m['precision']:>11.3f}"
              f"{m['recall']:>8.3f}{m['fid'] / floor:>9.2f}")
    print("generation: " + ", ".join(f"{n} {s:.1f} s" for n, s in seconds.items()))


if __name__ == "__main__":
    main()
