"""Argument types the benchmark scripts share: counts and sizes are checked when parsed, so a bad one is a one-line
usage error before any work starts."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from starflow.cli._flags import at_least  # noqa: F401  (the benchmarks' counts are parsed as the CLI's)

ROOT = Path(__file__).resolve().parents[1]


def positive_float(text: str) -> float:
    """An argparse ``type``: a float ``> 0``."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


positive_float.__name__ = "number > 0"


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a float ``>= 0``."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


non_negative_float.__name__ = "number >= 0"


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a benchmark's child process: this one's, with the repository first on ``PYTHONPATH``
    (the packages an existing ``PYTHONPATH`` names stay importable) and ``extra`` set."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)
