"""Argument types the benchmark scripts share: counts and sizes are checked when parsed, so a bad one is a one-line
usage error before any work starts."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low`` (else the usage error ``must be >= low``)."""
    def parse(text: str) -> int:
        value = int(text)  # not an integer: argparse reports "invalid integer >= low value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a float ``> 0``."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


positive_float.__name__ = "number > 0"


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a benchmark's child process: this one's, with the repository first on ``PYTHONPATH``
    (the packages an existing ``PYTHONPATH`` names stay importable) and ``extra`` set."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)
