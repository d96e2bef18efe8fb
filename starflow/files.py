"""Files written whole or not at all: the content goes to a temporary name beside the target, then is renamed over
it (``os.replace``, atomic on POSIX and Windows), so a killed process leaves the old file or the new one, never half
of one that a later run would read as valid."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

__all__ = ["atomic_path", "atomic_scratch_path", "write_text_atomic", "check_file_target", "check_writable", "follow_umask",
           "weights_fingerprint", "weights_sha256", "same_weights"]


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


_HOST = socket.gethostname().replace("/", "_")


@contextmanager
def atomic_scratch_path(path: str | Path) -> Iterator[Path]:
    """:func:`atomic_path` for writers that make temporary files of their own beside their target (safetensors'
    ``.tmpXXXXXX``, gigabytes for a 3B model): the yielded path lies in a folder of its own, ``.NAME.tmpPID@HOST/``,
    removed whole afterwards. What killed writes of ``path`` on this machine left (processes no longer running) is
    removed first; a write in progress, or one of another machine sharing the folder, is left alone.

    Raises:
        OSError: the folder of ``path`` is not writable (the message names ``path``).
    """
    path = Path(path)
    for left in path.parent.glob(f".{glob_escape(path.name)}.tmp*"):
        pid, _, host = left.name.rsplit(".tmp", 1)[-1].partition("@")
        if pid.isdigit() and host in ("", _HOST) and not _running(int(pid)):  # ("": older versions' files)
            if left.is_dir():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)
    scratch = path.with_name(f".{path.name}.tmp{os.getpid()}@{_HOST}")
    try:
        try:
            scratch.mkdir(exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot write {path} ({e.strerror or e}): check that its folder is writable") from e
        yield scratch / path.name
        os.replace(scratch / path.name, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _running(pid: int) -> bool:
    if os.name == "nt":  # (signal 0 is CTRL_C_EVENT there, sent to the process group: a scratch folder is left)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def follow_umask(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and all it holds) the permissions the umask gives new files and folders:
    for writers that make their files for the owner alone (0600: safetensors, ``tempfile``), whose model folders a
    group could not read."""
    mask = os.umask(0o022)
    os.umask(mask)
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def check_writable(path: str | Path, flag: str) -> None:
    """Refuse, before any work, a place this process cannot write in: ``path`` (a folder, or a file or folder to be
    made) is probed in its nearest existing folder, with a file created there and removed at once (``access()`` says
    yes to root, whatever the file system says).

    Raises:
        OSError: ``FLAG PATH: cannot write in FOLDER (why); pass a writable place``.
    """
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.is_dir()), None)
    if existing is None:
        return
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OSError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e}); pass a writable place") from None


def check_file_target(path: str | Path, flag: str) -> Path:
    """Refuse, before any work, an output file path that is a folder, whose folder does not exist, or in whose folder
    this process cannot create a file (:func:`check_writable`).

    Raises:
        ValueError: ``FLAG PATH: is a folder; ...`` or ``FLAG PATH: its folder ... does not exist``.
        OSError: ``FLAG PATH: cannot write in ...``.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: its folder {path.parent} does not exist")
    check_writable(path, flag)
    return path


def weights_fingerprint(files: list[Path]) -> list[str]:
    """``name:bytes:mtime_ns`` of weights files, cheap to compare: where it differs from a recorded one (files rewritten
    in place), their content (:func:`weights_sha256`) decides (:func:`same_weights`)."""
    return [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]


def weights_sha256(files: list[Path]) -> str:
    """SHA-256 (hex) of the files' bytes, in order; a progress bar above 1 GiB (a 7B model takes a minute or so)."""
    digest, chunk = hashlib.sha256(), 16 << 20
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing the weights", disable=total < 1 << 30) as bar:
        for f in files:
            with open(f, "rb") as stream:
                while block := stream.read(chunk):
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()


def same_weights(recorded: dict, fingerprint: list[str], digest: Callable[[], str]) -> bool:
    """Whether weights files of ``fingerprint`` (:func:`weights_fingerprint`, now) hold the weights ``recorded``
    (``{"files": fingerprint, "sha256": weights_sha256}`` of them at some earlier time): the names and sizes must
    match, and then the times or, where those differ (rewritten in place), the bytes (``digest()``, their
    :func:`weights_sha256`, called only then)."""
    if fingerprint == recorded["files"]:
        return True

    def names_and_sizes(entries: list[str]) -> list[str]:
        return [entry.rsplit(":", 1)[0] for entry in entries]

    return names_and_sizes(fingerprint) == names_and_sizes(recorded["files"]) and digest() == recorded["sha256"]
