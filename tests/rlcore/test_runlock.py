"""One run per run folder: the lock refuses a second run, names the holder, and dies with it."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from rlcore import runlock
from rlcore.runlock import RunFolderBusy

HOLD = """
import os, subprocess, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from rlcore import runlock
run = Path(sys.argv[1])
fd = runlock.acquire(run)
if sys.argv[2] == "launcher":  # as `rlcore train trainer.nproc=N`: torchrun inherits the lock, then the launcher dies
    os.set_inheritable(fd, True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], pass_fds=(fd,))
    print(child.pid, flush=True)
    os._exit(0)
print("locked", flush=True)
time.sleep(120)
"""


def hold(run, mode="plain"):
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO)), str(run), mode],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    return proc, line


def test_second_run_is_refused_naming_the_holder_and_kill_9_frees_the_folder(tmp_path):
    run = tmp_path / "run"
    proc, _ = hold(run)
    try:
        with pytest.raises(RunFolderBusy, match=rf"in use by another rlcore run \(pid {proc.pid} on .*trainer\.output_dir"):
            runlock.acquire(run)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    runlock.acquire(run)  # the OS released the dead holder's lock: resume is never blocked
    runlock.release(run)


def test_the_lock_outlives_the_launcher_while_its_ranks_run(tmp_path):
    """With trainer.nproc the launcher holds the lock and torchrun inherits it: killing the launcher
    leaves the folder locked until the ranks' process ends too."""
    run = tmp_path / "run"
    launcher, child_pid = hold(run, "launcher")
    launcher.wait()
    child_pid = int(child_pid)
    try:
        with pytest.raises(RunFolderBusy):
            runlock.acquire(run)
    finally:
        os.kill(child_pid, signal.SIGKILL)
    deadline = time.time() + 10
    while True:
        try:
            runlock.acquire(run)
            break
        except RunFolderBusy:
            assert time.time() < deadline, "lock not released after its last holder died"
            time.sleep(0.1)
    runlock.release(run)


def test_ranks_started_by_the_holder_do_not_lock_again(tmp_path, monkeypatch):
    run = tmp_path / "run"
    proc, _ = hold(run)
    try:
        monkeypatch.setenv(runlock.HELD_ENV, str(run.resolve()))
        assert runlock.acquire(run) == -1  # held for us by the launcher
        monkeypatch.delenv(runlock.HELD_ENV)
        with pytest.raises(RunFolderBusy):
            runlock.acquire(run)
    finally:
        proc.kill()
        proc.wait()
