"""Plot a training run's loss curve from its metrics.jsonl.

    python scripts/plot_metrics.py runs/demo_digits/metrics.jsonl --out docs/demo_training_curve.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.jsonl written by `starflow train` (or the run's logdir)")
    parser.add_argument("--out", default="training_curve.png", help="output PNG [default: training_curve.png]")
    parser.add_argument("--title", default="STARFlow training", help="plot title [default: STARFlow training]")
    args = parser.parse_args()
    path = Path(args.metrics)
    if path.is_dir() and (path / "metrics.jsonl").is_file():  # a run's logdir
        path = path / "metrics.jsonl"
    if not path.is_file():
        parser.error(f"{path}: no such file (a run's logdir or its metrics.jsonl)")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the line a running (or killed) training is writing
                break
            parser.error(f"{path}:{number}: not a JSON line; is this a metrics.jsonl of `starflow train`?")
    rows = [r for r in rows if "bits_per_dim" in r and "step" in r]
    if not rows:
        parser.error(f"{path}: no logged step (train until the first log_freq step)")
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, [r["bits_per_dim"] for r in rows], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits/dim (noised data in [-1, 1])")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:gray", lw=0.8, ls="--")
    ax2.set_ylabel("learning rate", color="tab:gray")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out} ({len(rows)} points)")


if __name__ == "__main__":
    main()
