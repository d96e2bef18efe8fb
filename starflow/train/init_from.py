"""Fine-tuning: start a run from released or exported weights (``starflow train --init_from PATH``).

The official ``train.py --resume_path`` loads a ``.pth`` with ``strict=False`` before training (SPEC section
16). Here the load is checked: every parameter of the model must come from the file, except those a
fine-tune may add (a learnable denoiser on a model that had none), and the file may carry only parameters a
fine-tune may drop (a learnable denoiser the new config turns off) and the official deprecated buffers.
Everything else missing or mis-shaped is an error that names every key. Optimizer, schedule and step start
fresh; a restarted run resumes from its own checkpoints instead (:meth:`Trainer.resume` first).

Sources: a ``.pth``/``.safetensors`` file, a model folder (``starflow export`` / ``logdir/model``) or a DCP
step folder of a training run (``checkpoints/step_XXXXXXXX``). Under FSDP2 each rank keeps only its shards:
a DCP folder is read shard by shard; ``.pth`` and ``.safetensors`` files are memory-mapped and each rank copies
only its own slices (:func:`starflow.distributed.load_full_state_dict`), reading only their pages.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from starflow.assets import find_weights
from starflow.checkpoint import CheckpointError, LayoutReport, drop_deprecated, is_deprecated, read_state_dict
from starflow.distributed import load_full_state_dict
from starflow.files import same_weights, weights_fingerprint, weights_sha256
from starflow.models.lora import LORA_MARK

__all__ = ["OPTIONAL_PREFIXES", "InitReport", "plan_init", "init_from", "read_init_shapes", "describe_source",
           "covers_every_parameter", "check_lora_base"]

OPTIONAL_PREFIXES = ("learnable_self_denoiser.",)
"""Parameters a fine-tune may add (initialised fresh) or drop (config turned the part off)."""

Shape = tuple[int, ...]


@dataclass
class InitReport:
    """What ``--init_from`` did with each parameter name.

    Attributes:
        source: the file or folder read.
        loaded: ``{name: shape}`` loaded from the file.
        new: ``{name: shape}`` the model has and the file lacks (initialised fresh).
        dropped: ``{name: shape}`` the file has and the model lacks (ignored), deprecated buffers included.
    """

    source: str
    loaded: dict[str, Shape] = field(default_factory=dict)
    new: dict[str, Shape] = field(default_factory=dict)
    dropped: dict[str, Shape] = field(default_factory=dict)

    def table(self) -> str:
        """One table: per top-level part (``blocks.3``, ``learnable_self_denoiser``, ...), tensors and
        parameters loaded, new and dropped."""
        parts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for what, names in (("loaded", self.loaded), ("new", self.new), ("dropped", self.dropped)):
            for name, shape in names.items():
                part = "deprecated buffers" if is_deprecated(name) else ".".join(name.split(".")[:2]) \
                    if name.startswith("blocks.") else name.split(".")[0]
                count = parts[part][what]
                count[0] += 1
                count[1] += int(torch.Size(shape).numel())
        lines = [f"init_from {self.source}", f"{'part':<28}{'loaded':>18}{'new':>18}{'dropped':>18}"]

        def cell(c: list[int]) -> str:
            return f"{c[0]} ({c[1]:,})" if c[0] else "-"

        for part in sorted(parts, key=_part_order):
            row = parts[part]
            lines.append(f"{part:<28}" + "".join(f"{cell(row[w]):>18}" for w in ("loaded", "new", "dropped")))
        total = {w: [len(d), sum(int(torch.Size(s).numel()) for s in d.values())]
                 for w, d in (("loaded", self.loaded), ("new", self.new), ("dropped", self.dropped))}
        lines.append(f"{'total: tensors (parameters)':<28}" + "".join(f"{cell(total[w]):>18}" for w in total))
        return "\n".join(lines)


def _part_order(part: str) -> tuple:
    bits = part.split(".")
    return (0, int(bits[1])) if bits[0] == "blocks" and len(bits) > 1 and bits[1].isdigit() else (1, part)


def _optional(name: str) -> bool:
    return name.startswith(OPTIONAL_PREFIXES)


def check_lora_base(report: InitReport) -> None:
    """Refuse, for a LoRA run, base weights that lack some of the model's (``report.new``: a learnable denoiser the
    file has not): the base stays frozen and only the adapters train, so those would keep their fresh initialisation,
    and sampling would use them.

    Raises:
        ValueError: naming the part, and the ways out.
    """
    untrained = [name for name in report.new if LORA_MARK not in name]
    if untrained:
        part = untrained[0].split(".")[0]
        raise ValueError(f"--init_from {report.source} has no {part} weights ({len(untrained)} tensors new, e.g. "
                         f"{untrained[0]}), and a LoRA run trains only its adapters, so they would stay at their "
                         "initial values and sampling would use them: start from weights that have them, train "
                         f"without LoRA (lora_rank 0), or turn {part} off (--{part} 0)")


def plan_init(model_shapes: dict[str, Shape], file_shapes: dict[str, Shape], source: str) -> InitReport:
    """Sort every name into loaded / new / dropped.

    Args:
        model_shapes: ``{name: shape}`` of the model to train.
        file_shapes: ``{name: shape}`` of the weights to start from.
        source: the file, for messages.

    Raises:
        CheckpointError (a ``LayoutError`` report in the message): a model parameter missing from the file or a
            file parameter the model lacks, outside :data:`OPTIONAL_PREFIXES`, or any shape mismatch; every
            offending name is listed.
    """
    if any(LORA_MARK in k for k in file_shapes) and not any(LORA_MARK in k for k in model_shapes):
        raise CheckpointError(f"--init_from {source} holds a LoRA run's adapters, not the weights they adapt: merge "
                              "them into their base first (starflow export --merge_lora RUN OUT) and pass OUT")
    report = InitReport(source)
    problems = LayoutReport()
    for name, shape in model_shapes.items():
        if name in file_shapes:
            if tuple(file_shapes[name]) != tuple(shape):
                problems.mismatched.append((name, tuple(shape), tuple(file_shapes[name])))
            else:
                report.loaded[name] = tuple(shape)
        elif _optional(name):
            report.new[name] = tuple(shape)
        else:
            problems.missing.append(name)
    for name, shape in file_shapes.items():
        if name not in model_shapes:
            if _optional(name) or is_deprecated(name):
                report.dropped[name] = tuple(shape)
            else:
                problems.unexpected.append(name)
    if not problems.ok:
        raise CheckpointError(f"--init_from {source} does not fit the model being trained: "
                              f"{problems.describe(limit=5)}\n(only {', '.join(OPTIONAL_PREFIXES)}* may be new or "
                              "dropped; check that the config describes the weights' architecture: `starflow validate "
                              f"CONFIG --checkpoint {source}` lists every difference)")
    return report


def _is_dcp(path: Path) -> bool:
    from starflow.train.state import META_FILE

    return path.is_dir() and (path / META_FILE).is_file() and any(path.glob("*.distcp"))


def read_init_shapes(path: str | Path) -> dict[str, Shape]:
    """``{name: shape}`` of the weights at ``path`` without reading tensors (DCP metadata or the file).

    Raises:
        FileNotFoundError: nothing there (the message names what is accepted).
        CheckpointError: unreadable.
    """
    from starflow.checkpoint import read_shapes

    path = Path(path)
    if _is_dcp(path):
        from starflow.train.state import dcp_metadata

        meta = dcp_metadata(path)
        return {k[len("model."):]: tuple(m.size) for k, m in meta.items()
                if k.startswith("model.") and hasattr(m, "size")}
    if path.is_dir():
        path = find_weights(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init_from {path}: no such file; pass a .pth/.safetensors file, a model folder "
                                "(config.yaml + model.safetensors) or a training checkpoint step folder")
    return dict(read_shapes(path))


def covers_every_parameter(model: nn.Module, path: str | Path) -> bool:
    """Whether the weights at ``path`` hold every parameter of ``model`` (names and shapes; no tensor is read),
    so the model need not be initialised first."""
    try:
        report = plan_init({k: tuple(v.shape) for k, v in model.state_dict().items()}, read_init_shapes(path),
                           str(path))
    except (OSError, CheckpointError):
        return False  # the load itself reports the problem
    return not report.new


def init_from(model: nn.Module, path: str | Path) -> InitReport:
    """Load the weights at ``path`` into ``model`` (checked by :func:`plan_init`); new parameters keep their
    fresh initialisation.

    Args:
        model: the model to train, FSDP2-sharded (every rank must call this then; each copies only its own
            slices) or not.
        path: a ``.pth``/``.safetensors`` file, a model folder or a DCP step folder.

    Returns:
        The :class:`InitReport` (print :meth:`InitReport.table`).

    Raises:
        FileNotFoundError, CheckpointError: see :func:`read_init_shapes` and :func:`plan_init`; the model is
            untouched then.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    path = Path(path)
    current = get_model_state_dict(model)
    report = plan_init({k: tuple(v.shape) for k, v in current.items()}, read_init_shapes(path), describe_source(path))
    if _is_dcp(path):
        from starflow.train.state import read_dcp

        wanted = {k: v for k, v in current.items() if k in report.loaded}
        read_dcp({"model": wanted}, path)
        set_model_state_dict(model, wanted, options=StateDictOptions(strict=False))
        return report
    state = drop_deprecated(read_state_dict(find_weights(path) if path.is_dir() else path))
    state = {k: v for k, v in state.items() if k in report.loaded}
    load_full_state_dict(model, state)
    return report


def source_files(path: str | Path) -> list[Path]:
    """The files that hold the weights at ``path`` (a weights file; a model folder's weights file; a DCP step
    folder's ``.metadata`` and shards), in a fixed order."""
    path = Path(path)
    if _is_dcp(path):
        return sorted(p for p in path.iterdir() if p.suffix == ".distcp" or p.name == ".metadata")
    return [find_weights(path) if path.is_dir() else path]


def base_identity(path: str | Path) -> dict:
    """What identifies the base weights of a LoRA run (recorded in its checkpoints, :func:`check_base`):
    ``{"path", "files": weights_fingerprint, "sha256"}`` of :func:`source_files`."""
    files = source_files(path)
    return {"path": str(path), "files": weights_fingerprint(files), "sha256": weights_sha256(files)}


def check_base(recorded: dict | None, path: str | Path, what: str) -> None:
    """Refuse LoRA adapters over base weights other than those they were trained on (``recorded``:
    :func:`base_identity` at the run's start; None for runs that did not record it, which are not checked).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the files at ``path`` differ from the recorded ones in names, sizes or bytes.
    """
    if recorded is None:
        return
    if not Path(path).exists():
        raise FileNotFoundError(f"{what}: the base weights {path} (init_from) its LoRA adapters were trained over are "
                                "gone: put them back where they were (a resumed run may also name their new place "
                                "with --init_from)")
    files = source_files(path)
    if not same_weights(recorded, weights_fingerprint(files), lambda: weights_sha256(files)):
        raise ValueError(f"{what}: the base weights {path} (init_from) are not the ones its LoRA adapters were trained "
                         f"over ({', '.join(recorded['files'])}, SHA-256 {recorded['sha256'][:12]}...): they changed "
                         "since the run started; put the original weights back, or train new adapters in a new --logdir")


def describe_source(path: str | Path) -> str:
    """``path`` and, for a DCP step folder, the step it holds (for the run's log)."""
    path = Path(path)
    if _is_dcp(path):
        from starflow.train.state import read_meta

        return f"{path} (training checkpoint at step {read_meta(path)['step']})"
    return str(path)
