"""Files written whole or not at all: the content goes to a temporary name beside the target, then is renamed over
it (``os.replace``, atomic on POSIX and Windows), so a killed process leaves the old file or the new one, never half
of one that a later run would read as valid."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "write_text_atomic"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same folder, so the rename cannot cross file systems) to write to;
    on success it replaces ``path``, on an error it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
