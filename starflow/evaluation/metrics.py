"""Distribution and text-alignment metrics of a sample set, on precomputed features.

* FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) through ``torchmetrics`` (its
  ``FrechetInceptionDistance`` / ``KernelInceptionDistance``, fed precomputed features through an identity
  extractor), so the numbers are the library's;
* precision / recall of Kynkäänniemi et al. 2019 (k-nearest-neighbour manifolds, k = 3): no maintained
  library here implements it without ``torchvision``, so it is computed with ``torch.cdist``;
* CLIP score (Hessel et al. 2021) with a ``transformers`` CLIP: ``100 * max(cos(image, caption), 0)`` averaged
  over the samples (torchmetrics' ``CLIPScore`` does not run with transformers 5, whose feature getters return
  output objects).

Reference statistics are stored as ``.npz``: ``mu (D,)``, ``sigma (D, D)``, ``n`` and ``features (n, D)``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from starflow.evaluation.features import INCEPTION_RESIZE

__all__ = ["FeatureInput", "fid_from_features", "kid_from_features", "precision_recall", "save_stats", "load_stats",
           "clip_score", "load_clip", "PR_NEIGHBOURS"]


class FeatureInput(nn.Module):
    """The identity, announcing ``num_features``: lets torchmetrics take features instead of images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The identity: ``(N, D)`` features are passed through unchanged."""
        return x


def save_stats(path: str | Path, features: np.ndarray, extractor: str | None = None) -> Path:
    """Write ``mu``, ``sigma``, ``n``, the features of a reference set and the name of their ``extractor`` (with
    Inception's resize, :data:`~starflow.evaluation.features.INCEPTION_RESIZE`; checked when they are read back) to ``path`` (``.npz``, added if missing), atomically: a killed write leaves no truncated
    file under that name. Returns the path written."""
    from starflow.files import atomic_path

    features = np.asarray(features, dtype=np.float64)
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")  # (as np.savez names it)
    extra = {} if extractor is None else {"extractor": np.array(extractor)}
    if extractor == "inception":
        extra["resize"] = np.array(INCEPTION_RESIZE)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=features.mean(0), sigma=np.cov(features, rowvar=False), n=len(features), features=features,
                 **extra)
    return path


def load_stats(path: str | Path, extractor: str | None = None) -> dict[str, np.ndarray]:
    """``{"mu", "sigma", "n", "features"[, "extractor"]}`` of a ``.npz`` written by :func:`save_stats`.

    Args:
        path: the ``.npz``.
        extractor: the features the caller compares with: refused if the file records another extractor.

    Raises:
        FileNotFoundError: no such file; ValueError: not a stats file, the statistics of another extractor, or
            Inception statistics of another resize.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found (write them with --save_stats)")
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a reference statistics file written by --save_stats ({err})") from None
    missing = {"mu", "sigma", "n", "features"} - set(stats)
    if missing:
        raise ValueError(f"{path} is not a reference statistics file (missing {sorted(missing)})")
    made_with = str(stats["extractor"]) if "extractor" in stats else None
    if extractor is not None and made_with is not None and made_with != extractor:
        raise ValueError(f"{path} holds statistics of '{made_with}' features, and these are '{extractor}' features: "
                         f"pass --features {made_with}, or statistics made with --features {extractor}")
    if (made_with or extractor) == "inception" and str(stats.get("resize")) != INCEPTION_RESIZE:
        raise ValueError(f"{path} holds Inception statistics of images resized to 299 another way (starflow "
                         f"versions before the TensorFlow-1 resize of the original FID); they give other FIDs: "
                         "remake them with --save_stats")
    return stats


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two ``(N, D)`` feature sets (torchmetrics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=FeatureInput(real.shape[1])).double()
    metric.update(torch.from_numpy(np.asarray(real, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, dtype=np.float64)), real=False)
    return float(metric.compute())


KID_SUBSET_SIZE = 1000  # images per KID subset (the usual choice); fewer when a set is smaller


def kid_from_features(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = KID_SUBSET_SIZE,
                      seed: int = 0) -> tuple[float, float]:
    """``(mean, std)`` of the kernel inception distance over ``subsets`` random subsets of
    ``min(subset_size, len(real), len(fake))`` images each (torchmetrics, cubic kernel)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # it keeps every feature: these are ours, already in memory
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = KernelInceptionDistance(feature=FeatureInput(real.shape[1]), subsets=subsets, subset_size=size)
    # float64 features: the kernel sums run in float64, as the FID's (float32 left ~1e-7 of rounding noise)
    metric.update(torch.from_numpy(np.asarray(real, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, dtype=np.float64)), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


PR_BLOCK = 1024
"""Rows of the distance matrix precision/recall holds at once: ``PR_BLOCK x N`` float64 (0.4 GB at N = 50K)
instead of ``N x N`` (20 GB, and a copy in ``kthvalue``)."""


def _radii(features: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour besides itself, ``block`` rows at a time."""
    return torch.cat([torch.cdist(features[i : i + block], features).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(features), block)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """Whether each point lies in the union of the balls ``(centres, radii)``, ``block`` points at a time."""
    return torch.cat([(torch.cdist(points[i : i + block], centres) <= radii[None]).any(1)
                      for i in range(0, len(points), block)])


PR_NEIGHBOURS = 3  # k of the k-NN balls (Kynkaanniemi et al.): each set needs more than k images


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS, block: int = PR_BLOCK,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of samples inside the real
    manifold (union of k-NN balls) and the share of real points inside the samples' manifold.

    The distances are computed in float64 on ``device``, ``block`` rows at a time (:data:`PR_BLOCK`), so memory
    grows linearly with the number of features, not quadratically; time grows with ``N_real x N_fake`` (50K
    against 50K Inception features is minutes of CPU time: evaluate passes its ``--device``; an Apple GPU, which has
    no float64, computes on the CPU)."""
    device = torch.device(device)
    if device.type == "mps":  # no float64 on Apple GPUs
        device = torch.device("cpu")
    r = torch.from_numpy(np.asarray(real, dtype=np.float64)).to(device)
    f = torch.from_numpy(np.asarray(fake, dtype=np.float64)).to(device)
    r_radii, f_radii = _radii(r, k, block), _radii(f, k, block)
    precision = _inside(f, r, r_radii, block).double().mean()
    recall = _inside(r, f, f_radii, block).double().mean()
    return float(precision), float(recall)


def load_clip(model_name_or_path: str, device: torch.device | str = "cpu"):
    """``(CLIPModel, CLIPProcessor)`` of a ``transformers`` CLIP id or folder, in eval mode on ``device``.

    Raises:
        FileNotFoundError: the CLIP model is not available (offline: the files and where to put them).
    """
    from transformers import CLIPModel, CLIPProcessor

    from starflow.adapters.hub import hub_offline, network_failure

    try:
        model = CLIPModel.from_pretrained(model_name_or_path, local_files_only=hub_offline()).to(device).eval()
        processor = CLIPProcessor.from_pretrained(model_name_or_path, local_files_only=hub_offline())
    except OSError as err:
        network = network_failure(err)
        raise FileNotFoundError(
            f"CLIP model {model_name_or_path!r} not found: it needs config.json, the weights (model.safetensors) and "
            "the processor files (preprocessor_config.json, vocab.json, merges.txt, tokenizer_config.json); "
            f"download them with `hf download {model_name_or_path}` or pass --clip_model FOLDER"
            + ("" if network is None else f" (the Hugging Face Hub could not be reached: {network}; set "
               "HF_HUB_OFFLINE=1 to skip the connection attempts)")) from err
    return model, processor


@torch.no_grad()
def clip_score(files: list[Path], captions: list[str], model_name_or_path: str, batch_size: int = 64,
               device: torch.device | str = "cpu", loaded=None) -> float:
    """Mean CLIP score ``100 * max(cos(image, caption), 0)`` of images and their captions (a ``transformers``
    ``CLIPModel`` and ``CLIPProcessor``: the projected, normalised image and text embeddings), ``batch_size`` images
    at a time; captions are cut to the text model's context (77 tokens); ``loaded``: the :func:`load_clip` pair,
    if already loaded.

    Raises:
        FileNotFoundError: the CLIP model is not available (offline: the files and where to put them).
    """
    from PIL import Image

    from starflow.data.images import as_shown_8bit

    model, processor = loaded if loaded is not None else load_clip(model_name_or_path, device)
    context = model.config.text_config.max_position_embeddings  # (77; also where a tokenizer sets no limit)
    total = 0.0
    for i in range(0, len(files), batch_size):
        images = []
        for f in files[i : i + batch_size]:
            with Image.open(f) as img:
                images.append(as_shown_8bit(img, f).convert("RGB"))
        inputs = processor(text=captions[i : i + batch_size], images=images, return_tensors="pt", padding=True,
                           truncation=True, max_length=context).to(device)
        out = model(**inputs)
        cos = (out.image_embeds * out.text_embeds).sum(-1)  # both L2-normalised by CLIPModel
        total += float((100 * cos.clamp(min=0)).sum())
    return total / len(files)
