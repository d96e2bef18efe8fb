"""A torchrun worker's tie to its launcher, set before anything heavy is imported (no torch here).

torchrun starts its workers in their own session, so a launcher killed outright (``kill -9``, a node agent's OOM kill)
would leave them running on: training beside the rerun, or waiting minutes for a rendezvous that will not come. The
``starflow`` command calls :func:`stop_with_launcher` first thing under torchrun, before torch loads (seconds in which
a killed launcher would go unnoticed), and :func:`starflow.distributed.init_distributed` calls it again for runs
started from Python; a worker whose launcher dies then gets SIGTERM.
"""
from __future__ import annotations

import os
import signal
import sys

__all__ = ["stop_with_launcher", "launched_by_torchrun", "PR_SET_PDEATHSIG"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def launched_by_torchrun() -> bool:
    """Whether this process is a torchrun (torch elastic) worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def stop_with_launcher(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send this process ``signum`` when its parent (the torchrun launcher) dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``): training then stops after its step with a checkpoint, ``generate-set`` after its
    batch (:class:`~starflow.signals.StopSignals`), other commands end.

    A launcher that died while the request was made is treated the same: ``signum`` is sent at once, as the kernel
    would never send it. (A parent that is PID 1 is not taken for a dead launcher: in a container torchrun is often
    PID 1 itself.)

    Returns:
        Whether it was set (False off Linux, or when the launcher died meanwhile).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the launcher died while this asked: nobody will send it
        os.kill(os.getpid(), signum)
        return False
    return True
