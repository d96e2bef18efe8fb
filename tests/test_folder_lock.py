"""One writer per run folder: a training logdir or a sample set another live process writes is refused."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from starflow.assets import DEMO_DIR
from starflow.cli import main
from starflow.folder_lock import LOCK_FILE, FolderBusyError, FolderLock

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time\nfrom starflow.folder_lock import FolderLock\nFolderLock(sys.argv[1], 'x').acquire()\n"
        "print('locked', flush=True)\ntime.sleep(600)\n")


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that locks ``folder`` and keeps it (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _refused_while_held(folder: Path) -> None:
    """Another process holds ``folder``'s lock: this one is refused, naming it; then the holder is killed."""
    holder = _holder(folder)
    try:
        with pytest.raises(FolderBusyError, match=rf"process {holder.pid} on .* is writing to this sample set now"):
            FolderLock(folder, "sample set").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_live_holder_is_refused_and_a_killed_one_frees_the_folder(tmp_path) -> None:
    _refused_while_held(tmp_path)
    with FolderLock(tmp_path, "sample set"):  # the kernel dropped the dead holder's lock: no stale lock to clean
        assert (tmp_path / LOCK_FILE).is_file()


def test_nested_holders_in_one_process_share_the_lock(tmp_path) -> None:
    outer = FolderLock(tmp_path, "logdir").acquire()
    inner = FolderLock(tmp_path / ".", "logdir").acquire()  # the same folder, spelled otherwise
    inner.release()
    probe = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(tmp_path)],
                           capture_output=True, text=True)
    assert probe.returncode == 1 and "FolderBusyError" in probe.stderr  # the outer holder still has it
    outer.release()
    assert not FolderLock._held


def test_generate_set_and_train_refuse_a_folder_another_run_writes(tmp_path, digits, capsys) -> None:
    out, logdir = tmp_path / "set", tmp_path / "run"
    out.mkdir()
    logdir.mkdir()
    holders = [_holder(out), _holder(logdir)]
    try:
        assert main(["generate-set", "--checkpoint_path", str(DEMO_DIR), "--caption", "a handwritten digit 4",
                     "--num_samples", "2", "--out", str(out), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"process {holders[0].pid}" in err and "is writing to this sample set now" in err and "--out" in err
        assert not list(out.glob("*.png"))
        assert main(["train", "--config", str(ROOT / "configs" / "demo_digits.yaml"), "--data", str(digits["train"]),
                     "--logdir", str(logdir), "--device", "cpu", "--steps", "2", "--sample_freq", "0"]) == 2
        err = capsys.readouterr().err
        assert f"process {holders[1].pid}" in err and "is writing to this training logdir now" in err
        assert not (logdir / "config.yaml").exists() and not (logdir / "checkpoints").exists()
    finally:
        for h in holders:
            h.send_signal(signal.SIGKILL)
            h.wait()
    assert main(["generate-set", "--checkpoint_path", str(DEMO_DIR), "--caption", "a handwritten digit 4",
                 "--num_samples", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert len(list(out.glob("*.png"))) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_is_stopped_when_its_launcher_is_killed(tmp_path) -> None:
    """torchrun starts workers in their own session; ``stop_with_launcher`` (called by ``init_distributed`` under
    torchrun) turns the launcher's death into a SIGTERM for them."""
    flag = tmp_path / "stopped"
    worker = ("import signal, sys, time\nfrom starflow.distributed import stop_with_launcher\n"
              "signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], 'w').write('TERM'), sys.exit(0)))\n"
              "print(stop_with_launcher(), flush=True)\ntime.sleep(120)\n")
    launcher = ("import subprocess, sys, time\n"
                f"w = subprocess.Popen([sys.executable, '-c', {worker!r}, sys.argv[1]], start_new_session=True, "
                "stdout=subprocess.PIPE, text=True)\nprint(w.stdout.readline().strip(), flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher, str(flag)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "True"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30  # (the file exists before its text is written: wait for the text)
    while not (flag.exists() and flag.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    assert flag.read_text() == "TERM"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_of_a_launcher_that_is_pid_1_runs(tmp_path) -> None:
    """In a container torchrun is often PID 1: its workers are tied to it, not stopped."""
    worker = ("import signal, sys\nimport starflow.worker as w\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('TERM', flush=True), sys.exit(0)))\n"
              "w.os.getppid = lambda: 1\nprint(w.stop_with_launcher(), flush=True)\n")
    r = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["True"]


def test_the_command_ties_a_torchrun_worker_to_its_launcher_before_importing_torch() -> None:
    probe = ("import os, sys\nimport starflow.worker as w\ncalls = []\n"
             "w.stop_with_launcher = lambda *a: calls.append('torch' in sys.modules)\n"
             "import starflow.cli\nprint(calls, 'torch' in sys.modules)\n")
    env = dict(os.environ, TORCHELASTIC_RUN_ID="probe")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert r.stdout.strip() == "[False] True", r.stderr[-2000:]
    env.pop("TORCHELASTIC_RUN_ID")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert r.stdout.strip() == "[] True"  # a plain process keeps its default


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch) -> None:
    import errno

    import starflow.folder_lock as folder_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(folder_lock.fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="cannot lock this training logdir .*Function not implemented.*going on"):
        lock = FolderLock(tmp_path, "training logdir").acquire()
    lock.release()
    assert not FolderLock._held


def test_another_users_lock_file_still_locks_and_new_ones_follow_the_umask(tmp_path, monkeypatch) -> None:
    """A group sharing a folder shares its lock: the file is made with the umask's permissions, and a lock file this
    user cannot write (another user's) is locked through a descriptor opened for reading."""
    import starflow.folder_lock as folder_lock

    old = os.umask(0o002)
    try:
        FolderLock(tmp_path, "sample set").acquire().release()
    finally:
        os.umask(old)
    assert (tmp_path / LOCK_FILE).stat().st_mode & 0o777 == 0o664
    real_open = os.open

    def not_writable(path, flags, *args):  # (root writes any file: the refusal another user gets, simulated)
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(folder_lock.os, "open", not_writable)
    _refused_while_held(tmp_path)
    lock = FolderLock(tmp_path, "sample set").acquire()  # free again: taken read-only, no warning
    assert FolderLock._held
    lock.release()


def test_pack_refuses_a_shard_folder_another_process_writes(tmp_path, digits, capsys) -> None:
    """Two packs (or latent caches) into one folder: the second is refused, and the first one's staging folder, which
    the second would have taken for a killed run's, stays."""
    out = tmp_path / "shards"
    out.mkdir()
    staging = out / ".staging-live"  # the running pack's work in progress
    staging.mkdir()
    holder = _holder(out)
    try:
        assert main(["pack", str(digits["train"]), str(out)]) == 2
        assert f"process {holder.pid}" in capsys.readouterr().err and staging.is_dir()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(["pack", str(digits["train"]), str(out)]) == 0 and not staging.exists()  # a dead run's: cleared
    assert (out / "index.json").is_file()


def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path) -> None:
    """A DataLoader worker forked while the lock is held must not hold it on: after its parent lets go (or is killed),
    the folder can be locked again at once, while the orphaned worker still lives."""
    import fcntl

    lock = FolderLock(tmp_path, "training logdir").acquire()
    ready, started = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: started (its fork handlers have run), then alive for a while doing nothing
        os.write(started, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"
        lock.release()
        fd = os.open(tmp_path / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the child's copy held it
        finally:
            os.close(fd)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready)
        os.close(started)
