"""Training checkpoints: everything needed to resume exactly, written atomically, last ``k`` kept.

A checkpoint is one file ``step_XXXXXXXX.pt`` holding the model, optimizer and schedule state, the step,
the data position and every RNG state. It is written to a temporary name and renamed, so a run killed
while saving keeps the previous checkpoint.
"""
from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointManager", "rng_state", "set_rng_state"]

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states returned by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and finds training checkpoints in ``folder``.

    Args:
        folder: checkpoint directory (created on first save).
        keep_last: number of checkpoints kept; older ones are deleted after a successful save.
    """

    def __init__(self, folder: str | Path, keep_last: int = 3) -> None:
        self.folder = Path(folder)
        self.keep_last = max(1, keep_last)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.match(p.name))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` for ``step`` atomically and prune old checkpoints."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:08d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in self.checkpoints()[: -self.keep_last]:
            old.unlink()
        return path

    @staticmethod
    def load(path: str | Path) -> dict[str, Any]:
        """Read a checkpoint written by :meth:`save`.

        Raises:
            RuntimeError: the file is corrupt or truncated.
        """
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
            raise RuntimeError(f"training checkpoint {path} is corrupt or incomplete ({e}); delete it to resume "
                               "from the previous one") from e
