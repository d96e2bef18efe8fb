"""One writer per run folder: an advisory lock on a training logdir or a sample set while a process writes it.

Two processes writing the same folder (a rerun started while the first run still runs, or workers left running
after their launcher was killed) would resume from each other's checkpoints, log the same steps twice and delete
each other's temporary files. The lock is ``fcntl.flock`` on ``FOLDER/.lock``: the kernel releases it when its
holder exits, however it exits (a killed run leaves no stale lock to clean up). The file stays behind, holding the
last holder's pid and host, which the refusal names. Where ``fcntl`` does not exist (Windows), or the file system
refuses locks (Lustre mounted ``noflock``), nothing is locked (the latter with a warning).
"""
from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

__all__ = ["LOCK_FILE", "FolderLock", "FolderBusyError"]

LOCK_FILE = ".lock"


class FolderBusyError(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """An exclusive, non-blocking lock on ``folder`` (``with FolderLock(folder, "logdir"): ...``, or
    :meth:`acquire` / :meth:`release`).

    Args:
        folder: an existing folder.
        what: what the folder is, for the message (``"training logdir"``, ``"sample set"``).
        hint: how to get past the refusal, appended to the message.

    Raises:
        FolderBusyError: (from :meth:`acquire`) another process holds the lock; the message names its pid and host.
    """

    _held: dict[str, list[int]] = {}  # folder -> [fd, holders]: this process's locks (nested holders share one)

    def __init__(self, folder: str | Path, what: str, hint: str = "") -> None:
        self.folder, self.what, self.hint = Path(folder), what, hint
        self._key = os.path.realpath(self.folder)
        self._holding = False

    def acquire(self) -> "FolderLock":
        """Take the lock, or raise :class:`FolderBusyError` at once (no waiting). Reentrant within a process: a
        folder this process already locks (the CLI around :meth:`~starflow.train.trainer.Trainer.fit`) is shared."""
        if fcntl is None or self._holding:
            return self
        held = self._held.get(self._key)
        if held is None:
            path = self.folder / LOCK_FILE
            try:  # (0o666: the umask decides, so a group sharing the folder shares its lock)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:  # another user's lock file: flock works on a descriptor opened for reading
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    return self._unlocked(e)
            except OSError as e:  # (a read-only folder: the writes that follow say so)
                return self._unlocked(e)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise FolderBusyError(f"{self.folder}: {holder} is writing to this {self.what} now; wait for it to "
                                      f"end or stop it{self.hint}") from None
            except OSError as e:  # a file system without flock (e.g. Lustre mounted with noflock)
                os.close(fd)
                return self._unlocked(e)
            try:  # who holds it, for the refusal of the next one (not on a lock file opened for reading)
                os.ftruncate(fd, 0)
                os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
            except OSError:
                pass
            held = self._held[self._key] = [fd, 0]
        held[1] += 1
        self._holding, self._fd = True, held[0]
        return self

    def _unlocked(self, error: OSError) -> "FolderLock":
        warnings.warn(f"{self.folder}: cannot lock this {self.what} ({error}); going on unlocked: make sure no other "
                      "process writes it", stacklevel=3)
        return self

    def release(self) -> None:
        """Give the lock up (the last holder in the process closes the file, which releases it); the file stays."""
        if not self._holding:
            return
        self._holding = False
        held = self._held.get(self._key)
        if held is None or held[0] != self._fd:  # (a forked child: this object's lock was never the child's)
            return
        held[1] -= 1
        if held[1] == 0:
            os.close(held[0])
            del self._held[self._key]

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _close_in_child() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors. ``flock`` belongs to the open
    file, so a child's copy would keep the folder locked after its parent was killed, until the orphan exits."""
    for fd, _ in FolderLock._held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    FolderLock._held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)
