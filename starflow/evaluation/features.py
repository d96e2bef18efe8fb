"""Feature extractors for distribution metrics (FID, KID, precision/recall) and image loading for them.

* ``inception``: the standard InceptionV3 pool features (2048-d) of FID, through ``torchmetrics``
  (``NoTrainInceptionV3``, which needs ``torch-fidelity`` and the ``pt_inception-2015-12-05`` weights); images
  are handed over as uint8 and resized to 299 by the library with the bilinear resize of TensorFlow 1
  (:data:`INCEPTION_RESIZE`), as the original FID code (TTUR) and torch-fidelity do: torchmetrics' default
  antialiased resize moves the Inception input by up to 80 of 255 at 512 px, so its FIDs are not the papers'.
* ``digits``: a small classifier of the real 8x8 handwritten digits (``ckpts/digit_features``, trained on the
  train split by ``scripts/train_digit_features.py``); its 64-d penultimate activations give an honest
  "FID in digit space" for the digit demos.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from starflow.assets import PACKAGE_CKPTS
from starflow.data.images import IMAGE_SUFFIXES, as_shown_8bit

__all__ = ["DigitClassifier", "DIGIT_FEATURES_DIR", "INCEPTION_RESIZE", "IMAGE_SUFFIXES", "list_images", "load_images", "build_extractor",
           "extract_features"]

DIGIT_FEATURES_DIR = PACKAGE_CKPTS / "digit_features"
DIGIT_SIDE = 8
INCEPTION_RESIZE = "tf1-bilinear"
"""How images reach Inception's 299 x 299 input (recorded in reference statistics and ``metrics.json``)."""


class DigitClassifier(nn.Module):
    """MLP over 8x8 greyscale digits in ``[0, 1]``: 64 -> 128 -> 64 (the features) -> 10 classes."""

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 8, 8)`` -> ``(B, 64)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 8, 8)`` -> class logits ``(B, 10)``."""
        return self.head(self.body(x))

    @classmethod
    def load(cls, folder: str | Path = DIGIT_FEATURES_DIR) -> "DigitClassifier":
        """The shipped classifier (``folder/model.safetensors``).

        Raises:
            FileNotFoundError: the weights are missing (the message says how to make them).
        """
        from safetensors.torch import load_file

        path = Path(folder) / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"digit feature weights {path} not found (they ship in ckpts/ of a source "
                                    "checkout of starflow): make them with `python scripts/train_digit_features.py "
                                    f"--out {Path(folder).resolve()}`")
        model = cls()
        model.load_state_dict(load_file(path))
        return model.eval()


def list_images(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted by path).

    Raises:
        FileNotFoundError: no such folder, or no image in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {'a file, not a folder' if folder.is_file() else 'no such folder'} of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_images(files: list[Path], mode: str, size: int | None = None) -> list[torch.Tensor]:
    """Each image as ``(C, H, W)`` uint8 of PIL ``mode`` ("RGB" or "L"), resized to ``size x size`` (box filter)
    if given, else at its own size (a set may mix sizes, e.g. aspect-ratio samples or a real reference set).

    Raises:
        OSError: an unreadable image, or one PIL refuses (over its size limit; a float image out of range), named.
    """
    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                img = as_shown_8bit(img, f).convert(mode)
                if size is not None and img.size != (size, size):
                    img = img.resize((size, size), Image.Resampling.BOX)
                a = np.array(img)  # a writable copy
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # (a float image out of range,
            raise OSError(f"cannot read image {f}: {err}; every image of a scored folder is read: replace or remove "
                          "it (in a set of generate-set, rerunning that command makes a damaged image again)") \
                from err  # (one over PIL's size limit)
        images.append(torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1)))
    return images


def build_extractor(name: str, device: torch.device | str = "cpu"):
    """``(extractor, image mode, image size or None)`` of a feature name: ``"digits"`` or ``"inception"``.

    Raises:
        ValueError: an unknown name.
        ModuleNotFoundError, FileNotFoundError: the Inception extractor's package or weights are missing (the
            message says what to install and where the weights go).
    """
    if name == "digits":
        return DigitClassifier.load().to(device), "L", DIGIT_SIDE
    if name == "inception":
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ModuleNotFoundError("--features inception (standard FID) needs torch-fidelity: pip install "
                                      "'starflow[eval]' or pip install torch-fidelity (it needs a torchvision build "
                                      "that works with your torch); --features digits works without it")
        try:
            # antialias=False: the TF1 resize (INCEPTION_RESIZE); torchmetrics before 1.8 has no flag and uses it
            tf1 = {"antialias": False} if "antialias" in inspect.signature(NoTrainInceptionV3).parameters else {}
            inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], **tf1)
            return inception.to(device), "RGB", None
        except Exception as err:  # noqa: BLE001 - torch-fidelity raises several types for missing weights
            raise FileNotFoundError(
                "the InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth) could not be loaded: torch-fidelity "
                "downloads them into $TORCH_HOME/hub/checkpoints/ on first use; offline, copy the file there "
                f"({type(err).__name__}: {err})") from err
    raise ValueError(f"--features {name!r}: use 'inception' (standard FID) or 'digits' (the digit demos)")


@torch.no_grad()
def extract_features(files: list[Path], name: str, batch_size: int = 256, device: torch.device | str = "cpu",
                     extractor=None) -> np.ndarray:
    """``(N, D)`` float64 features of the images ``files`` with the named extractor."""
    model, mode, size = extractor or build_extractor(name, device)
    out = []
    for i in range(0, len(files), batch_size):
        images = load_images(files[i : i + batch_size], mode, size)
        rows: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for j, image in enumerate(images):  # images of one size at a time: Inception resizes each to 299 itself,
            by_size.setdefault(tuple(image.shape), []).append(j)  # so a feature does not depend on its batch
        for index in by_size.values():
            batch = torch.stack([images[j] for j in index]).to(device)
            feats = model.features(batch.float() / 255.0) if name == "digits" else model(batch).reshape(len(index), -1)
            for j, row in zip(index, feats):
                rows[j] = row
        out.append(torch.stack(rows))
    return torch.cat(out).cpu().double().numpy()  # (float64 on the CPU: MPS has none)
