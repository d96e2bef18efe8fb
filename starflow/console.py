"""Messages on the terminal: the package's log records (skipped data files, dataset listings) as one plain
``warning: ...`` line each, on a line of their own while a progress bar is shown."""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

__all__ = ["line_start", "LogLines", "log_lines", "show_log_lines", "showing_log_lines"]

PACKAGE_LOGGER = "starflow"


def line_start() -> str:
    """``"\\n"`` while a progress bar is shown (a message then starts a line of its own), else ``""``."""
    bars = getattr(sys.modules.get("tqdm.std"), "tqdm", None)
    return "\n" if bars is not None and any(not bar.disable for bar in list(getattr(bars, "_instances", ()))) else ""


class LogLines(logging.Handler):
    """A log record as ``LEVEL: message`` on the stderr of the moment, after :func:`line_start` (``new_line``: after
    a line break always, for a process whose parent's progress bar it cannot see).

    Args:
        new_line: start each record on a new line whatever this process shows.
    """

    def __init__(self, new_line: bool = False) -> None:
        super().__init__()
        self.new_line = new_line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            start = "\n" if self.new_line else line_start()
            sys.stderr.write(f"{start}{record.levelname.lower()}: {self.format(record)}\n")
        except Exception:  # noqa: BLE001 - logging's own rule: a failed log line never ends the program
            self.handleError(record)


def showing_log_lines() -> bool:
    """Whether the package's log records are shown as :class:`LogLines` in this process."""
    return any(isinstance(h, LogLines) for h in logging.getLogger(PACKAGE_LOGGER).handlers)


def show_log_lines() -> None:
    """Show the package's log records as :class:`LogLines` from now on, each on a new line, and only so (not also
    through the root logger's handlers); for a process of its own under a command (a DataLoader worker started by
    spawn, whose parent may show a progress bar)."""
    package = logging.getLogger(PACKAGE_LOGGER)
    if not showing_log_lines():
        package.addHandler(LogLines(new_line=True))
        package.propagate = False


@contextlib.contextmanager
def log_lines() -> Iterator[None]:
    """While the block runs (a command), the package's log records are :class:`LogLines` only; afterwards the
    logging setup is as it was (a notebook's or a test's own handlers get them again). Processes forked in the block
    keep showing them."""
    package = logging.getLogger(PACKAGE_LOGGER)
    if showing_log_lines():  # (a command run from within another)
        yield
        return
    handler, propagate = LogLines(), package.propagate
    package.addHandler(handler)
    package.propagate = False
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.propagate = propagate
