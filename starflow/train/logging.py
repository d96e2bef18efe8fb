"""Training metrics to disk, TensorBoard and Weights & Biases.

:class:`MetricsLogger` always appends one JSON line per call to ``logdir/metrics.jsonl``. When the
``tensorboard`` package is installed it also writes scalars to ``logdir/tb`` (``tensorboard --logdir
LOGDIR/tb``); when the environment has ``WANDB_API_KEY`` and ``wandb`` is installed it logs to the W&B
project ``$WANDB_PROJECT`` (default ``starflow``), in a run named after ``logdir`` whose id is kept in
``logdir/wandb_id.txt``, so a resumed training run continues the same W&B run.

Install the optional back-ends with ``pip install tensorboard`` and ``pip install wandb``.
"""
from __future__ import annotations

import json
import os
import secrets
import warnings
from pathlib import Path
from typing import Any, Mapping

from starflow.files import write_text_atomic

__all__ = ["MetricsLogger", "METRICS_FILE", "TENSORBOARD_DIR", "WANDB_ID_FILE", "WANDB_DEFAULT_PROJECT"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
WANDB_ID_FILE = "wandb_id.txt"
WANDB_DEFAULT_PROJECT = "starflow"

_warned_missing_wandb = False  # the missing-wandb warning is shown once per process


def _drop_lines_after(path: Path, step: int) -> None:
    """Remove the lines of ``path`` (JSON lines with a ``step``) for steps after ``step``, and an unterminated last
    line (a write cut short); atomic, untouched if there are none."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    torn = bool(lines) and not lines[-1].endswith("\n")  # a write cut short (crash, full disk): dropped, or the
    if torn:  # next line would be appended to it
        lines.pop()

    def later(line: str) -> bool:
        try:
            return int(json.loads(line)["step"]) > step
        except (ValueError, KeyError, TypeError):
            return False  # not ours to judge: kept

    kept = [line for line in lines if not later(line)]
    if torn or len(kept) < len(lines):
        write_text_atomic(path, "".join(kept))


class MetricsLogger:
    """Write scalar training metrics to every available back-end.

    Args:
        logdir: the run's output folder (created if missing). Files: ``metrics.jsonl``, ``tb/`` (TensorBoard
            event files, if ``tensorboard`` is installed), ``wandb_id.txt`` (if W&B is used).
        config: the resolved run configuration (e.g. ``Config.to_dict()``), stored with the W&B run.
        enabled: False (every rank but the main one) makes every method a no-op that touches no file.
        start_step: the step training continues from: lines of ``metrics.jsonl`` for later steps (logged by a run
            killed after its last checkpoint, whose steps are trained again) are removed, so the file holds each
            step once, and TensorBoard is told to drop that run's events for them too. None keeps everything.

    Warns:
        UserWarning: once per process, when ``WANDB_API_KEY`` is set but ``wandb`` is not installed.

    Example::

        with MetricsLogger(Path("runs/demo"), cfg.to_dict(), enabled=dist.is_main) as metrics:
            metrics.log(step, {"loss": 0.71, "lr": 1e-4})
    """

    def __init__(self, logdir: Path, config: Mapping[str, Any], enabled: bool = True,
                 start_step: int | None = None) -> None:
        self.logdir = Path(logdir)
        self.enabled = enabled
        self._tensorboard = None
        self._wandb_run = None
        if not enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        if start_step is not None:
            _drop_lines_after(self.logdir / METRICS_FILE, start_step)
        self._tensorboard = _tensorboard_writer(self.logdir / TENSORBOARD_DIR, start_step)
        if os.environ.get("WANDB_API_KEY"):
            self._wandb_run = _wandb_run(self.logdir, dict(config))

    @property
    def backends(self) -> list[str]:
        """Names of the active back-ends, e.g. ``["jsonl", "tensorboard"]`` (empty when disabled)."""
        if not self.enabled:
            return []
        return ["jsonl"] + ["tensorboard"] * (self._tensorboard is not None) + ["wandb"] * (self._wandb_run is not None)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` at optimizer step ``step``.

        Args:
            step: the global step (x axis of every back-end); a ``"step"`` entry in ``metrics`` is ignored.
            metrics: scalar values by name (Python numbers or 0-d tensors).
        """
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items() if k != "step"}
        with open(self.logdir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def close(self) -> None:
        """Flush and close the back-ends; later calls (and :meth:`log`) do nothing."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        self._tensorboard = self._wandb_run = None
        self.enabled = False

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensorboard_writer(path: Path, start_step: int | None = None) -> Any:
    """A ``SummaryWriter`` on ``path``, or None when ``tensorboard`` is not installed; with ``start_step``, TensorBoard
    drops the events an earlier writer logged for later steps (``purge_step``), as :func:`_drop_lines_after` does for
    ``metrics.jsonl``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(path), purge_step=None if start_step is None else start_step + 1)


def _wandb_run(logdir: Path, config: dict[str, Any]) -> Any:
    """Start (or resume) the W&B run of ``logdir``; None, with a warning, when ``wandb`` is not installed."""
    global _warned_missing_wandb
    try:
        import wandb
    except ImportError:
        if not _warned_missing_wandb:
            _warned_missing_wandb = True
            warnings.warn("WANDB_API_KEY is set but the wandb package is not installed, so metrics are not sent "
                          "to Weights & Biases; fix: pip install wandb", stacklevel=3)
        return None
    id_file = logdir / WANDB_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text(encoding="utf-8").strip()
    else:
        run_id = secrets.token_hex(8)
        id_file.write_text(run_id + "\n", encoding="utf-8")
    project = os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT
    return wandb.init(project=project, name=logdir.resolve().name, id=run_id, resume="allow", config=config,
                      dir=str(logdir))
