"""One run per run folder: an exclusive lock on RUN/.rlcore.lock, held for the life of the run.

Two `rlcore train ... trainer.output_dir=X` at once used to both train to the end, interleaving
metrics.jsonl and overwriting each other's checkpoints. The lock is `flock` on a file in the folder:
the OS releases it when the holding process dies, `kill -9` included, so a lock never outlives its
run and never blocks a resume. The file stays (removing it would let a second run lock a new file
while the first still holds the old one); it names the holder for the refusal message.

Who holds it: a single-process run itself; with `trainer.nproc=N` the launching process, whose
descriptor torchrun inherits too (so the folder stays locked while the ranks run even if the
launcher is killed), and which tells the ranks through RLCORE_RUN_LOCK that the folder is held; under
a torchrun of your own, rank 0.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".rlcore.lock"
HELD_ENV = "RLCORE_RUN_LOCK"
_held: dict[str, int] = {}  # resolved folder -> descriptor, for the life of this process


class RunFolderBusy(ValueError):
    """Another live run holds the folder; the message names its pid."""


def acquire(run_dir: Path) -> int:
    """Lock `run_dir` (created if needed) for this process; returns the descriptor. Raises
    RunFolderBusy naming the holder when another live process has it."""
    key = str(run_dir.resolve())
    if key in _held or os.environ.get(HELD_ENV) == key:
        return _held.get(key, -1)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "a process that has not written its pid yet"
        os.close(fd)
        raise RunFolderBusy(f"run folder {run_dir} is in use by another rlcore run ({holder}); wait for it to end "
                            "or stop it, or set trainer.output_dir to another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    _held[key] = fd
    return fd


def release(run_dir: Path) -> None:
    """Unlock `run_dir` if this process holds it (the OS does it anyway when the process ends)."""
    fd = _held.pop(str(run_dir.resolve()), None)
    if fd is not None:
        os.close(fd)


def env_for_children(run_dir: Path) -> dict[str, str]:
    """Environment telling processes started by the holder that `run_dir` is held for them."""
    return {HELD_ENV: str(run_dir.resolve())}
