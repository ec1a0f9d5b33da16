"""One sandboxed interpreter, seen from the parent: start it, talk to it, stop it, leave nothing behind.

    worker -> [sh: join the run's cgroups, exec] -> bwrap -> bwrap's init (pid 1) -> python (sandbox_child)

The code (sandbox_wire, sandbox_audit, sandbox_child, sandbox_judge) goes in through a sealed memfd shared
by all runs, the run's config and stdin through memfds of their own: nothing of a run is on the host's
disk, so a killed worker leaves no files (without isolation the work dir is a host temp dir; those of
dead workers are removed by the next run). No preexec_fn: it is unsafe in a threaded parent, and the
reward workers run a watchdog thread. Output is read with one selector over all of a run's pipes;
`pump` drives several runs at once (the judge and the program it questions).
"""

import fcntl
import itertools
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rewards.sandbox_cgroup import is_alive
from rewards.sandbox_host import WORK_DIR, Host, SandboxError, base_args

_SOURCES = ("sandbox_wire", "sandbox_audit", "sandbox_child", "sandbox_judge")
# The shipped modules become rewards.<name> in sys.modules (a package stub, no path: nothing is imported
# from the checkout), so they import each other as they do in the parent.
_BOOT = ("import marshal, os, sys, types; fd = int(sys.argv[2]); code = os.pread(fd, os.fstat(fd).st_size, 0); "
         "os.close(fd); sys.modules['rewards'] = types.ModuleType('rewards'); sys.modules['rewards'].__path__ = []\n"
         "for name, c in marshal.loads(code):\n"
         "    m = sys.modules['rewards.' + name] = types.ModuleType('rewards.' + name); exec(c, m.__dict__)\n"
         "sys.modules['rewards.sandbox_child'].main(int(sys.argv[3]))")
# sh joins the cgroups ($1 = how many cgroup.procs files follow), then becomes the sandbox: everything
# the run starts is in its cgroups before any of it runs.
_JOIN = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n - 1)); done; exec "$@"'
_START_TIMEOUT_S = 30.0  # spawn to "started": only an overloaded machine gets near it
_EXIT_GRACE_S = 0.2  # after the top process exits, how long leftovers may hold its pipes
UID_BASE = 2_000_000_000  # run uids (as root): base + worker pid * 256 + n, unused by real users
_uid_counter = itertools.count()
_code_fd: list[int] = []
_cleaned_temp = []


@dataclass(frozen=True)
class Limits:
    """Per run. timeout_s: wall clock from the program's start; cpu_s: CPU seconds of its process."""

    timeout_s: float
    cpu_s: float
    memory_mb: int = 512
    max_processes: int = 8
    max_file_mb: int = 16
    max_open_files: int = 128
    max_output_bytes: int = 1_000_000
    use_audit_hook: bool = True


class Run:
    """A started sandbox. `lines`: its messages to us (JSON lines) other than "started"; `stop`: None,
    "timeout" or "output_limit" once we killed it for that. `close()` reaps and removes everything."""

    def __init__(self, host: Host, role: str, payload: dict, limits: Limits, *, stdin: bytes = b"",
                 line_cap: int | None = None):
        self.host, self.role, self.limits = host, role, limits
        self.isolated = host.bwrap is not None
        self.line_cap = limits.max_output_bytes if line_cap is None else line_cap
        self.stdout, self.stderr, self.lines = bytearray(), bytearray(), deque()
        self.started_at: float | None = None
        self._paused_at: float | None = None
        self._paused_s = 0.0  # time spent waiting for the judge's next call: not the program's
        self.stop: str | None = None
        self.exited_at: float | None = None
        self.returncode: int | None = None
        self.cpu_s, self.oom_kills = 0.0, 0
        self._partial, self._closed = bytearray(), False
        self.cgroup = None
        self.work = WORK_DIR if self.isolated else _make_work_dir()
        self.run_uid = UID_BASE + ((os.getpid() & 0x3FFFFF) << 8 | next(_uid_counter) & 0xFF) \
            if os.geteuid() == 0 else None
        try:
            if host.cgroups is not None:
                self.cgroup = host.cgroups.create(limits.memory_mb << 20, limits.max_processes + 2 * self.isolated)
            self._spawn(payload, stdin)
        except BaseException:
            self.close()
            raise

    def _spawn(self, payload: dict, stdin: bytes) -> None:
        out_r, out_w = os.pipe()
        in_r, in_w = os.pipe() if self.role != "program" else (-1, -1)
        cfg = {"role": self.role, **payload, "work": self.work, "run_uid": self.run_uid, "isolated": self.isolated,
               "cpu_s": float(self.limits.cpu_s), "memory_mb": self.limits.memory_mb,
               "max_file_mb": self.limits.max_file_mb, "max_open_files": self.limits.max_open_files,
               "max_nproc": self._max_nproc(), "use_audit_hook": self.limits.use_audit_hook,
               "parent_pid": os.getpid(), "out_fd": out_w, "in_fd": in_r}
        config_fd, stdin_fd = _memfd("config", marshal.dumps(cfg)), _memfd("stdin", stdin)
        argv = [self.host.python, "-I", "-S", "-B", "-c", _BOOT, "rlcore-sandbox", str(_shared_code_fd()),
                str(config_fd)]
        if self.isolated:
            mb = self.limits.max_file_mb
            argv = [self.host.bwrap, *base_args(self.host.view, self.host.library_path, mb, mb), *argv]
        if self.cgroup is not None:
            argv = ["/bin/sh", "-c", _JOIN, "sh", str(len(self.cgroup.procs_files)), *self.cgroup.procs_files, *argv]
        env = {} if self.isolated else {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.work,
                                        "TMPDIR": self.work, "LANG": "C.UTF-8"}
        child_fds = [fd for fd in (_shared_code_fd(), config_fd, out_w, in_r) if fd >= 0]
        try:
            self.proc = subprocess.Popen(argv, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         pass_fds=child_fds, start_new_session=True, env=env,
                                         cwd="/" if self.isolated else self.work)
        except OSError as e:
            for fd in (out_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise SandboxError(f"cannot start the sandbox: {e}") from e
        finally:
            for fd in (config_fd, stdin_fd, out_w, in_r):
                if fd >= 0:
                    os.close(fd)
        self.spawned_at = time.monotonic()
        self.out_fd, self.in_fd = out_r, in_w
        self._open = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr", out_r: "out"}

    def _max_nproc(self) -> int | None:
        """RLIMIT_NPROC, only where no pids cgroup counts the run: per uid, so exact only with our own uid."""
        if self.cgroup is not None and "pids" in self.cgroup.dirs:
            return None
        if self.run_uid is not None:
            return self.limits.max_processes
        if self.isolated:
            return self.limits.max_processes + 1  # counted in bwrap's user namespace: its init too
        return self.limits.max_processes + _count_tasks(os.getuid())

    @property
    def deadline(self) -> float:
        if self.started_at is None:
            return self.spawned_at + _START_TIMEOUT_S
        if self._paused_at is not None:
            return float("inf")
        return self.started_at + self._paused_s + self.limits.timeout_s

    @property
    def seconds(self) -> float:
        """Wall time of the program so far: from its start (not the spawn), pauses left out."""
        if self.started_at is None:
            return 0.0
        end = self._paused_at or self.exited_at or time.monotonic()
        return end - self.started_at - self._paused_s

    def pause(self) -> None:
        """Stop the program's clock while it only waits for the judge's next call."""
        if self._paused_at is None:
            self._paused_at = time.monotonic()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused_s += time.monotonic() - self._paused_at
            self._paused_at = None

    @property
    def finished(self) -> bool:
        if self.stop is not None or not self._open:
            return True
        return self.exited_at is not None and time.monotonic() >= self.exited_at + _EXIT_GRACE_S

    def alive(self) -> bool:
        """Neither stopped by us nor exited, as of now."""
        self._check(time.monotonic())
        return self.stop is None and self.exited_at is None

    def _check(self, now: float) -> None:
        if self.exited_at is None and os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            self.exited_at = now  # WNOWAIT: the zombie keeps the session id ours until close()
        if self.stop is None and not self.finished and now >= self.deadline:
            self.kill("timeout" if self.started_at is not None else "start_timeout")

    def _feed(self, kind: str, data: bytes) -> None:
        if kind == "stderr":
            self.stderr += data[:self.limits.max_output_bytes - len(self.stderr)]  # the rest is drained and dropped
        elif kind == "stdout":
            room = self.limits.max_output_bytes - len(self.stdout)
            self.stdout += data[:room]
            if len(data) > room:
                self.kill("output_limit")
        else:
            self._partial += data
            *lines, rest = self._partial.split(b"\n")
            self._partial = bytearray(rest)
            for line in lines:
                if self.started_at is None and line == b'{"event":"started"}':
                    self.started_at = time.monotonic()
                else:
                    self.lines.append(bytes(line))
            if len(self._partial) > self.line_cap:
                self.kill("output_limit")

    def write(self, data: bytes, deadline: float) -> bool:
        """Send `data` to the run's in_fd; False if it is gone or does not read it by `deadline`."""
        if self.stop is not None or self.in_fd < 0:
            return False
        os.set_blocking(self.in_fd, False)
        view = memoryview(data)
        with selectors.DefaultSelector() as selector:
            selector.register(self.in_fd, selectors.EVENT_WRITE)
            while view:
                if time.monotonic() >= deadline:
                    return False
                if selector.select(timeout=min(0.05, max(0.0, deadline - time.monotonic()))):
                    try:
                        view = view[os.write(self.in_fd, view):]
                    except BlockingIOError:
                        continue
                    except OSError:  # EPIPE: it is gone
                        return False
        return True

    def messages(self) -> list[dict]:
        """The JSON messages received so far (lines that are not JSON objects are skipped)."""
        from rewards.sandbox_wire import loads

        found = []
        for line in self.lines:
            try:
                found.append(loads(line))
            except ValueError:
                pass
        return found

    def kill(self, reason: str | None = None) -> None:
        if reason is not None and self.stop is None:
            self.stop = reason
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its session: sh/bwrap and all that stayed in it
        except (ProcessLookupError, PermissionError):
            pass
        if self.cgroup is not None:
            self.cgroup.kill()  # and what left the session

    def close(self) -> None:
        """Kill what is left, reap, read the exit status, remove the cgroups and work dir (idempotent)."""
        if self._closed:
            return
        self._closed = True
        proc = getattr(self, "proc", None)
        if proc is not None:
            self.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.cpu_s = usage.ru_utime + usage.ru_stime  # includes every descendant that was reaped
            self.returncode = self._program_returncode(status)
            for stream in (proc.stdout, proc.stderr):
                stream.close()
            for fd in (self.out_fd, self.in_fd):
                if fd >= 0:
                    os.close(fd)
            if self.run_uid is not None and not self.isolated:
                _kill_uid(self.run_uid)  # no pid namespace: descendants that left the session
        if self.cgroup is not None:
            self.oom_kills = self.cgroup.oom_kills()
            self.cgroup.remove()
        if not self.isolated:
            shutil.rmtree(self.work, ignore_errors=True)

    def _program_returncode(self, status: int) -> int:
        """The program's exit code, -N if killed by signal N (bwrap reports a child's signal N as 128 + N)."""
        code = os.waitstatus_to_exitcode(status)
        if self.isolated and code > 128:
            return -(code - 128)
        return code


def pump(runs: list[Run], until: Callable[[], bool], deadline: float | None = None) -> None:
    """Read all runs' pipes until `until()`, every run has finished, or `deadline`. Kills a run that
    passes its own deadline (start-up, then timeout_s from the program's start) or its output caps."""
    with selectors.DefaultSelector() as selector:
        for run in runs:
            for fd, kind in run._open.items():
                selector.register(fd, selectors.EVENT_READ, (run, kind))
        while not until():
            now = time.monotonic()
            for run in runs:
                run._check(now)
            active = [run for run in runs if not run.finished]
            if not active or (deadline is not None and now >= deadline):
                return
            wait = min([run.deadline for run in active] + ([deadline] if deadline is not None else [])) - now
            for key, _ in selector.select(timeout=min(max(wait, 0.0), 0.05)):
                run, kind = key.data
                data = os.read(key.fd, 65536)
                if data:
                    run._feed(kind, data)
                else:
                    selector.unregister(key.fd)
                    del run._open[key.fd]


def _shared_code_fd() -> int:
    """A sealed memfd holding the marshalled code objects (compiled once per process, ~10 ms)."""
    if not _code_fd:
        here = os.path.dirname(os.path.abspath(__file__))
        codes = []
        for name in _SOURCES:
            with open(os.path.join(here, name + ".py"), encoding="utf-8") as f:
                codes.append((name, compile(f.read(), f"<{name}>", "exec")))  # no checkout path in tracebacks
        fd = _memfd("rlcore-sandbox-code", marshal.dumps(codes), seal=True)
        _code_fd.append(fd)
    return _code_fd[0]


def _memfd(name: str, data: bytes, *, seal: bool = False) -> int:
    """A memfd holding `data` at offset 0 (sealed: no one can change it, the sandboxed side included)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE)
    return fd


def _make_work_dir() -> str:
    """Without isolation: a host temp dir the run's uid can reach; those of dead processes are removed."""
    parent = _searchable_temp_dir()
    if parent not in _cleaned_temp:
        _cleaned_temp.append(parent)
        for entry in os.scandir(parent):
            owner = entry.name.split("-")[2] if entry.name.startswith("rlcore-sandbox-") else ""
            if owner.isdigit() and not is_alive(int(owner)):
                shutil.rmtree(entry.path, ignore_errors=True)
    path = tempfile.mkdtemp(prefix=f"rlcore-sandbox-{os.getpid()}-", dir=parent)
    os.chmod(path, 0o700)
    return path


def _searchable_temp_dir() -> str:
    """gettempdir(), or /tmp if some dir on its path is closed to others (the run's uid must get
    through to its work dir; e.g. pytest's /tmp/pytest-of-root is mode 0700)."""
    path = os.path.realpath(tempfile.gettempdir())
    parents = [path[:i] or "/" for i, char in enumerate(path) if char == "/"] + [path]
    return path if all(os.stat(p).st_mode & 0o001 for p in parents) else "/tmp"


def _count_tasks(uid: int) -> int:
    """Threads of all processes whose real uid is `uid` (what RLIMIT_NPROC counts)."""
    total = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            total += int(fields["Threads"]) if int(fields["Uid"].split()[0]) == uid else 0
        except (OSError, ValueError, KeyError):
            continue
    return total


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`: kill(-1) from a shell running as that uid."""
    # /bin/sh, not the interpreter: it may sit in a dir that uid cannot enter.
    subprocess.run(["/bin/sh", "-c", "kill -s KILL -1"], user=uid, group=uid, extra_groups=[], env={},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
