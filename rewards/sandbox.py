"""Run untrusted Python under OS limits: the sandbox behind the `code` reward.

Two entry points:
- `run_python(source, stdin=...)`: the program's exit status and output (stdin/stdout tests; the
  caller compares stdout, in its own process).
- `run_assert_tests(source, tests)`: pass/fail of assert-style tests, decided by a judge interpreter
  the program never controls (rewards/sandbox_judge.py). The program runs in its own sandbox per test
  and only answers the judge's calls with plain data (rewards/sandbox_wire.py); the tests' code,
  their expected values and every comparison stay in the judge.

What each run gets (rewards/sandbox_host.py probes the machine; docs/rewards.md states the guarantees):
- isolation (bubblewrap): an empty read-only root with only the interpreter, its standard library and
  the shared libraries it loads; a size-capped tmpfs as work dir; new pid, network, ipc, mount and uts
  namespaces; its own uid as root (every capability dropped), the caller's uid in a user namespace else.
- memory_cap, process_cap: a cgroup per run capping the memory of all its processes (shared memory,
  memfds and tmpfs files included) and their number.
- always: rlimits (CPU seconds, address space per process, file size, open files, no core dumps),
  no_new_privs, a wall clock from the program's first statement (start-up is not its time), the
  Python audit hook as a second layer, and nothing left behind (see rewards/sandbox_process.py).
Where a machine-dependent guarantee is missing, both entry points raise SandboxError unless the caller
names it in `allow_missing`.
"""

import logging
import signal
import time
from dataclasses import dataclass

from rewards.sandbox_host import GUARANTEES, WITHOUT, SandboxError, check
from rewards.sandbox_process import UID_BASE, Limits, Run, pump
from rewards.sandbox_wire import dumps, loads

__all__ = ["RunResult", "SandboxError", "TestVerdict", "UID_BASE", "run_assert_tests", "run_python"]

logger = logging.getLogger(__name__)

_JUDGE_LINE_CAP = 64 << 20  # the tests' own requests (trusted code, large arguments are fine)
_JUDGE_MIN_MEMORY_MB = 256
_warned: set[frozenset[str]] = set()


@dataclass(frozen=True)
class RunResult:
    """Outcome of one run_python call.

    status: "ok" (exit 0), "timeout" (wall clock or CPU limit), "memory" (MemoryError, or killed at the
    memory cap), "crash" (nonzero exit or signal), "syntax_error" (the source does not compile),
    "output_limit" (stdout passed max_output_bytes; killed).
    returncode: the program's exit code, -N if killed by signal N, None if stopped by us.
    stdout / stderr: UTF-8 (bad bytes replaced), each at most max_output_bytes.
    seconds: wall time from the program's first statement. guarantees: those in force (GUARANTEES).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    guarantees: tuple[str, ...] = ()


@dataclass(frozen=True)
class TestVerdict:
    """One assert-style test. status: "ok" if passed, else how the program's run went ("failed": it ran
    fine but the test did not pass; or a RunResult status). detail: the judge's reason for a failure."""

    passed: bool
    status: str
    detail: str | None = None


def run_python(
    source: str,
    *,
    stdin: str = "",
    timeout_s: float,
    cpu_s: float | None = None,
    memory_mb: int = 512,
    max_processes: int = 8,
    max_file_mb: int = 16,
    max_open_files: int = 128,
    max_output_bytes: int = 1_000_000,
    use_audit_hook: bool = True,
    allow_missing: tuple[str, ...] | list[str] = (),
) -> RunResult:
    """Run `source` as __main__ with `stdin`, like `python solution.py`, in a sandbox (module doc).

    timeout_s: wall clock from the program's first statement. cpu_s: CPU seconds of its process
    (rounded up to whole seconds; default timeout_s). memory_mb: everything the run holds (one cgroup),
    and the address space of each process. max_processes: processes + threads, the program included.
    max_file_mb: per file, and the work dir and /dev/shm each. max_open_files: per process.
    use_audit_hook=False leaves the OS layers alone (tests prove each holds by itself).
    allow_missing: guarantees this call may run without. Raises SandboxError if the sandbox itself
    fails or a guarantee is missing; every failure of the program is a status.
    """
    limits = Limits(timeout_s, timeout_s if cpu_s is None else cpu_s, memory_mb, max_processes, max_file_mb,
                    max_open_files, max_output_bytes, use_audit_hook)
    host = _host(allow_missing)
    run = Run(host, "program", {"source": source}, limits, stdin=stdin.encode(errors="surrogateescape"))
    try:
        pump([run], until=lambda: False)
    finally:
        run.close()
    _raise_if_not_started(run)
    return RunResult(_status(run), run.returncode if run.stop is None else None,
                     run.stdout.decode(errors="replace"), run.stderr.decode(errors="replace"), run.seconds,
                     _guarantees(host))


def run_assert_tests(
    source: str,
    tests: list[str],
    *,
    timeout_s: float,
    cpu_s: float | None = None,
    memory_mb: int = 512,
    max_processes: int = 8,
    max_file_mb: int = 16,
    max_open_files: int = 128,
    max_output_bytes: int = 1_000_000,
    use_audit_hook: bool = True,
    allow_missing: tuple[str, ...] | list[str] = (),
) -> list[TestVerdict]:
    """One verdict per test (Python source with asserts), in order; limits as in run_python, per test,
    where timeout_s counts the program's own time: its start, and each call from its arrival to the
    answer (not the time it waits while the judge runs the test's code).

    A test passes iff its code runs to its end in the judge, and the program started, ran its own code
    to the end (no exit, exception or signal) and was still running when the test ended. A syntax
    error fails every test after the first without running them. Raises SandboxError as run_python.
    """
    limits = Limits(timeout_s, timeout_s if cpu_s is None else cpu_s, memory_mb, max_processes, max_file_mb,
                    max_open_files, max_output_bytes, use_audit_hook)
    budget_s = len(tests) * (timeout_s + 1.0) + 10.0  # the judge waits on the programs; this bounds the rest
    judge_limits = Limits(budget_s, budget_s, max(memory_mb, _JUDGE_MIN_MEMORY_MB), 4, max_file_mb,
                          max_open_files, max_output_bytes, use_audit_hook=False)  # the judge runs no model code
    return _Session(_host(allow_missing), source, tests, limits, judge_limits).run()


class _Session:
    """A judge and, test by test, the program it questions; this process relays between them."""

    def __init__(self, host, source: str, tests: list[str], limits: Limits, judge_limits: Limits):
        self.host, self.source, self.tests, self.limits = host, source, tests, limits
        self.judge = Run(host, "judge", {"tests": list(tests)}, judge_limits, line_cap=_JUDGE_LINE_CAP)
        self.syntax_error = False

    def run(self) -> list[TestVerdict]:
        verdicts: list[TestVerdict] = []
        try:
            while len(verdicts) < len(self.tests):
                verdict = self._test(len(verdicts))
                if verdict is None:  # the judge is gone: the remaining tests cannot pass
                    self.judge.close()
                    _raise_if_not_started(self.judge)
                    reason = f"the judge stopped ({self.judge.stop or 'exited'}): {self._judge_stderr()}"
                    verdicts += [TestVerdict(False, "failed", reason)] * (len(self.tests) - len(verdicts))
                else:
                    verdicts.append(verdict)
        finally:
            self.judge.close()
        return verdicts

    def _test(self, index: int) -> TestVerdict | None:
        message = self._from_judge([])
        if message is None or message.get("run") != index:
            return None
        if self.syntax_error:  # the source cannot compile: no need to start it again
            return self._finish(index, [], {"ended": "syntax_error"}, "syntax_error")
        program = Run(self.host, "serve", {"source": self.source}, self.limits)
        try:
            pump([program, self.judge], until=lambda: bool(program.lines) or program.finished)
            if not program.lines or program.messages()[:1] != [{"event": "ready"}]:
                program.kill()
                program.close()
                _raise_if_not_started(program)
                status = _status(program)
                self.syntax_error = status == "syntax_error"
                return self._finish(index, [], {"ended": status}, status)
            program.lines.popleft()
            program.pause()  # the judge's own time is not the program's
            return self._finish(index, [program], {"ready": True}, None)
        finally:
            program.close()

    def _finish(self, index: int, live: list[Run], first_reply: dict, status: str | None) -> TestVerdict | None:
        """Answer the judge until it says the test is done; relay its requests to the program in `live`."""
        reply = dumps(first_reply)
        while True:
            if not self.judge.write(reply, self.judge.deadline):
                return None
            message = self._from_judge(live)
            if message is None:
                return None
            if "done" in message:
                break
            reply = self._relay(message, live[0]) if live else dumps({"ended": status})
        passed = message.get("done") == index and message.get("passed") is True
        if live and not live[0].alive():  # a program that ended during the test fails it
            program = live[0]
            program.kill()
            program.close()
            passed, status = False, _status(program)
        if passed:
            return TestVerdict(True, "ok")
        return TestVerdict(False, status or "failed", str(message.get("error") or status))

    def _relay(self, message: dict, program: Run) -> bytes:
        """The program's answer to one judge request, or {"ended": why} if it cannot answer."""
        program.resume()
        if program.stop is None and program.write(dumps(message), program.deadline):
            pump([program, self.judge], until=lambda: bool(program.lines) or program.finished)
            if program.lines:
                program.pause()
                return program.lines.popleft() + b"\n"
        program.kill("timeout" if time.monotonic() >= program.deadline else None)
        return dumps({"ended": program.stop or "the program exited"})

    def _from_judge(self, live: list[Run]) -> dict | None:
        judge = self.judge
        pump([judge, *live], until=lambda: bool(judge.lines) or judge.finished)
        if not judge.lines:
            return None
        try:
            return loads(judge.lines.popleft())
        except ValueError:
            return None

    def _judge_stderr(self) -> str:
        return self.judge.stderr.decode(errors="replace")[-500:] or "no message"


def _host(allow_missing: tuple[str, ...] | list[str]):
    host = check(allow_missing)
    missing = frozenset(host.missing)
    if missing and missing not in _warned:
        _warned.add(missing)
        logger.warning("code sandbox without %s (accepted by allow_missing): %s", ", ".join(sorted(missing)),
                       "; ".join(f"without {name}, {WITHOUT[name]}" for name in sorted(missing)))
    return host


def _guarantees(host) -> tuple[str, ...]:
    return tuple(name for name in GUARANTEES if name not in host.missing)


def _raise_if_not_started(run: Run) -> None:
    if run.started_at is None and run.stop not in ("timeout", "output_limit"):
        why = "did not start within its start-up time" if run.stop == "start_timeout" else \
            f"exited before the program started (exit code {run.returncode})"
        raise SandboxError(f"the sandbox {why}: {run.stderr.decode(errors='replace')[-2000:]}")


def _status(run: Run) -> str:
    """A closed run's status (RunResult.status)."""
    if run.stop in ("timeout", "output_limit"):
        return run.stop
    events = {message.get("event") for message in run.messages()}
    if "syntax_error" in events:
        return "syntax_error"
    if "memory" in events or run.oom_kills:
        return "memory"
    code = run.returncode
    if code is not None and code < 0:
        timed_out = -code == signal.SIGXCPU or (-code == signal.SIGKILL and run.cpu_s >= run.limits.cpu_s)
        return "timeout" if timed_out else "crash"
    return "ok" if code == 0 else "crash"
