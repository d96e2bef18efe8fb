"""``starflow evaluate``: a sample set against a reference set or its cached statistics, to ``metrics.json``."""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from starflow.data.video import VIDEO_SUFFIXES
from starflow.evaluation.features import INCEPTION_RESIZE, build_extractor, extract_features, list_images
from starflow.evaluation.generate import SET_FILE, WEIGHTS_SHA, read_set_captions, read_set_record, sample_path
from starflow.evaluation.metrics import (KID_SUBSET_SIZE, PR_NEIGHBOURS, clip_score, fid_from_features,
                                         kid_from_features, load_clip, load_stats, precision_recall, save_stats)
from starflow.files import check_file_target, write_text_atomic

__all__ = ["METRICS", "evaluate_samples", "format_results"]

METRICS = ("fid", "kid", "precision_recall", "clip")
CLIP_DEFAULT = "openai/clip-vit-large-patch14"


def _versions() -> dict[str, str]:
    import numpy
    import torch
    import torchmetrics
    import transformers

    import starflow

    return {"starflow": starflow.__version__, "torch": torch.__version__, "torchmetrics": torchmetrics.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}


def _set_origin(path: Path) -> dict[str, Any] | None:
    """What made a ``generate-set`` folder, from its ``set.json`` (checkpoint, weights' SHA-256, seed, settings);
    None for a plain folder of images."""
    if not path.is_file():
        return None
    made = read_set_record(path.parent)
    return {k: made[k] for k in ("checkpoint", "ema", WEIGHTS_SHA, "seed", "settings", "num_samples") if k in made}


def evaluate_samples(samples: str | Path, reference: str | Path | None, metrics: list[str], *,
                     features: str = "inception", clip_model: str = CLIP_DEFAULT, save_stats_to: str | Path | None = None,
                     batch_size: int = 256, device: str = "cpu", out: str | Path | None = None) -> dict[str, Any]:
    """Compute ``metrics`` of the images in ``samples`` and write them to ``out`` (default
    ``samples/metrics.json``).

    Args:
        samples: a folder of images (a ``generate-set`` folder: its ``captions.jsonl`` gives CLIP's captions).
        reference: a folder of real images, or a ``.npz`` of :func:`~starflow.evaluation.metrics.save_stats`
            (needed by fid, kid, precision_recall).
        metrics: names from :data:`METRICS`.
        features: ``"inception"`` (standard) or ``"digits"`` (the digit demos).
        clip_model: a ``transformers`` CLIP id or folder.
        save_stats_to: write the reference's statistics there (to reuse as ``reference``).
        batch_size, device: feature extraction.
        out: where ``metrics.json`` goes.

    Returns:
        The record written: ``{"metrics": {...}, "samples": n, "sample_set": ..., "reference": ...,
        "reference_images": m, "kid_subset_size": ..., "features": ..., "kept": [...], ...}``; ``sample_set`` is
        what made a ``generate-set`` folder (checkpoint, weights' SHA-256, seed, settings; None for a plain folder);
        ``kept`` names the metrics of an earlier file at ``out`` for the same set, reference and models that this
        run did not compute and keeps (an earlier file of other settings is replaced).

    Raises:
        ValueError: unknown metric, a reference needed but missing (or given where no metric uses it), an
            unfinished ``generate-set`` folder (fewer images than its ``set.json`` says), a folder of videos, too few
            images for precision/recall, ``batch_size < 1``, or an output path whose folder is missing;
            FileNotFoundError: missing folders, models or weights. All checked before anything is computed or
            written.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"--metrics {','.join(metrics)}: choose from {','.join(METRICS)}")
    files, made = _set_files(samples)
    _check_folders(samples, reference, batch_size)
    distribution = [m for m in metrics if m != "clip"]
    _check_reference(metrics, reference, save_stats_to)
    path = Path(out) if out else Path(samples) / "metrics.json"
    for flag, target in (("--out", path), ("--save_stats", save_stats_to)):
        if target is not None:
            check_file_target(target, flag)
    if save_stats_to and reference is not None and str(reference).endswith(".npz"):
        raise ValueError("--save_stats writes the statistics of a reference folder; --reference is already a .npz")
    stats = _reference_stats(distribution, len(files), reference, features)
    captions = _clip_captions(samples, files) if "clip" in metrics else None
    extractor = build_extractor(features, device) if distribution else None  # fails before any work
    clip = load_clip(clip_model, device) if captions is not None else None
    start = time.perf_counter()
    results: dict[str, float] = {}
    real_count = kid_subset = None
    if distribution:
        real = stats["features"] if stats is not None else \
            extract_features(list_images(reference), features, batch_size, device, extractor)
        if save_stats_to:
            save_stats(save_stats_to, real, features)
        fake = extract_features(files, features, batch_size, device, extractor)
        results = _distribution_metrics(distribution, real, fake, reference, features, device)
        real_count = len(real)
        kid_subset = min(KID_SUBSET_SIZE, len(real), len(fake)) if "kid" in metrics else None
    if captions is not None:
        results["clip_score"] = clip_score(files, captions, clip_model, batch_size=batch_size, device=device,
                                           loaded=clip)
    record = {"metrics": results, "samples": len(files), "samples_dir": str(samples),
              "files": _files_fingerprint(files),
              "sample_set": _set_origin(made),
              "reference": None if reference is None else str(reference), "features": features if distribution else None,
              "inception_resize": INCEPTION_RESIZE if distribution and features == "inception" else None,
              "reference_images": real_count, "kid_subset_size": kid_subset,
              "clip_model": clip_model if captions is not None else None, "seconds": time.perf_counter() - start,
              "saved_stats": None if save_stats_to is None else str(save_stats_to),
              "versions": _versions()}
    record["kept"] = _keep_earlier_metrics(path, record)
    write_text_atomic(path, json.dumps(record, indent=1))
    record["path"] = str(path)
    return record


_SAME_SET_KEYS = ("samples", "sample_set", "files", "reference", "reference_images", "features",
                  "inception_resize", "kid_subset_size", "clip_model")
_SAME_FILES_KEYS = ("samples", "sample_set", "files")  # what the images are: equal in both files, always


def _files_fingerprint(files: list[Path]) -> str:
    """SHA-256 of the scored images' names, sizes and modification times (a rewritten image changes it)."""
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _keep_earlier_metrics(path: Path, record: dict[str, Any]) -> list[str]:
    """Add to ``record["metrics"]`` the metrics of an earlier ``metrics.json`` at ``path`` that this run did not
    compute, when that file scored the same images (count, set record, file fingerprint) against the same reference
    with the same models (a run of other ``--metrics`` then adds to the file instead of losing its values); returns
    their names. A file of other images or settings is replaced."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(earlier, dict) or not isinstance(earlier.get("metrics"), dict):
        return []
    same = all(earlier.get(k) == record[k] or None in (earlier.get(k), record[k]) for k in _SAME_SET_KEYS
               if k not in _SAME_FILES_KEYS) and all(earlier.get(k) == record[k] for k in _SAME_FILES_KEYS)
    kept = [k for k in earlier["metrics"] if k not in record["metrics"]] if same else []
    if kept:
        record["metrics"] = {**{k: earlier["metrics"][k] for k in kept}, **record["metrics"]}
        for k in _SAME_SET_KEYS:  # (what the kept values were computed with, where this run used none)
            if record[k] is None:
                record[k] = earlier.get(k)
    return kept


def _set_files(samples: str | Path) -> tuple[list[Path], Path]:
    """The images of ``samples`` to score, and its ``set.json`` path: a ``generate-set`` folder is scored whole (its
    own images only), never as the part a killed run made."""
    files = list_images(samples)
    made = Path(samples) / SET_FILE
    if made.is_file():
        wanted = read_set_record(samples)["num_samples"]
        ours = {sample_path(samples, i) for i in range(wanted)}
        others = [f for f in files if f not in ours]
        files = [f for f in files if f in ours]
        if len(files) < wanted:
            raise ValueError(f"{samples} holds {len(files)} of the {wanted} images of its sample set ({SET_FILE}): "
                             "rerun its `starflow generate-set` command to finish it (it resumes), then evaluate")
        if others:  # (another set made inside it, copies, ...): not samples of this set
            warnings.warn(f"{samples}: {len(others)} image(s) that are not part of its sample set ({others[0]}, ...) "
                          "are left out", stacklevel=3)
    return files, made


def _check_folders(samples: str | Path, reference: str | Path | None, batch_size: int) -> None:
    """Refuse nested folders, a batch size below 1 and a folder of videos."""
    if reference is not None and not str(reference).endswith(".npz"):
        a, b = Path(samples).resolve(), Path(reference).resolve()
        if a in b.parents or b in a.parents:  # (folders are listed with their subfolders; the same one is a choice)
            inner, outer = (f"--samples {a}", f"--reference {b}") if b in a.parents else \
                (f"--reference {b}", f"--samples {a}")
            raise ValueError(f"{inner} is inside {outer}: its images would be counted on both sides; keep the two "
                             "folders apart")
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size}: must be >= 1")
    videos = [p.name for p in Path(samples).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES]
    if videos:
        raise ValueError(f"{samples} holds videos ({videos[0]}, ...): evaluate scores images (its PNGs would be the "
                         "videos' poster strips); pass a folder of images")


def _check_reference(metrics: list[str], reference: str | Path | None, save_stats_to: str | Path | None) -> None:
    """Refuse a reference (or ``--save_stats``) that ``metrics`` do not use or lack, by their names alone."""
    distribution = [m for m in metrics if m != "clip"]
    if distribution and reference is None:
        raise ValueError(f"{', '.join(distribution)} compare with real images: pass --reference FOLDER_OR_STATS.npz")
    if not distribution and (reference is not None or save_stats_to):
        raise ValueError(f"--metrics {','.join(metrics)} uses no real images: drop --reference and --save_stats, or "
                         "add fid, kid or precision_recall")
    if save_stats_to is not None and not str(save_stats_to).endswith(".npz"):
        raise ValueError(f"--save_stats {save_stats_to}: name the file FILE.npz (--reference reads statistics from a "
                         ".npz)")


def _reference_stats(distribution: list[str], samples: int, reference: str | Path | None,
                     features: str) -> dict | None:
    """The reference's saved statistics when it is a ``.npz`` (small: read up front), else None, once the sets are
    large enough for the ``distribution`` metrics."""
    if not distribution:
        return None
    ref_is_stats = str(reference).endswith(".npz")
    stats = load_stats(reference, features) if ref_is_stats else None
    need = {"fid": (2, "a covariance"), "kid": (2, "pairs of images"),  # the fewest images per set each is defined for
            "precision_recall": (PR_NEIGHBOURS + 1, f"k-NN balls of k = {PR_NEIGHBOURS}")}
    metric = max(distribution, key=lambda m: need[m][0])
    n_ref = len(stats["features"]) if stats is not None else len(list_images(reference))
    few = [(name, n) for name, n in (("samples", samples), ("reference", n_ref)) if n < need[metric][0]]
    if few:
        raise ValueError(f"{metric} needs at least {need[metric][0]} images per set ({need[metric][1]}); the "
                         f"{few[0][0]} set holds {few[0][1]}")
    return stats


def _clip_captions(samples: str | Path, files: list[Path]) -> list[str]:
    """Each sample's caption from the set's ``captions.jsonl``, for the CLIP score."""
    table = read_set_captions(samples)
    missing = [f.name for f in files if f.name not in table]
    if missing:
        raise ValueError(f"clip needs each sample's caption: {Path(samples) / 'captions.jsonl'} lacks "
                         f"{missing[:3]} (make the set with `starflow generate-set`)")
    captions = [table[f.name] for f in files]
    if not any(c.strip() for c in captions):
        raise ValueError(f"clip compares images with their captions, and the samples in {samples} have none (an "
                         "unconditional model's set): drop clip from --metrics")
    return captions


def _distribution_metrics(distribution: list[str], real: np.ndarray, fake: np.ndarray, reference: str | Path,
                          features: str, device: str) -> dict[str, float]:
    """FID, KID and precision/recall (those asked for) of sample features ``fake`` ``(n, F)`` against ``real``
    ``(m, F)``."""
    if real.shape[1] != fake.shape[1]:  # statistics saved before the extractor was recorded
        raise ValueError(f"{reference} holds {real.shape[1]}-dimensional features and '{features}' gives "
                         f"{fake.shape[1]}: they come from another extractor; pass the matching --features")
    results: dict[str, float] = {}
    if "fid" in distribution:
        if min(len(real), len(fake)) < real.shape[1]:  # (usual sets: 10K or 50K against 2,048 dimensions)
            warnings.warn(f"FID from {len(fake)} samples and {len(real)} reference images, fewer than the "
                          f"{real.shape[1]} feature dimensions on at least one side: "
                          "their covariance is singular and the FID strongly biased upwards; compare only with "
                          "FIDs of as many images", stacklevel=3)
        results["fid"] = fid_from_features(real, fake)
    if "kid" in distribution:
        results["kid_mean"], results["kid_std"] = kid_from_features(real, fake)
        if len(real) == len(fake) <= KID_SUBSET_SIZE:
            warnings.warn(f"KID from {len(fake)} samples and as many reference images: its subsets (of {len(fake)}, "
                          f"the subset size of {KID_SUBSET_SIZE} capped) are the whole sets, so kid_std is ~0 and does "
                          "not measure its spread; compare KIDs of larger sets", stacklevel=3)
    if "precision_recall" in distribution:
        results["precision"], results["recall"] = precision_recall(real, fake, device=device)
    return results


def format_results(record: dict[str, Any]) -> str:
    """The table ``starflow evaluate`` prints."""
    lines = [f"{record['samples']} samples from {record['samples_dir']}"
             + (f" against {record['reference']} ({record['features']} features)" if record["reference"] else "")]
    lines.append(f"{'metric':<16}{'value':>14}")
    kept = record.get("kept") or []
    for name, value in record["metrics"].items():
        lines.append(f"{name:<16}{value:>14.5g}" + ("  (kept from the earlier file)" if name in kept else ""))
    lines.append(f"written to {record['path']}" + (f"; reference statistics in {record['saved_stats']}"
                                                    if record.get("saved_stats") else ""))
    return "\n".join(lines)
