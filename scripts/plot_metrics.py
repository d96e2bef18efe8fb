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
    parser.add_argument("metrics", help="metrics.jsonl written by `starflow train`")
    parser.add_argument("--out", default="training_curve.png", help="output PNG")
    parser.add_argument("--title", default="STARFlow training")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.metrics).read_text().splitlines() if line.strip()]
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
