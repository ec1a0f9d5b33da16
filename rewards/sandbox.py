"""Run untrusted Python in a subprocess under OS limits: the sandbox behind the `code` reward.

`run_python` starts `python -I -S -B` in a new session, a fresh work dir (removed afterwards)
and a scrubbed environment (PATH, LANG, HOME = TMPDIR = the work dir). That "outer" process
enters namespaces and forks "init", which forks the "user" process: limits, privileges, audit
hook, then the program (then `test_source`, same globals).

    worker -> outer (new session; net + mount ns) -> init (pid 1 of a new pid ns) -> user

Layers, and when each applies (root | non-root with user namespaces | neither):
- wall clock, SIGKILL to the whole session (killpg) on expiry: always.
- rlimits CPU, AS (memory), FSIZE, NPROC, CORE=0: always. NPROC counts per real uid: as root
  the run has a uid of its own (2e9 + outer pid) so NPROC counts only the run; in a user ns it
  counts the ns; with neither it counts all the caller's processes (set to that count + max).
- parent-death SIGKILL (prctl) on every level, each checking its parent survived the fork: always.
- network ns (no interface; lo is down), mount ns (every mount read-only, /run hidden behind an
  empty tmpfs, the work dir a tmpfs of max_file_mb, a private read-only /proc) and pid ns (all
  descendants die with init): root | user ns.
- own uid per run (other users' files, processes, /proc/PID/environ are off limits; kill() of
  the parent fails with EPERM): root only. In a user ns the program keeps the caller's uid with
  every capability dropped (capset), so it cannot remount anything writable. no_new_privs always.
- audit hook: always, second layer. Refuses sockets, exec/spawn, kill of other processes,
  ctypes, gc walks, writes outside the work dir, other pids' /proc; and fork where there is no
  pid ns (a child could setsid and outlive the run). With neither it is the only barrier for
  network, writes and kill: a speed bump (the stdlib it relies on can be monkeypatched), not a
  wall; a warning is logged once. As root without a pid ns the parent also kills every process
  of the run's uid afterwards.

No preexec_fn: it is unsafe in a threaded parent (a child forked while another thread holds a
lock can deadlock) and the reward workers run a watchdog thread. The outer process does its own
setup before any user code runs. The parent-death signal follows the *thread* that started the
run: call from a thread that waits for the result (the reward workers do).

Known limits: test_source shares the program's interpreter, so a program can still beat
assert-style tests from inside (an object whose __eq__ is always True; digging the completion
nonce out of a frame). Ending early with exit code 0 is caught (RunResult.finished). A SIGKILL
of the caller leaves its base dir in the temp dir. Recursion gets the default 8 MB stack.

The child side lives in sandbox_child.py, which imports only os/sys/marshal (+ ctypes, resource).
"""

import logging
import marshal
import os
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from rewards.sandbox_child import _SIGKILL, _SIGXCPU, _UID_BASE

logger = logging.getLogger(__name__)

# The child execs sandbox_child.py's code object, compiled once here: a script run as __main__ never
# uses its .pyc, and compiling this file costs ~10 ms per run.
_BOOT = "import marshal, sys; exec(marshal.load(open(sys.argv[1], 'rb')), {'__name__': '__main__'})"
_code_bytes: list[bytes] = []
_STATUS_MAX_BYTES = 64 * 1024
_EXIT_GRACE_S = 0.2  # after the outer process exits, how long leftovers may hold its pipes
_FULL_LAYERS = frozenset({"net", "mnt", "ro", "pid"})
_warned: set[frozenset[str]] = set()


class SandboxError(RuntimeError):
    """The sandbox could not run the program at all (not the program's fault)."""


@dataclass(frozen=True)
class RunResult:
    """Outcome of one run_python call.

    status: "ok" (exit 0), "timeout" (wall clock or CPU limit), "memory" (MemoryError under the
    address-space limit), "crash" (nonzero exit or signal), "syntax_error" (the source or
    test_source does not compile), "output_limit" (stdout passed max_output_bytes; killed).
    returncode: the program's exit code, -N if killed by signal N, None if stopped by us.
    stdout / stderr: UTF-8 (bad bytes replaced), each at most max_output_bytes.
    finished: the program and then test_source ran to their end (no sys.exit, os._exit,
    exception or signal on the way) and the process exited 0.
    layers: in force: user, net, mnt, tmpfs (work dir), ro (all mounts), pid, proc, ipc, uid.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    finished: bool = False
    layers: tuple[str, ...] = ()


def run_python(
    source: str,
    *,
    stdin: str = "",
    test_source: str | None = None,
    timeout_s: float,
    cpu_s: float | None = None,
    memory_mb: int = 512,
    max_processes: int = 8,
    max_file_mb: int = 16,
    max_output_bytes: int = 1_000_000,
    use_audit_hook: bool = True,
) -> RunResult:
    """Run `source` (then `test_source`, same globals) as __main__ in a sandbox; see module doc.

    timeout_s: wall clock for the whole run, start-up (~30 ms) included. cpu_s: CPU seconds of
    the program's process (rounded up to whole seconds; default timeout_s). memory_mb: address
    space. max_processes: processes + threads of the program, itself included. max_file_mb: per
    file, and in total when the work dir is a tmpfs. use_audit_hook=False leaves the OS layers
    alone (tests prove each holds by itself). Raises SandboxError only if the sandbox itself
    fails; every failure of the program is a status.
    """
    base = tempfile.mkdtemp(prefix="rlcore-sandbox-", dir=_searchable_temp_dir())
    try:
        os.chmod(base, 0o711)  # the run's uid must reach work/, and nothing else in here
        work, stdin_path, config_path, code_path = (os.path.join(base, n) for n in ("work", "stdin", "config", "code"))
        os.mkdir(work, 0o700)
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(stdin)
        with open(code_path, "wb") as f:
            f.write(_child_code())
        status_r, status_w = os.pipe()
        nonce = secrets.token_hex(16)
        config = {
            "source": source, "test_source": test_source, "work": work, "nonce": nonce, "status_fd": status_w,
            "parent_pid": os.getpid(), "cpu_s": float(timeout_s if cpu_s is None else cpu_s),
            "memory_mb": int(memory_mb), "max_processes": int(max_processes), "max_file_mb": int(max_file_mb),
            "use_audit_hook": bool(use_audit_hook),
        }
        with open(os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            marshal.dump(config, f)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        start = time.monotonic()
        try:
            with open(stdin_path, "rb") as stdin_file:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", "-c", _BOOT, code_path, config_path],
                    stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
                    start_new_session=True, env=env, cwd=base,
                )
        finally:
            os.close(status_w)
        try:
            out, err, status, stop = _collect(proc, status_r, start + timeout_s, max_output_bytes)
        finally:
            os.close(status_r)
        events = [line[len(nonce) + 1:] for line in status.decode(errors="replace").splitlines()
                  if line.startswith(nonce + " ")]
        result = _classify(events, stop, proc.returncode, out, err, time.monotonic() - start, config["cpu_s"])
        if "uid" in result.layers and "pid" not in result.layers:
            _kill_uid(_UID_BASE + proc.pid)  # descendants that left the session (setsid)
        return result
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _searchable_temp_dir() -> str:
    """gettempdir(), or /tmp if some dir on its path is closed to others (the run's uid must
    get through to its work dir; e.g. pytest's /tmp/pytest-of-root is mode 0700)."""
    path = os.path.realpath(tempfile.gettempdir())
    parents = [path[:i] or "/" for i, char in enumerate(path) if char == "/"] + [path]
    return path if all(os.stat(p).st_mode & 0o001 for p in parents) else "/tmp"


def _child_code() -> bytes:
    if not _code_bytes:
        path = os.path.join(os.path.dirname(__file__), "sandbox_child.py")
        with open(path, encoding="utf-8") as f:
            _code_bytes.append(marshal.dumps(compile(f.read(), path, "exec")))
    return _code_bytes[0]


def _collect(proc: subprocess.Popen, status_fd: int, deadline: float, max_output_bytes: int):
    """Read stdout/stderr/status until EOF, the deadline or too much stdout; then kill and reap.

    Returns (stdout, stderr, status bytes, stop: None, "timeout" or "output_limit").
    """
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: bytearray(), err_fd: bytearray(), status_fd: bytearray()}
    caps = {out_fd: max_output_bytes, err_fd: max_output_bytes, status_fd: _STATUS_MAX_BYTES}
    stop, exited_at = None, None
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and stop is None:
            now = time.monotonic()
            if now >= deadline:
                stop = "timeout"
                break
            if exited_at is not None and now >= exited_at + _EXIT_GRACE_S:
                break
            for key, _ in selector.select(timeout=min(deadline - now, 0.05)):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                    continue
                room = caps[key.fd] - len(buffers[key.fd])
                buffers[key.fd] += data[:room]  # past the cap stderr/status are drained and dropped
                if key.fd == out_fd and len(data) > room:
                    stop = "output_limit"
            # WNOWAIT leaves the zombie, so its session id cannot be reused before the killpg.
            if exited_at is None and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                exited_at = time.monotonic()
    try:
        os.killpg(proc.pid, _SIGKILL)  # after a timeout everything; after an exit, the leftovers
    except ProcessLookupError:
        pass
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return bytes(buffers[out_fd]), bytes(buffers[err_fd]), bytes(buffers[status_fd]), stop


def _classify(events: list[str], stop: str | None, outer_code: int, out: bytes, err: bytes, seconds: float,
              cpu_s: float) -> RunResult:
    """RunResult from the status lines of outer/init/user (the `_write_line` calls in sandbox_child.py)."""
    started = [e.split(" ")[1] for e in events if e.startswith("started ")]
    layers = tuple(name for name in started[0].split(",") if name) if started else ()
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")

    def result(status: str, code: int | None = None, finished: bool = False) -> RunResult:
        return RunResult(status, code, stdout, stderr, seconds, finished, layers)

    if stop is not None:
        return result(stop)
    if not started:
        raise SandboxError(f"the sandbox did not start the program (exit code {outer_code}): {stderr[-2000:]}")
    missing = _FULL_LAYERS - set(layers)
    if missing and missing not in _warned:
        _warned.add(missing)
        logger.warning("code sandbox without %s: the audit hook alone guards those (see rewards/sandbox.py)",
                       ", ".join(sorted(missing)))
    if "syntax_error" in events or "memory" in events:
        return result("syntax_error" if "syntax_error" in events else "memory", 1)
    ends = [e.split(" ") for e in events if e.startswith(("exit ", "signal "))]
    if not ends:
        return result("crash", outer_code)  # init was killed: count it as the program's crash
    kind, value, used_cpu_s = ends[-1][0], int(ends[-1][1]), float(ends[-1][2])
    if kind == "signal":
        timed_out = value == _SIGXCPU or (value == _SIGKILL and used_cpu_s >= cpu_s)
        return result("timeout" if timed_out else "crash", -value)
    return result("ok" if value == 0 else "crash", value, finished=value == 0 and "done" in events)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`: kill(-1) from a shell running as that uid."""
    # /bin/sh, not sys.executable: the interpreter may sit in a dir that uid cannot enter.
    subprocess.run(["/bin/sh", "-c", "kill -s KILL -1"], user=uid, group=uid, extra_groups=[], env={},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
