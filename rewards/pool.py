"""Persistent worker processes with a wall-clock limit on every call: rewards, and the tools a
policy calls during rollout (rlcore.tools).

Why processes: Math-Verify's timeouts use SIGALRM (main thread only), and hung user code can
only be stopped by killing its process. Workers are started with 'spawn' because forking a
process that already runs torch threads can deadlock the child. Each worker imports the
functions itself, by name (user files by absolute path) through a resolver named as
"module:function" (rewards by default), and then serves one task at a time: the parent hands
the next task to whichever worker is free, so a slow call holds up one worker, not the batch,
and a task's clock starts when it is sent.
"""

import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

Task = tuple
"""(function index, *positional arguments): a reward's (index, prompt, response, row)."""
Outcome = tuple[Any, str | None, bool]
"""(value, error message or None, timed out). Failed calls give 0.0 (results="float") or None."""

REWARD_RESOLVER = "rewards.registry:resolve_reward"

_STARTUP_TIMEOUT_S = 300.0  # spawn + imports; generous because a loaded node starts slowly


def _worker_main(conn: Connection, names: list[str], kwargs_list: list[dict], resolver: str = REWARD_RESOLVER,
                 results: str = "float") -> None:
    """Worker loop: resolve the functions, say "ready", then answer tasks until None or EOF.

    A fn may carry a `warmup()` attribute, called before "ready" (math imports Math-Verify
    there, so that ~1 s is not charged to the first sample's time limit). results="float": each
    value must be a finite number (rewards); "any": sent back as returned (must pickle).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the trainer, which stops us
    _exit_with_parent()
    try:
        import importlib

        module, _, fn_name = resolver.partition(":")
        resolve = getattr(importlib.import_module(module), fn_name)
        fns = [resolve(name) for name in names]
        for fn in fns:
            getattr(fn, "warmup", lambda: None)()
    except BaseException as e:
        conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, *args = task
        failed = 0.0 if results == "float" else None
        try:
            value = fns[index](*args, **kwargs_list[index])
            if results == "float":
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"reward returned {value}")
            conn.send((value, None))
        except BaseException as e:  # SystemExit from user code included: report, keep serving
            conn.send((failed, f"{type(e).__name__}: {e}"))


def _exit_with_parent() -> None:
    # A worker stuck in user code never reads the EOF left by a killed trainer; poll instead.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


_MAIN_LOCK = threading.Lock()


@contextmanager
def _main_hidden() -> Iterator[None]:
    """Start processes without spawn re-running the parent's main script in them.

    spawn imports the parent's __main__ file in every child (as __mp_main__): for the trainer
    that is torch and the model code again in each worker (seconds, GBs), and a script without
    an `if __name__ == "__main__":` guard would start workers recursively. Workers need
    nothing from it, so it is swapped for an empty module while the child is launched.
    """
    with _MAIN_LOCK:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            sys.modules["__main__"] = main


@dataclass
class _Worker:
    proc: Any  # mp.context.SpawnProcess
    conn: Connection
    deadline: float  # start-up deadline until ready, then the running task's deadline
    ready: bool = False
    task: int | None = None


class WorkerPool:
    """`num_workers` processes that run tasks with a per-call wall-clock limit.

    names[i] / kwargs_list[i] define function i: `resolver` ("module:function", importable in a
    fresh process) maps a name to a callable, called as fn(*task[1:], **kwargs_list[i]); rewards by
    default. results: "float" (a finite number; failures give 0.0) or "any" (failures give None).
    On a timeout the worker is killed and replaced; on a crash likewise. Thread-safe (one batch
    at a time). Workers start in the constructor; the first `run` waits for them.
    """

    def __init__(self, names: list[str], kwargs_list: list[dict], *, num_workers: int, timeout_s: float,
                 resolver: str = REWARD_RESOLVER, results: str = "float", name: str = "reward-worker"):
        if results not in ("float", "any"):
            raise ValueError(f"WorkerPool results={results!r}: expected 'float' or 'any'")
        self._ctx = mp.get_context("spawn")
        self._args = (list(names), [dict(k) for k in kwargs_list], resolver, results)
        self._failed = 0.0 if results == "float" else None
        self._name = name
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        # The finalizer holds the list, not self, so a dropped pool still stops its workers.
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        self._workers.extend(self._spawn() for _ in range(num_workers))

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        # daemon: multiprocessing kills it at exit even if close() was never called.
        proc = self._ctx.Process(
            target=_worker_main, args=(child_conn, *self._args), daemon=True, name=self._name
        )
        with _main_hidden():
            proc.start()
        child_conn.close()  # so the parent sees EOF when the worker dies
        return _Worker(proc, parent_conn, deadline=time.monotonic() + _STARTUP_TIMEOUT_S)

    def _replace(self, i: int) -> None:
        _kill(self._workers[i])
        self._workers[i] = self._spawn()

    def run(self, tasks: Sequence[Task]) -> list[Outcome]:
        """One outcome per task, in order. Raises only if a worker cannot start."""
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError(f"{self._name} pool is closed")
            try:
                return self._run(tasks)
            except BaseException:
                # A reply still in flight would be read as the answer to a later task.
                for i in range(len(self._workers)):
                    self._replace(i)
                raise

    def _run(self, tasks: Sequence[Task]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        num_done = 0
        while num_done < len(tasks):
            for i, w in enumerate(self._workers):
                if w.ready and w.task is None and pending:
                    num_done += self._send(i, pending, tasks, outcomes)
            waiting = [w for w in self._workers if w.task is not None or not w.ready]
            if not waiting:
                continue  # only unpicklable tasks were left
            next_deadline = min(w.deadline for w in waiting)
            handles = [w.conn for w in waiting] + [w.proc.sentinel for w in waiting]
            ready = set(wait(handles, timeout=max(0.0, next_deadline - time.monotonic())))
            for i, w in enumerate(self._workers):
                if w.conn in ready or w.proc.sentinel in ready:
                    num_done += self._receive(i, outcomes)
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if (w.task is not None or not w.ready) and now >= w.deadline:
                    if not w.ready:
                        raise RuntimeError(f"{self._name} did not start within {_STARTUP_TIMEOUT_S:.0f} s")
                    outcomes[w.task] = (self._failed, f"timed out after {self._timeout_s} s", True)
                    num_done += 1
                    self._replace(i)
        return outcomes  # type: ignore[return-value]  # every slot is filled

    def _send(self, i: int, pending: deque, tasks: Sequence[Task], outcomes: list) -> int:
        """Hand the next pending task to idle worker i; returns 1 if it failed at once."""
        w, t = self._workers[i], pending.popleft()
        try:
            payload = pickle.dumps(tasks[t], protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            outcomes[t] = (self._failed, f"cannot pickle the task for the worker: {type(e).__name__}: {e}", False)
            return 1
        try:
            w.conn.send_bytes(payload)
        except OSError:  # died since its last reply; nothing ran, so retry the task elsewhere
            pending.appendleft(t)
            self._replace(i)
            return 0
        w.task, w.deadline = t, time.monotonic() + self._timeout_s
        return 0

    def _receive(self, i: int, outcomes: list) -> int:
        """Read worker i's message (or its death); returns the number of tasks finished."""
        w = self._workers[i]
        try:
            value, error = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(timeout=1.0)
            if not w.ready:
                raise RuntimeError(f"{self._name} exited while starting (exit code {w.proc.exitcode})") from None
            finished = 0
            if w.task is not None:
                outcomes[w.task] = (self._failed, f"{self._name} died (exit code {w.proc.exitcode})", False)
                finished = 1
            self._replace(i)
            return finished
        if not w.ready:
            if value == "init_error":
                raise RuntimeError(f"{self._name} failed to start: {error}")
            w.ready = True
            return 0
        outcomes[w.task] = (value, error, False)
        w.task = None
        return 1

    def close(self) -> None:
        """Stop the workers (idempotent). Hung workers are killed after 1 s."""
        self._finalizer()


def _kill(w: _Worker) -> None:
    w.proc.kill()
    w.proc.join()
    w.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except OSError:
            pass
    deadline = time.monotonic() + 1.0
    for w in workers:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.proc.is_alive():
            logger.warning("worker %d (%s) did not stop; killing it", w.proc.pid, w.proc.name)
        _kill(w)
