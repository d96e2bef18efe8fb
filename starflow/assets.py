"""Where a config's assets come from: the text encoder and VAE named by ``text``/``vae``, and model folders.

One lookup order for sampling, sizing, downloading and training alike: the given folders (the config's
folder, the weights' folder), then ``./ckpts`` and the repository's ``ckpts/`` (where ``starflow download``
puts models, in subfolders named like their Hub ids), then the loaders' own Hugging Face cache and Hub.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

__all__ = ["PACKAGE_CKPTS", "DEMO_DIR", "DEMO_PROMPTS", "shipped", "TINY_TEXT_ENCODER", "WEIGHT_NAMES", "EMA_WEIGHT_NAMES", "asset_search_dirs",
           "resolve_asset", "find_weights", "absolute_local_asset"]

PACKAGE_CKPTS = Path(__file__).resolve().parents[1] / "ckpts"
"""The repository's ``ckpts/`` folder (the shipped demos; released weights go here too)."""
DEMO_DIR = PACKAGE_CKPTS / "demo_digits"
"""The shipped text-to-image demo that ``starflow sample`` uses without ``--checkpoint_path``."""
DEMO_PROMPTS = [f"a handwritten digit {d}" for d in range(10)]


def shipped(folder: Path, what: str = "shipped demo") -> Path:
    """``folder`` of ``ckpts/`` (:data:`DEMO_DIR`, the digit classifier, ...), checked to be there.

    Raises:
        FileNotFoundError: it is missing: the shipped checkpoints come with a source checkout (``git clone``, then
            ``pip install -e .``), not with a wheel installed from elsewhere.
    """
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"the {what} ({folder}) is not there: the shipped checkpoints come with a source "
                                "checkout of starflow (git clone, then pip install -e .), not with a wheel installed "
                                "from elsewhere; or pass a model with --checkpoint_path")
    return Path(folder)
TINY_TEXT_ENCODER = "tiny-t5"
"""Config ``text`` preset: a seeded random tiny T5 with the ByT5 byte tokenizer (no download)."""
WEIGHT_NAMES = ("model.safetensors", "model.pth")
EMA_WEIGHT_NAMES = ("ema.safetensors",)  # the moving average of a run's weights (config 'ema')
_SCALE_SUFFIX = re.compile(r"(:[0-9.]+)$")  # 'Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6'


def asset_search_dirs(*dirs: Path | str | None) -> list[Path]:
    """Folders searched for a config's ``text``/``vae`` entries, in order: the given ones (the config's
    folder, the weights' folder), then ``./ckpts`` and the repository's ``ckpts/``; ``None`` entries and
    repeats are dropped."""
    out: list[Path] = []
    for d in (*dirs, Path("ckpts"), PACKAGE_CKPTS):
        if d is not None and Path(d).resolve() not in [o.resolve() for o in out]:
            out.append(Path(d))
    return out


def resolve_asset(name: str | None, *dirs: Path | str | None) -> str | None:
    """A config path-or-hub-id, replaced by the first existing ``dir/name`` of :func:`asset_search_dirs`.

    A trailing ``:scale`` (the WAN2.2 temporal scale) is kept on the result. An absolute path that does not exist
    (recorded on another machine) is looked for by its trailing parts in the same folders, the longest first
    (``.../ckpts/stabilityai/sd-vae-ft-ema`` as ``stabilityai/sd-vae-ft-ema``, then ``sd-vae-ft-ema``), with a warning
    naming the substitute. Names found nowhere are returned unchanged: loaders then try the Hugging Face cache, then
    the Hub.
    """
    if name is None or name.lower() == "none":
        return name
    match = _SCALE_SUFFIX.search(name)
    suffix = match.group(1) if match else ""
    bare = name[: len(name) - len(suffix)]
    if Path(bare).is_absolute():
        if Path(bare).exists():
            return name
        # recorded on another machine (a model folder moved): its trailing parts in the search folders, longest first
        parts = Path(bare).parts[1:]
        for k in range(len(parts)):
            for d in asset_search_dirs(*dirs):
                candidate = d.joinpath(*parts[k:])
                if candidate.exists():
                    warnings.warn(f"{bare} is not on this machine; using {candidate}", stacklevel=2)
                    return str(candidate) + suffix
        return name
    for d in asset_search_dirs(*dirs):
        candidate = d / bare
        if candidate.exists():
            return str(candidate) + suffix
    return name


def absolute_local_asset(name: str | None, folder: Path | str) -> str | None:
    """A config's ``text``/``vae`` entry as an absolute path when it names a local file or folder beside the config
    (``folder``) or relative to the working folder; other entries (Hub ids, ``none``, ``tiny-t5``, absolute
    paths) unchanged. A run records it so, as it records ``init_from``: its resumes and exports then find the
    asset from any working folder. A trailing ``:scale`` is kept."""
    if name is None or name.lower() == "none" or Path(name).is_absolute():
        return name
    match = _SCALE_SUFFIX.search(name)
    suffix = match.group(1) if match else ""
    bare = name[: len(name) - len(suffix)]
    for candidate in (Path(folder) / bare, Path(bare)):
        if candidate.exists():
            return str(candidate.resolve()) + suffix
    return name


def _refuse_training_folder(folder: Path, ema: bool) -> None:
    """Raise ``FileNotFoundError`` naming what to pass instead when ``folder`` is a training run or one of its steps."""
    if (folder / "checkpoints").is_dir() or (folder / "trainer.json").is_file():
        ways = [f"pass {folder / 'model'}"] if (folder / "model").is_dir() else []
        ways.append(f"write a model folder with `starflow export {folder} OUT_FOLDER{' --ema' if ema else ''}`"
                    + (" (the moving average as its weights)" if ema else ""))
        kind = "checkpoint" if (folder / "trainer.json").is_file() else "run"
        raise FileNotFoundError(f"{folder} is a training {kind}, not a model folder: {', or '.join(ways)}")


def find_weights(folder: Path, ema: bool = False) -> Path:
    """The flow weights inside a model folder (``model.safetensors``, ``model.pth`` or a single ``*.pth``), or
    with ``ema`` the moving average (``ema.safetensors``).

    Raises:
        FileNotFoundError: none, or several candidates.
    """
    if ema:
        for name in EMA_WEIGHT_NAMES:
            if (folder / name).is_file():
                return folder / name
        _refuse_training_folder(folder, ema)
        raise FileNotFoundError(f"no EMA weights in {folder} (expected {EMA_WEIGHT_NAMES[0]}, written by runs with "
                                "config key 'ema'); drop --ema to use the weights")
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = [p for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pth")) if p.name not in EMA_WEIGHT_NAMES]
    if len(found) == 1:
        return found[0]
    _refuse_training_folder(folder, ema)
    raise FileNotFoundError(f"no weights in {folder}: expected one of {WEIGHT_NAMES} (or a single .pth/.safetensors)")
