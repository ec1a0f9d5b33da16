"""Ctrl-C: a clean stop that says where it stopped and how to go on; a second Ctrl-C exits at once.

The first SIGINT raises KeyboardInterrupt as usual, so the run unwinds through its `finally`
blocks (reward workers stopped, metrics closed, process group left); nothing is saved then, and
nothing needs to be: checkpoints are written atomically, so the newest complete one is the state to
resume from. The stop prints one line naming the step, that checkpoint and the command that resumes,
and exits 130 (128 + SIGINT, what shells report). Cleanup can wait on a reward call that hangs (up to
reward.timeout_s): a second SIGINT exits at once.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

EXIT_CODE = 130


@dataclass
class RunState:
    """What the stop message needs, filled in as the run gets going."""

    args: list[str] = field(default_factory=list)
    total_steps: int = 0
    run_dir: Path | None = None
    trainer: object | None = None  # rlcore.trainer.Trainer once built


@contextmanager
def second_interrupt_exits():
    """While inside: the first SIGINT raises KeyboardInterrupt, any later one exits the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum, frame):
        signal.signal(signal.SIGINT, _exit_now)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_now(signum, frame) -> None:
    os.write(2, b"\nsecond Ctrl-C: exiting now\n")
    os._exit(EXIT_CODE)


def launched_by_rlcore() -> bool:
    """True in a rank that `rlcore train trainer.nproc=N` started (its launcher reports the stop)."""
    from rlcore.runlock import HELD_ENV

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and HELD_ENV in os.environ


def stopped_line(run: RunState) -> str:
    """One line: where the run stopped, its newest complete checkpoint, the command that resumes."""
    from rlcore.checkpoint import checkpoint_dirs

    if run.run_dir is None:
        return "interrupted before the run folder was set up; nothing to resume"
    done = _steps_done(run)
    if done >= run.total_steps:
        where = f"interrupted after the last step ({done}/{run.total_steps}), before the export was complete"
    elif done:
        where = f"interrupted in step {done + 1}/{run.total_steps} (steps 1-{done} done)"
    else:
        where = f"interrupted before step 1/{run.total_steps} finished"
    saved = checkpoint_dirs(run.run_dir)
    resume = shlex.join(["rlcore", "train", *_resume_args(run.args, run.run_dir)])
    if not saved:
        return f"{where}; no checkpoint yet, so resuming starts over: {resume}"
    return f"{where}; last complete checkpoint {saved[-1]}; resume with: {resume}"


def _steps_done(run: RunState) -> int:
    if run.trainer is not None:
        return int(run.trainer.step)
    metrics = run.run_dir / "metrics.jsonl"  # the launcher of several ranks has no trainer: read the log
    if not metrics.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _resume_args(args: list[str], run_dir: Path) -> list[str]:
    """The same command, with the run folder named and trainer.resume back to its default (auto)."""
    keep = [a for a in args if not a.lstrip("+").startswith(("trainer.output_dir=", "trainer.resume="))]
    return [*keep, f"trainer.output_dir={run_dir}"]
