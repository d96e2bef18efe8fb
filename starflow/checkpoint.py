"""Weights I/O in the layout of the released STARFlow / STARFlow-V checkpoints.

The official files (``starflow_3B_t2i_256x256.pth``, ``starflow-v_7B_t2v_caus_480p_v3.pth``, Hugging Face
repo ``apple/starflow``) are plain ``torch.save`` state dicts whose names follow the module tree of
:class:`~starflow.models.STARFlow` (SPEC section 3), plus a few deprecated buffers with no effect.
:func:`drop_deprecated` is the one place that removes them; every real parameter must then load with
``strict=True``. Loading never leaves a half-loaded model: the file is read and its layout compared
(names and shapes) before the first parameter is touched. A meta-device model costs only the file's
size, memory-mapped::

    with torch.device("meta"):
        model = STARFlow.from_config("configs/starflow_3B_t2i_256x256.yaml", txt_dim=2048, vae_downsample=8)
    load_weights(model, "ckpts/starflow_3B_t2i_256x256.pth", assign=True)
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

import safetensors.torch
import torch
from torch import nn

from starflow.files import atomic_scratch_path, follow_umask

__all__ = ["DEPRECATED_BUFFERS", "WEIGHT_SUFFIXES", "CheckpointError", "LayoutError", "LayoutReport", "drop_deprecated",
           "damage_reason", "refused_global",
           "is_deprecated", "read_state_dict", "read_shapes", "load_weights", "compare_layout", "save_weights",
           "convert_checkpoint"]

DEPRECATED_BUFFERS: tuple[str, ...] = ("var", "blocks.{i}.attn_mask", "feat_rope.freqs_cos", "feat_rope.freqs_sin")
"""Names of the official checkpoints' buffers that have no effect (``{i}`` is a block index)."""

_DEPRECATED_RE = re.compile("|".join(re.escape(p).replace(re.escape("{i}"), r"\d+") for p in DEPRECATED_BUFFERS))
_WRAPPER_KEYS = ("state_dict", "model")  # {'model': sd} / {'state_dict': sd} training checkpoints
_PREFIX_RE = re.compile(r"^(?:module\.|_orig_mod\.)+")  # DDP / torch.compile wrappers
_LIST_LIMIT = 20  # names shown per category in a layout error
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # the weights files save_weights writes and reads
HOW_TO_GET = "get the official weights from Hugging Face repo apple/starflow with `starflow download t2i` (or t2v; offline it lists the files to copy by hand)"
PathLike = Union[str, os.PathLike]
Shape = tuple[int, ...]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (corrupt, incomplete, not a state dict) or does not fit the model."""


class LayoutError(CheckpointError, ValueError):
    """The state dict's names or shapes differ from the model's; ``report`` holds every difference."""

    def __init__(self, report: "LayoutReport", source: str = "state dict") -> None:
        super().__init__(f"{source} does not match the model: {report.summary()}; it was saved for another config "
                         "(`starflow validate CONFIG --checkpoint WEIGHTS` lists every difference)")
        self.report = report


@dataclass
class LayoutReport:
    """Differences between the names/shapes a model expects and those a state dict holds.

    Attributes:
        missing: names the model has and the state dict lacks.
        unexpected: names the state dict has and the model lacks (deprecated buffers excluded).
        mismatched: ``(name, model's shape, state dict's shape)`` for names present in both.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the weights match the layout exactly: nothing missing, unexpected or of another shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line: the counts, with the first name of each kind of difference."""
        first = [f"missing {self.missing[0]}" if self.missing else "",
                 f"unexpected {self.unexpected[0]}" if self.unexpected else "",
                 "{}: model {}, checkpoint {}".format(self.mismatched[0][0], *map(list, self.mismatched[0][1:]))
                 if self.mismatched else ""]
        return (f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched "
                f"shapes (e.g. {'; '.join(f for f in first if f)})")

    def describe(self, limit: int = _LIST_LIMIT) -> str:
        """Human-readable summary with counts, listing at most ``limit`` names per category."""
        if self.ok:
            return "layout matches"

        def listing(items: list[str]) -> str:
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            return "".join(f"\n    {s}" for s in items[:limit]) + more

        shapes = [f"{n}: model {list(e)}, checkpoint {list(f)}" for n, e, f in self.mismatched]
        groups = {"missing": self.missing, "unexpected": self.unexpected, "mismatched shapes": shapes}
        head = f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(shapes)} mismatched shapes"
        body = [f"  {what} ({len(names)}):{listing(names)}" for what, names in groups.items() if names]
        return "\n".join([head] + body)


def is_deprecated(name: str) -> bool:
    """Whether ``name`` is one of :data:`DEPRECATED_BUFFERS`."""
    return _DEPRECATED_RE.fullmatch(name) is not None


def drop_deprecated(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` without the official deprecated buffers (``var``, ``blocks.{i}.attn_mask``,
    ``feat_rope.freqs_cos``, ``feat_rope.freqs_sin``); they have no effect on the model (SPEC section 3)."""
    return {k: v for k, v in state_dict.items() if not is_deprecated(k)}


def _unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded object and strip ``module.`` / ``_orig_mod.`` prefixes."""
    if isinstance(obj, Mapping):  # a training checkpoint {'model': sd, ...}
        tensor_dicts = [(k, v) for k in _WRAPPER_KEYS if isinstance(v := obj.get(k), Mapping) and v
                        and all(isinstance(t, torch.Tensor) for t in v.values())]
        if tensor_dicts:
            key, inner = tensor_dicts[0]
            others = [k for k in obj if k != key]
            if others:
                warnings.warn(f"{source}: reading the weights under '{key}'; its other entries ({', '.join(others[:4])}"
                              f"{', ...' if len(others) > 4 else ''}) are not model weights and are left out",
                              stacklevel=3)
            obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict (names to tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: not a state dict, entries {bad[:5]} are not tensors "
                              f"(a training state? pass its model weights instead)")
    out: dict[str, torch.Tensor] = {}
    raw: dict[str, str] = {}
    for k, v in obj.items():
        name = _PREFIX_RE.sub("", k)
        if name in out:
            raise CheckpointError(f"{source}: '{raw[name]}' and '{k}' are both '{name}' once the DDP / torch.compile "
                                  "prefixes (module., _orig_mod.) are removed: keep one of them")
        out[name], raw[name] = v, k
    return out


def refused_global(error: BaseException) -> str | None:
    """The global (``"posix.system"``) for which torch's weights-only loading refused a pickle in ``error``, or None.
    A file refused for naming one holds more than tensors and plain data (unpickling it could run code); any other
    failure to unpickle is damage."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def damage_reason(error: BaseException) -> str:
    """What a weights file's reader said, in a few words, for a damaged-file message: ``"it does not unpickle"``
    for a pickle (torch's own text then advises ``weights_only=False``, which is not for a damaged file), else the
    error's type and first line."""
    if isinstance(error, pickle.UnpicklingError):
        return "it does not unpickle"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _torch_load(path: Path, mmap: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except RuntimeError as e:
        if mmap and "mmap" in str(e) and "zipfile" in str(e):  # legacy (pre-1.6) format cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True)
        raise


def read_state_dict(path: PathLike, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a ``torch.save`` file (``.pth``, ``.pt``, ``.bin``).

    Torch files are loaded with ``weights_only=True`` (no arbitrary code) onto the CPU. A ``{'model': sd}``
    or ``{'state_dict': sd}`` wrapper is unwrapped and ``module.`` / ``_orig_mod.`` prefixes are stripped.

    Args:
        path: the checkpoint file.
        mmap: memory-map torch files, so tensors are paged in from disk on use instead of copied
            (legacy non-zip files fall back to a full read).

    Returns:
        ``{name: tensor}`` on the CPU, deprecated buffers included (see :func:`drop_deprecated`).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says how to get the official weights).
        CheckpointError: the file is truncated, corrupt, holds non-tensor objects, or is not a state dict.
    """
    path = Path(path)
    training = path if path.is_dir() else path.parent
    if any(training.glob("*.distcp")):  # (a step folder of starflow train, or one of its files)
        raise CheckpointError(f"{path}: part of a training checkpoint (torch.distributed.checkpoint), not a weights "
                              f"file: write its weights with `starflow export {training} OUT`")
    if path.is_dir():
        inside = [p.name for p in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth"))][:3]
        raise FileNotFoundError(f"{path} is a folder, not a weights file: pass the file"
                                + (f" (it holds {', '.join(inside)})" if inside else ""))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; {HOW_TO_GET}")
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        raise CheckpointError(f"{path}: a config file, not weights: pass the weights file (.safetensors, .pth)")
    try:
        if path.suffix == ".safetensors":
            obj = safetensors.torch.load_file(path, device="cpu")
        else:
            obj = _torch_load(path, mmap)
    except PermissionError:
        raise
    except Exception as e:  # zip, pickle and safetensors readers raise various types on damaged files
        named = refused_global(e) if isinstance(e, pickle.UnpicklingError) else None
        if named:
            what = (f"holds Python objects besides tensors (it names {named}), which loading could run as code; if "
                    "you trust the file, torch.load it with weights_only=False and pass its state dict")
        else:
            what = f"the file is corrupt or incomplete ({damage_reason(e)}); download it again"
        raise CheckpointError(f"{path}: {what}") from e
    return _unwrap(obj, str(path))


def read_shapes(path: PathLike) -> dict[str, Shape]:
    """Names and shapes of a checkpoint's tensors without reading their values.

    ``.safetensors``: only the header is parsed; torch files: loaded memory-mapped (``mmap=True``), so
    no tensor data is paged in.

    Raises:
        FileNotFoundError, CheckpointError: as :func:`read_state_dict`.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - header or size errors of a damaged file
            raise CheckpointError(f"{path}: the file is corrupt or incomplete ({type(e).__name__}: {e}); "
                                  "download it again") from e
    return {k: tuple(v.shape) for k, v in read_state_dict(path, mmap=True).items()}


def _shape_of(value: torch.Tensor | torch.Size | tuple | list) -> Shape:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(int(s) for s in value)


def compare_layout(model_or_expected: nn.Module | Mapping[str, Shape],
                   state_dict_or_shapes: Mapping[str, torch.Tensor | Shape], *,
                   ignore_deprecated: bool = True) -> LayoutReport:
    """Compare names and shapes only (no values): works on meta-device models and on shape tables.

    Args:
        model_or_expected: a module (its ``state_dict()`` is the reference) or ``{name: shape}``.
        state_dict_or_shapes: ``{name: tensor}`` or ``{name: shape}`` to check, e.g. a checkpoint.
        ignore_deprecated: do not report :data:`DEPRECATED_BUFFERS` as unexpected.

    Returns:
        A :class:`LayoutReport`; ``report.ok`` when every name and shape agrees.
    """
    if isinstance(model_or_expected, nn.Module):
        expected = {k: tuple(v.shape) for k, v in model_or_expected.state_dict().items()}
    else:
        expected = {k: _shape_of(v) for k, v in model_or_expected.items()}
    found = {k: _shape_of(v) for k, v in state_dict_or_shapes.items()
             if not (ignore_deprecated and is_deprecated(k))}
    return LayoutReport([k for k in expected if k not in found], [k for k in found if k not in expected],
                        [(k, expected[k], found[k]) for k in expected if k in found and found[k] != expected[k]])


def _cast(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype`` (others unchanged); no copy where the dtype already matches."""
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state_dict.items()}


def load_weights(model: nn.Module, path_or_state_dict: PathLike | Mapping[str, torch.Tensor], *,
                 strict: bool = True, assign: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Load official-layout weights into ``model`` after checking every name and shape.

    Args:
        model: e.g. a :class:`~starflow.models.STARFlow`; may live on the meta device when ``assign``.
        path_or_state_dict: a checkpoint file (see :func:`read_state_dict`) or a state dict.
        strict: require exactly the model's names (deprecated buffers are always dropped). With
            ``strict=False`` missing and unexpected names are tolerated; shape mismatches never are.
        assign: use the checkpoint's tensors as the parameters instead of copying into them
            (memory-mapped for torch files: no second copy; required for a meta-device model).
        dtype: cast floating tensors to this dtype (e.g. ``torch.bfloat16``); the model follows.

    Returns:
        ``model`` itself, loaded.

    Raises:
        FileNotFoundError, CheckpointError: the file is missing or unreadable (see :func:`read_state_dict`).
        LayoutError: names or shapes disagree; the message lists every missing, unexpected and
            mismatched entry at once. The model is untouched when any error is raised.
    """
    source = "state dict"
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = str(path_or_state_dict)
        state_dict = read_state_dict(path_or_state_dict)
    else:
        state_dict = _unwrap(path_or_state_dict, source)
    state_dict = _cast(drop_deprecated(state_dict), dtype if assign else None)  # else copy_ casts
    report = compare_layout(model, state_dict)
    if report.mismatched or (strict and not report.ok):
        raise LayoutError(report, source)
    if not strict:
        state_dict = {k: v for k, v in state_dict.items() if k not in report.unexpected}
        if assign and any(t.is_meta for k, t in model.state_dict().items() if k in report.missing):
            raise LayoutError(report, f"{source} (meta-device model: every parameter must be loaded)")
    if dtype is not None and not assign:
        model.to(dtype)
    model.load_state_dict(state_dict, strict=strict, assign=assign)
    return model


def _is_safetensors(path: Path) -> bool:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint format; use a .safetensors, .pth, .pt or .bin file name")
    return path.suffix == ".safetensors"


def save_weights(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: PathLike) -> Path:
    """Write weights to ``.safetensors`` (no pickle) or ``.pth``/``.pt``/``.bin`` (``torch.save``), atomically.

    The file is written in a temporary folder beside ``path`` (:func:`starflow.files.atomic_scratch_path`, which also
    holds the safetensors writer's own temporary file) and moved into place once complete: no truncated file, and
    what a killed write leaves is removed by the next write of the same file.

    Args:
        model_or_state_dict: a module (its ``state_dict()`` is saved) or ``{name: tensor}``.
        path: destination; the suffix picks the format. Parent folders are created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: unknown suffix, or tensors on the meta device (nothing to save).
        OSError: the file cannot be written (the message names it).
    """
    path = Path(path)
    is_st = _is_safetensors(path)
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    out, seen = {}, set()
    for name, tensor in sd.items():
        if tensor.is_meta:
            raise ValueError(f"cannot save '{name}': it is on the meta device (load weights first)")
        tensor = tensor.detach().cpu()
        if is_st:  # safetensors needs contiguous tensors that share no storage
            ptr = tensor.untyped_storage().data_ptr()
            if (ptr in seen and tensor.numel()) or not tensor.is_contiguous():
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            seen.add(ptr)
        out[name] = tensor
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_scratch_path(path) as tmp:
        if is_st:
            try:
                safetensors.torch.save_file(out, str(tmp), metadata={"format": "pt"})
            except safetensors.SafetensorError as e:  # its I/O errors are not OSErrors
                raise OSError(f"cannot write {path} ({e}): check that its folder is writable and has room") from e
            follow_umask(tmp)  # its writer creates files for the owner only (0600)
        else:
            try:
                torch.save(out, tmp)
            except RuntimeError as e:  # its file errors ("open file failed") are not OSErrors
                raise OSError(f"cannot write {path} ({str(e).splitlines()[0]}): check that its folder is writable and "
                              "has room") from e
    return path


def convert_checkpoint(src: PathLike, dst: PathLike, dtype: torch.dtype | None = None) -> Path:
    """Convert between ``.pth`` and ``.safetensors`` (either direction), keeping every name as
    :func:`read_state_dict` reads it (a ``{'model': sd}`` wrapper unwrapped, with a warning naming the entries left
    out; ``module.``/``_orig_mod.`` prefixes removed).

    Args:
        src: checkpoint to read (see :func:`read_state_dict`).
        dst: file to write; its suffix picks the format (see :func:`save_weights`).
        dtype: optionally cast floating tensors (e.g. ``torch.bfloat16`` halves a float32 file).

    Returns:
        ``dst`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError, CheckpointError: ``src`` is missing or unreadable.
        ValueError: ``dst`` has an unknown suffix.
    """
    _is_safetensors(Path(dst))  # fail before reading a large file
    return save_weights(_cast(read_state_dict(src), dtype), dst)
