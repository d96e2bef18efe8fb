"""Training checkpoints through ``torch.distributed.checkpoint`` (DCP): sharded, atomic, last ``k`` kept.

A checkpoint is a folder ``step_XXXXXXXX/`` holding

* the DCP files (``.metadata`` and one ``.distcp`` file per rank) of the tensors: model, optimizer(s).
  Under FSDP2 every rank writes only its own shards; replicated tensors are written once. DCP reshards
  on load, so a run can resume on a different number of ranks;
* ``trainer.json`` (rank 0): step, schedule, counters and the resolved config;
* ``rank_{r}.pt`` (every rank): that rank's data position and RNG states.

Everything is first written to ``step_XXXXXXXX.partial/``; once every rank has finished, rank 0 renames
it. A run killed while saving therefore keeps the previous checkpoint, and the leftover ``.partial``
folder is removed by the next save. Setting the environment variable ``STARFLOW_KILL_DURING_SAVE`` to a
step number kills the process (SIGKILL) after the tensors of that step's checkpoint are written and
before the rename: the crash-safety tests use it to stop a run at the worst moment.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import random
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from starflow.checkpoint import CheckpointError, refused_global

__all__ = ["CheckpointManager", "CheckpointMismatchError", "TRAINING_META", "dcp_metadata", "read_dcp", "read_meta",
           "rng_state",
           "set_rng_state", "KILL_DURING_SAVE_ENV"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})$")
META_FILE = "trainer.json"
KILL_DURING_SAVE_ENV = "STARFLOW_KILL_DURING_SAVE"


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy and torch CPU RNG states, and on a CUDA ``device`` that device's (this rank's) state."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore the states returned by :func:`rng_state` (the CUDA one onto ``device``, when both have one).

    A state of every visible GPU (written by earlier versions) restores ``device``'s entry, if it has one: a run
    resumed on a node with fewer GPUs than it was saved on does not fail."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class _Truncated(OSError):
    """A DCP data file shorter than its checkpoint's metadata says."""


class _Code(pickle.UnpicklingError):
    """A checkpoint file whose pickle names more than tensors and plain data: loading it could run code."""


_DCP_METADATA_CLASSES = {  # what a DCP .metadata file is made of (any other global is refused)
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}
_PATHS = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path", "PurePath"}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, refusing any global but its own dataclasses, ``torch.Size``, dtypes and
    paths (read as ``PurePath``: a checkpoint's own folder name, written as ``pathlib._local.PosixPath`` by Python
    3.13, and a Windows one readable elsewhere)."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("pathlib", "pathlib._local") and name in _PATHS:
            return pathlib.PurePath
        if name in _DCP_METADATA_CLASSES.get(module, ()) or (module == "torch"
                                                              and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _Code(f"its .metadata names {module}.{name}")


def _plain_data(source, what: str, **load_args: Any) -> Any:
    """``torch.load(source, weights_only=True)``; a pickle refused for naming a global raises :class:`_Code` (``what``
    names the part), any other error is raised as it is (damage)."""
    try:
        return torch.load(source, weights_only=True, **load_args)
    except pickle.UnpicklingError as e:
        named = refused_global(e)
        if named:
            raise _Code(f"{what} names {named}") from e
        raise


def _reader(path: Path):
    """A DCP ``FileSystemReader`` of ``path`` that refuses (:class:`_Code`) a ``.metadata`` naming other globals than
    DCP's metadata (torch unpickles it with no restriction) and non-tensor entries (an optimizer's ``lr``, ``betas``)
    holding more than plain data (torch loads them with ``weights_only=False``): a checkpoint downloaded or copied in
    cannot run code. (The metadata is read here, as torch reads it, with the restricted unpickler.)"""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class PlainDataReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            named = getattr(self, "_get_metadata_path", None)  # (torch versions that name a metadata file per rank)
            with open(named(kwargs.get("rank")) if named else Path(self.path) / ".metadata", "rb") as file:
                metadata = _MetadataUnpickler(file).load()
            if getattr(metadata, "storage_meta", None) is None:  # (as FileSystemReader.read_metadata does)
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return PlainDataReader(str(path))


def _planner():
    """DCP's default load planner, with each non-tensor entry first loaded ``weights_only`` (refused if it is more
    than plain data, :class:`_Code`)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class PlainDataPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            _plain_data(value, f"its entry {read_item.dest_index.fqn}")
            value.seek(0)
            super().load_bytes(read_item, value)

    return PlainDataPlanner()


def _numpy_globals() -> list:
    """The numpy globals of an array pickle (the NumPy RNG state in ``rank_{r}.pt``), allowed to ``weights_only``,
    under both NumPy 2's and NumPy 1's module names."""
    reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
    return [(reconstruct, "numpy._core.multiarray._reconstruct"), (reconstruct, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_local(file: Path) -> dict[str, Any]:
    """A ``rank_{r}.pt`` (data position, RNG states), loaded ``weights_only`` (numpy arrays allowed)."""
    with torch.serialization.safe_globals(_numpy_globals()):
        return _plain_data(file, file.name, map_location="cpu")


def _check_sizes(path: Path) -> None:
    """Raise if a DCP data file is shorter than the metadata says (a truncated copy)."""
    needed: dict[str, int] = {}
    for info in _reader(path).read_metadata().storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        have = (path / name).stat().st_size
        if have < size:
            raise _Truncated(f"{name} has {have} bytes, the checkpoint's metadata needs {size}")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_SHAPE_MISMATCH = re.compile(  # DCP's words for a tensor of another shape, or one the checkpoint lacks
    r"Size mismatch between saved torch\.Size\(\[[^\]]*\]\) and current: torch\.Size\(\[[^\]]*\]\) for [\w.]*\w"
    r"|Missing key in checkpoint state_dict: [A-Za-z_][\w.]*\w")


class CheckpointMismatchError(ValueError):
    """A complete checkpoint whose tensors do not fit the model being trained (it was saved with another config).

    Attributes:
        meta: the checkpoint's ``trainer.json`` (its ``config`` is the one it was saved with).
    """

    def __init__(self, message: str, meta: dict[str, Any]) -> None:
        super().__init__(message)
        self.meta = meta


def _damaged(path: Path, why: str) -> str:
    """The message of a damaged checkpoint folder, ``why`` being what is wrong with it."""
    return (f"training checkpoint {path} is corrupt or incomplete ({why}): use an earlier step folder (a training run "
            "resumes from the previous one once this folder is deleted)")


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    inner = re.findall(r"^([\w.]*(?:Error|Exception))\b", str(error), re.MULTILINE)  # DCP quotes tracebacks
    code = next((e for e in _causes(error) if isinstance(e, _Code)), None)
    if code is not None:
        return CheckpointError(f"training checkpoint {path} is refused: {code}, which loading could run as code "
                               "(a checkpoint written by starflow holds only tensors and plain data); use a checkpoint "
                               "from a source you trust")
    why = (f"truncated: {error}" if isinstance(error, _Truncated)
           else f"reading it failed: {(inner or [type(error).__name__])[-1]}")
    return CheckpointError(_damaged(path, why))


def _causes(error: BaseException):
    """``error``'s chain of causes and contexts, and the errors a DCP ``CheckpointException`` gathered per rank."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        todo += [f[0] for f in (getattr(e, "failures", None) or {}).values() if isinstance(f, tuple)]


TRAINING_META = ("step", "config", "schedule", "world_size", "skipped_updates")
"""The ``trainer.json`` keys every training checkpoint has (what a resume reads)."""


def read_meta(path: str | Path, required: tuple[str, ...] = ("step",)) -> dict[str, Any]:
    """The ``trainer.json`` of a checkpoint step folder: ``step``, ``config``, ``world_size``, schedule state, ...

    Args:
        required: keys it must have (:data:`TRAINING_META` for a resume); ``step`` a count, ``config`` a mapping.

    Raises:
        OSError: no readable meta file; ValueError: not JSON, or not an object with the ``required`` keys (e.g.
            emptied by a full disk, edited; the message names the file and the way out).
    """
    file = Path(path) / META_FILE
    try:
        meta = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(_damaged(path, f"{file.name} is not JSON: {e}")) from None
    missing = [k for k in required if k not in meta] if isinstance(meta, dict) else list(required)
    step, config = (meta.get("step", 0), meta.get("config", {})) if isinstance(meta, dict) else (None, None)
    if missing or not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(config, dict):
        raise ValueError(_damaged(path, f"{file.name} is not an object with a step count"
                                        + (f" and {', '.join(required[1:])}" if len(required) > 1 else "")))
    return meta


def read_dcp(tensors: dict[str, Any], path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """``torch.distributed.checkpoint.load`` of ``tensors`` (in place) from the checkpoint folder ``path``, with its
    errors (a ``BaseException`` quoting tracebacks) turned into one-line ones. Data files shorter than the metadata
    says (a truncated copy) are refused before anything is read, so ``tensors`` are then left as they were.

    Raises:
        CheckpointMismatchError: a tensor of another shape, or one missing (``meta``: the checkpoint's metadata).
        CheckpointError: (a RuntimeError) the checkpoint is corrupt or incomplete (the message names the folder and
            the inner error).
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    try:
        _check_sizes(path)  # a truncated data file is found before any tensor is written into
        with warnings.catch_warnings():  # one process without a process group is the intended use
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=_reader(path), planner=_planner())
    except (Exception, dcp.api.CheckpointException) as e:  # (DCP wraps its errors in a BaseException)
        mismatch = _SHAPE_MISMATCH.search(str(e))
        if mismatch:
            raise CheckpointMismatchError(f"training checkpoint {path} holds a model of another shape "
                                          f"({mismatch.group(0)})", meta or {}) from e
        raise _corrupt(path, e) from e


def dcp_metadata(path: str | Path) -> dict[str, Any]:
    """The tensor metadata (``state_dict_metadata``: names -> sizes) of the checkpoint folder ``path``, no tensor read.

    Raises:
        CheckpointError: (a RuntimeError) an unreadable ``.metadata`` file (the message names the folder and the inner error).
    """
    try:
        return _reader(Path(path)).read_metadata().state_dict_metadata
    except Exception as e:
        raise _corrupt(Path(path), e) from e


class CheckpointManager:
    """Saves and finds training checkpoints in ``folder`` (every rank calls every method).

    Args:
        folder: checkpoint directory (created on first save).
        keep_last: number of checkpoints kept; older ones are deleted after a successful save.
        rank: this process's rank (rank 0 writes the metadata, renames and prunes).
        required_meta: the ``trainer.json`` keys :meth:`load` requires (:func:`read_meta`).
    """

    def __init__(self, folder: str | Path, keep_last: int = 3, rank: int = 0,
                 required_meta: tuple[str, ...] = ("step",)) -> None:
        self.folder = Path(folder)
        self.keep_last = max(1, keep_last)
        self.rank = rank
        self.required_meta = required_meta

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (``.partial`` folders and other files are ignored)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.match(p.name) and (p / META_FILE).is_file())

    def latest(self) -> Path | None:
        """The newest checkpoint folder of the run, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, tensors: dict[str, Any], meta: dict[str, Any], local: dict[str, Any]) -> Path:
        """Write a checkpoint for ``step`` atomically and prune old ones.

        Args:
            tensors: nested dict of (possibly sharded DTensor) tensors, e.g. ``{"model": ..., "optimizer": ...}``
                from ``torch.distributed.checkpoint.state_dict``; saved with DCP.
            meta: JSON-serialisable, identical on every rank (written by rank 0).
            local: this rank's picklable state (data position, RNG).

        Returns:
            The checkpoint folder.

        Raises:
            OSError: the checkpoint could not be written (e.g. a full disk; the message says how much is free): its
                half-written folder is removed, the earlier checkpoints are kept.
        """
        import torch.distributed.checkpoint as dcp

        final = self.folder / f"step_{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for leftover in self.folder.glob("*.partial"):  # from a run killed while saving
                shutil.rmtree(leftover, ignore_errors=True)
            if final.exists():  # the same step saved again (e.g. the last step after a periodic save)
                shutil.rmtree(final)
        _barrier()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(tensors, checkpoint_id=str(partial))
            torch.save(local, partial / f"rank_{self.rank}.pt")
            if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            _barrier()
            if self.rank == 0:
                (partial / META_FILE).write_text(json.dumps(meta, indent=1))
        except (OSError, RuntimeError, dcp.api.CheckpointException) as e:  # (DCP wraps its errors in a BaseException)
            failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
            if any(isinstance(f[0], KeyboardInterrupt) for f in (failures or {}).values()):  # Ctrl-C again, mid-save
                if self.rank == 0:
                    shutil.rmtree(partial, ignore_errors=True)
                raise KeyboardInterrupt(f"interrupted while writing the checkpoint {final} (not kept; the earlier "
                                        "checkpoints are)") from None
            raise self._unwritten(final, partial, e) from None
        if self.rank == 0:
            os.replace(partial, final)
            for old in self.checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def _unwritten(self, final: Path, partial: Path, error: BaseException) -> OSError:
        """The one-line error of a save that failed (a full disk, a quota, a lost mount): the half-written folder is
        removed (rank 0), the earlier checkpoints stay."""
        failures = getattr(error, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
        inner = next(iter(failures.values()))[0] if failures else error
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        try:
            free = f"; {shutil.disk_usage(self.folder).free / 2**20:.0f} MiB free on its disk"
        except OSError:
            free = ""
        what = f"{type(inner).__name__}: {str(inner).strip()[:300]}{free}"
        return OSError(f"cannot write the checkpoint {final} ({what}): the earlier checkpoints are kept; once the cause is fixed (a full disk, a folder that cannot be "
                       "written, another process of the run that stopped) rerun the same command to resume from the "
                       "last one")

    def load(self, path: str | Path, tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load a checkpoint written by :meth:`save`; ``tensors`` is filled in place (DCP reshards as needed).

        Returns:
            ``(meta, local)``; ``local`` is None when the checkpoint has no file for this rank (it was
            written by fewer ranks).

        Raises:
            RuntimeError: the checkpoint is corrupt or incomplete (the message names the folder).
            CheckpointMismatchError: a tensor of another shape, or one missing (the model changed since).
        """
        path = Path(path)
        try:
            meta = read_meta(path, self.required_meta)
        except ValueError as e:  # (its message says what is wrong and the way out)
            raise CheckpointError(str(e)) from None
        except Exception as e:
            raise _corrupt(path, e) from e
        read_dcp(tensors, path, meta)
        local_file = path / f"rank_{self.rank}.pt"
        try:
            local = _load_local(local_file) if local_file.is_file() else None
        except Exception as e:
            raise _corrupt(path, e) from e
        return meta, local

    @staticmethod
    def load_local(path: str | Path, rank: int) -> dict[str, Any]:
        """The per-rank state (data position, RNG) that ``rank`` wrote into checkpoint ``path``.

        Raises:
            CheckpointError: the file holds more than plain data (loading it could run code), or is damaged.
        """
        try:
            return _load_local(Path(path) / f"rank_{rank}.pt")
        except Exception as e:
            raise _corrupt(Path(path), e) from e
