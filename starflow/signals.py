"""Stopping long work on a signal at a safe point: SIGTERM (a scheduler's preemption or time limit) and Ctrl-C.

Training stops after the step in progress, with a checkpoint; ``generate-set`` after the batch in progress, its images
written. :class:`StopSignals` records the signal, the loop asks :func:`agreed_stop` at its safe point (every rank
stops after the same step or batch) and raises :class:`Stopped`; ``starflow.cli.main`` says how to resume and exits
``128 + signal``. Every other command stops at once on SIGTERM, as on Ctrl-C (:func:`sigterm_stops_at_once`).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from typing import Any, Iterator

import torch
from tqdm import tqdm

__all__ = ["StopSignals", "Stopped", "agreed_stop", "init_data_worker", "leave_signals_to_the_parent",
           "sigterm_stops_at_once", "stop_signals_held"]


class Stopped(KeyboardInterrupt):
    """Work stopped on a signal at a safe point; ``signum`` is the signal (the exit status is ``128 + signum``)."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum = signum


class StopSignals:
    """While installed (``with StopSignals(...) as stop``, in the main thread), SIGTERM and SIGINT ask the loop to
    stop at its next safe point instead of killing it mid-step. A second SIGINT (Ctrl-C again) stops at once
    (KeyboardInterrupt); further SIGTERMs are the same request and change nothing (a scheduler signals the launcher
    and the workers alike, and torchrun passes its own SIGTERM on to them).

    Args:
        verbose: say so when the first signal arrives (rank 0 says it; every rank stops).
        at: the safe point, for that message (``"after this step, with a checkpoint"``).

    Attributes:
        received: the first signal's number, or 0.
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, verbose: bool = True, at: str = "after this step") -> None:
        self.received = 0
        self.verbose, self.at = verbose, at
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received:
            if signum == signal.SIGTERM:
                return
            raise KeyboardInterrupt
        self.received = signum
        if self.verbose:
            tqdm.write(f"{signal.Signals(signum).name}: stopping {self.at} (Ctrl-C to stop at once)")

    def install(self) -> "StopSignals":
        """Take over the signals (in the main thread only; elsewhere they keep their handlers)."""
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def restore(self) -> None:
        """Give the signals back their previous handlers."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


@contextlib.contextmanager
def sigterm_stops_at_once() -> Iterator[None]:
    """While a command runs (in the main thread), SIGTERM stops it as Ctrl-C does, at once (:class:`Stopped`), instead
    of killing the process: its ``finally`` blocks run (folder locks released, staging folders removed) and
    ``starflow.cli.main`` exits ``128 + 15`` with a line saying what was kept. Loops with a safe point (training,
    ``generate-set``) install :class:`StopSignals` inside it, which takes the signal over meanwhile."""
    def stop(signum: int, frame) -> None:
        raise Stopped(signum, "before it finished")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def agreed_stop(stop: StopSignals | None, device: torch.device | str = "cpu") -> int:
    """The stop signal every rank agrees on at a safe point: the largest signal number any rank received, 0 = go on.
    The ranks must stop after the same step or batch (a checkpoint is written together; sharded sampling needs every
    rank in every batch). One small all-reduce of an int32 scalar on ``device`` when ``torch.distributed`` is
    initialised; every rank must call it equally often."""
    signum = stop.received if stop is not None else 0
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return signum
    flag = torch.tensor(signum, dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


_HELD = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def stop_signals_held(start_method: str | None = None) -> Iterator[None]:
    """Hold SIGTERM and SIGINT back from this thread while the block runs, so that processes started in it
    (DataLoader workers) start with them held, until :func:`leave_signals_to_the_parent` ignores them. (The process
    itself still takes a signal sent to it, by another of its threads or when the block ends.) Where the platform
    cannot hold signals (Windows), nothing is held.

    Args:
        start_method: how the processes start (default: multiprocessing's). For spawn and forkserver,
            multiprocessing's resource tracker is started first: starting it lets the two signals through again.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    method = (start_method or multiprocessing.get_start_method(allow_none=True)
              or multiprocessing.get_all_start_methods()[0])
    if method != "fork":  # (get_start_method() would fix the process's start method for good)
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def init_data_worker(worker_id: int, log_lines: bool = False) -> None:
    """``worker_init_fn`` of the training DataLoaders: :func:`leave_signals_to_the_parent`, and with ``log_lines``
    the package's log records shown as the command shows them (:func:`starflow.console.show_log_lines`: a worker
    started by spawn does not inherit that from its parent)."""
    leave_signals_to_the_parent(worker_id)
    if log_lines:
        from starflow.console import show_log_lines

        show_log_lines()


def leave_signals_to_the_parent(worker_id: int) -> None:
    """``worker_init_fn`` of DataLoader workers: ignore SIGTERM and SIGINT, then take the signals held since the
    worker started (:func:`stop_signals_held`; ignored, they are dropped). A signal sent to the whole process group
    (``kill -TERM -PGID``, Ctrl-C, a scheduler, torchrun forwarding its own) is the parent's to act on, which stops
    at a safe point. A worker still exits when its loader shuts down or the parent dies, after the item it is
    loading. (Here, not in the training modules: a worker started by spawn imports this module's, and only them.)"""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
