"""Train the digit classifier whose features give "FID in digit space" (``starflow evaluate --features digits``).

An MLP (64 -> 128 -> 64 -> 10, :class:`starflow.evaluation.features.DigitClassifier`) on the real 8x8 digits of
the train split (``sklearn.datasets.load_digits``, the split of ``scripts/prepare_digits.py``), Adam, full batch,
seeded. Prints the test-split accuracy and writes ``OUT/model.safetensors``.

    python scripts/train_digit_features.py --out ckpts/digit_features
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from starflow.data import load_digit_split
from starflow.evaluation.features import DigitClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ckpts/digit_features", help="output folder (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=600, help="full-batch Adam steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = {s: load_digit_split(s) for s in ("train", "test")}
    x = {s: torch.from_numpy(v[0]).float()[:, None] / 255.0 for s, v in data.items()}  # (N, 1, 8, 8) in [0, 1]
    y = {s: torch.from_numpy(v[1]).long() for s, v in data.items()}
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(args.epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x["train"]), y["train"])
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x["test"]).argmax(1) == y["test"]).float().mean().item()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    print(f"train loss {loss.item():.4f}, test accuracy {acc:.4f}; wrote {out / 'model.safetensors'}")


if __name__ == "__main__":
    main()
