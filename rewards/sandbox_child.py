"""The child side of `rewards.sandbox`: run as `python -I -S -B -c _BOOT CODE CONFIG` (see there).

Imports only os/sys/marshal (+ ctypes, resource): the parent's imports (subprocess, dataclasses, ...)
would cost ~40 ms per run. Nothing here may print to stdout.
"""

import marshal
import os
import sys

_SIGKILL, _SIGXCPU = 9, 24  # Linux; `import signal` pulls in enum (~5 ms per run) for two numbers
_UID_BASE = 2_000_000_000  # run uid = base + outer pid: unique among live runs, unused by real users
_NOBODY = 65534
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = (
    0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC = 1, 2, 4, 8, 32, 4096, 16384
_MS_PRIVATE, _MS_STRICTATIME = 1 << 18, 1 << 24
_MOUNT_OPTION_FLAGS = {  # mountinfo per-mount option -> its MS_* flag, kept on the read-only remount
    "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38

# ----------------------------------------------------------------------------------------------
# Child side: run as `python -I -S -B -c _BOOT CODE CONFIG`. Nothing here may print to stdout.
# ----------------------------------------------------------------------------------------------


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """SIGKILL this process when the thread that forked it exits (setuid clears it: call after)."""
    if _libc()[1].prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0:
        raise OSError("prctl(PR_SET_PDEATHSIG) failed")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
    ctypes, libc = _libc()
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    return libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


def _enter_namespaces() -> list[str]:
    """Unshare what this process may: as non-root first a user ns (own uid mapped to itself)."""
    unshare, layers = _libc()[1].unshare, []
    if os.geteuid() != 0:
        uid, gid = os.getuid(), os.getgid()
        if unshare(_CLONE_NEWUSER) != 0:
            return layers  # no privilege for any other namespace
        for path, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{path}", "w") as f:
                f.write(text)
        layers.append("user")
    for name, flag in (("net", _CLONE_NEWNET), ("mnt", _CLONE_NEWNS), ("pid", _CLONE_NEWPID), ("ipc", _CLONE_NEWIPC)):
        if unshare(flag) == 0:
            layers.append(name)
    return layers


def _run_uid() -> int | None:
    """As root, a uid of this run's own (else nobody) if the uid map has it; else None (keep ours)."""
    if os.geteuid() != 0:
        return None
    with open("/proc/self/uid_map") as f:
        ranges = [tuple(map(int, line.split())) for line in f]
    for uid in (_UID_BASE + os.getpid(), _NOBODY):
        if any(first <= uid < first + count for first, _, count in ranges):
            return uid
    return None  # a root-only user ns (rootless container): capabilities are dropped instead


def _setup_mounts(work: str, owner: int, max_file_mb: int) -> list[str]:
    """Make every mount read-only except a fresh tmpfs on the work dir; hide /run (unix sockets)."""
    if not _mount(None, "/", None, _MS_REC | _MS_PRIVATE):
        return []  # mounts below could propagate to the host: leave them alone
    layers = []
    options = f"size={max_file_mb}m,nr_inodes=4096,mode=0700,uid={owner},gid={owner}"
    if _mount("tmpfs", work, "tmpfs", _MS_NOSUID | _MS_NODEV, options):
        layers.append("tmpfs")
    if os.path.isdir("/run") and not os.path.islink("/run"):
        _mount("tmpfs", "/run", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY, "size=4k,mode=0755")
    is_read_only = True
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point, options = fields[4], fields[5].split(",")
        for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            point = point.replace(escape, char)  # the kernel's escapes; backslash last
        if point == work:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in options:
            flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
        if not {"noatime", "relatime"} & set(options):
            flags |= _MS_STRICTATIME  # atime flags are locked in a user ns: keep them as they are
        is_read_only &= _mount(None, point, None, flags)
    return [*layers, "ro"] if is_read_only else layers


def _write_line(fd: int, nonce: str, event: str) -> None:
    """One status line for the parent; the nonce (unknown to the program) marks it as ours."""
    os.write(fd, f"{nonce} {event}\n".encode())


def _sandbox_main(config_path: str) -> None:
    """Outer process: namespaces, mounts and uid, then fork init and wait for it."""
    with open(config_path, "rb") as f:
        cfg = marshal.load(f)
    os.unlink(config_path)  # the nonce must not be readable by the program (same uid as non-root)
    _die_with_parent()
    if os.getppid() != cfg["parent_pid"]:
        os._exit(1)  # the parent died before the prctl took effect
    layers = _enter_namespaces()
    uid = _run_uid()
    if "mnt" in layers:
        layers += _setup_mounts(cfg["work"], os.getuid() if uid is None else uid, cfg["max_file_mb"])
    if uid is not None and "tmpfs" not in layers:
        os.chown(cfg["work"], uid, uid)
    if uid == _UID_BASE + os.getpid():
        layers.append("uid")
    lifeline_r, lifeline_w = os.pipe()  # init sees EOF on it if this process is gone
    pid = os.fork()
    if pid == 0:
        os.close(lifeline_w)
        _init_main(cfg, layers, uid, lifeline_r)
    os.waitpid(pid, 0)
    os._exit(0)


def _init_main(cfg: dict, layers: list[str], uid: int | None, lifeline_r: int) -> None:
    """Init: fresh /proc, fork the user process, reap everything, report the user's exit status."""
    try:
        _die_with_parent()
        os.set_blocking(lifeline_r, False)
        try:
            if os.read(lifeline_r, 1) == b"":
                return  # the outer process died before the prctl (getppid() is 0 in a new pid ns)
        except BlockingIOError:
            pass
        os.close(lifeline_r)
        if "pid" in layers and "mnt" in layers:
            if _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY):
                layers.append("proc")
        init_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            _user_main(cfg, layers, uid, init_pid)
        while True:  # as pid 1, orphans are reparented here: reap them until the program exits
            child, status, usage = os.wait4(-1, 0)
            if child == pid:
                break
        cpu_s = usage.ru_utime + usage.ru_stime
        if os.WIFSIGNALED(status):
            _write_line(cfg["status_fd"], cfg["nonce"], f"signal {os.WTERMSIG(status)} {cpu_s:.3f}")
        else:
            _write_line(cfg["status_fd"], cfg["nonce"], f"exit {os.waitstatus_to_exitcode(status)} {cpu_s:.3f}")
    finally:
        os._exit(0)  # never return into the outer process's code


def _user_main(cfg: dict, layers: list[str], uid: int | None, init_pid: int) -> None:
    """The program's process: confine, then run; it ends here, never in init's frames."""
    exit_code = 1
    try:
        _confine(cfg, layers, uid, init_pid)
        _write_line(cfg["status_fd"], cfg["nonce"], f"started {','.join(layers)}")
        exit_code = _run_program(cfg)
    except BaseException as e:  # only confinement errors get here; the program's are handled
        os.write(2, f"sandbox: {type(e).__name__}: {e}\n".encode())
    finally:
        os._exit(exit_code)


def _confine(cfg: dict, layers: list[str], uid: int | None, init_pid: int) -> None:
    """Limits, then privileges (own uid, or no capabilities), parent-death signal, audit hook."""
    import builtins
    import math
    import resource

    if _libc()[1].prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # setuid binaries gain nothing
        raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")
    max_processes = cfg["max_processes"]
    if "user" in layers:
        max_processes += 2  # NPROC counts the user ns's processes: outer and init too
    elif uid is None:
        max_processes += _count_tasks(os.getuid())  # counts all this user's processes
    cpu_s, mb = max(1, math.ceil(cfg["cpu_s"])), 1024 * 1024  # RLIMIT_CPU is whole seconds
    for limit, soft, hard in (
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),  # SIGXCPU at soft, SIGKILL at hard
        (resource.RLIMIT_AS, cfg["memory_mb"] * mb, cfg["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb, cfg["max_file_mb"] * mb),
        (resource.RLIMIT_NPROC, max_processes, max_processes),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        current_hard = resource.getrlimit(limit)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(limit, (soft, hard))
    if uid is not None:
        _keep_imports_working()
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    else:
        _drop_capabilities()  # user-ns root, or root of a rootless container; a no-op otherwise
    _die_with_parent()
    if os.getppid() != init_pid:
        os._exit(1)
    os.chdir(cfg["work"])
    builtins.exit = builtins.quit = _exit_builtin  # -S skips site, which defines them
    if cfg["use_audit_hook"]:
        _install_audit_hook(cfg["work"], allow_fork="pid" in layers)


def _run_program(cfg: dict) -> int:
    """Run the source then test_source like `python solution.py`; returns the exit code."""
    status_fd, nonce = cfg["status_fd"], cfg["nonce"]
    try:
        code = compile(cfg["source"], "solution.py", "exec")
        test_code = None if cfg["test_source"] is None else compile(cfg["test_source"], "test.py", "exec")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:  # ValueError: NUL
        sys.excepthook(type(e), e.with_traceback(None), None)
        _write_line(status_fd, nonce, "memory" if isinstance(e, MemoryError) else "syntax_error")
        return 1
    exit_code, finished = 1, False
    main = type(sys)("__main__")
    sys.modules["__main__"], sys.argv = main, ["solution.py"]
    try:
        exec(code, main.__dict__)
        if test_code is not None:
            exec(test_code, main.__dict__)
        exit_code, finished = 0, True
    except SystemExit as e:  # the exit codes of a plain `python solution.py`
        if e.code is None or isinstance(e.code, int):
            exit_code = (e.code or 0) & 0xFF
        else:  # sys.exit("message")
            print(e.code, file=sys.stderr)
    except BaseException as e:
        if isinstance(e, MemoryError):
            _write_line(status_fd, nonce, "memory")
        tb = e.__traceback__.tb_next  # drop this frame: the traceback starts in the program
        sys.excepthook(type(e), e.with_traceback(tb), tb)
    # What interpreter shutdown would do: wait for non-daemon threads (the "run main() in a thread
    # with a big stack" idiom), run atexit handlers, flush. Then the completion marker.
    import atexit

    threading = sys.modules.get("threading")  # not imported: ~2 ms, and without it no such threads
    for thread in threading.enumerate() if threading else ():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            exit_code = exit_code or 120  # as CPython does when the final flush fails
    if finished and exit_code == 0:
        _write_line(status_fd, nonce, "done")
    return exit_code


def _exit_builtin(code: object = None) -> None:
    raise SystemExit(code)


def _keep_imports_working() -> None:
    """Import through dir fds opened as root: the interpreter may live in /root (mode 0700).

    /proc/self/fd/N resolves without searching N's parents. Rewrites sys.path and the __path__
    of packages imported already (codecs import encodings.* lazily, e.g. "idna" for sockets).
    """
    moves = {p: f"/proc/self/fd/{os.open(p, os.O_PATH | os.O_DIRECTORY)}" for p in sys.path if os.path.isdir(p)}

    def moved(path: str) -> str:
        old = next((old for old in moves if path == old or path.startswith(old + "/")), None)
        return path if old is None else moves[old] + path[len(old):]

    sys.path[:] = list(moves.values())
    for module in list(sys.modules.values()):
        package_path = getattr(module, "__path__", None)
        if isinstance(package_path, list):
            package_path[:] = [moved(p) for p in package_path]
    sys.path_importer_cache.clear()


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


def _drop_capabilities() -> None:
    """capset(all zero): a user-ns root could otherwise remount the read-only mounts writable."""
    ctypes, libc = _libc()
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:  # effective, permitted, inheritable: none
        raise OSError(ctypes.get_errno(), "capset failed")


def _install_audit_hook(work: str, *, allow_fork: bool) -> None:
    """Second layer (the only one without namespaces): refuse what a test program never needs.

    The checks use only C functions bound now and str methods, so patching os or posixpath does
    not change them. Opening a directory outside the work dir is refused, so every dir fd the
    program can get (for dir_fd= calls) lies inside it; the "open" event does not show dir_fd,
    so a relative path with ".." is not opened for writing.
    """
    getcwd, getpid, fspath, stat_path, readlink = os.getcwd, os.getpid, os.fspath, os.stat, os.readlink
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    refused = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
               "os.startfile", "gc.get_", "os.symlink", "os.link", "os.chroot", "os.killpg")
    if not allow_fork:  # without a pid ns a child could setsid, escape the killpg and outlive the run
        refused += ("os.fork",)  # os.fork, os.forkpty
    # event -> (index of a path arg, index of its dir_fd arg or None), ...
    path_events = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
                   "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),)}
    devices, own_pid = ("/dev/null", "/dev/stdout", "/dev/stderr"), str(getpid())

    def text(path: object) -> str | None:
        if isinstance(path, int):
            return None  # an fd that is already open
        path = fspath(path)
        return path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path

    def absolute(path: str | None, dir_fd: object = None) -> str | None:
        if path is None:
            return None
        if not path.startswith("/"):
            path = (getcwd() if dir_fd in (None, -1) else readlink(f"/proc/self/fd/{dir_fd}")) + "/" + path
        parts: list[str] = []
        for part in path.split("/"):
            if part == "..":
                parts = parts[:-1]
            elif part not in ("", "."):
                parts.append(part)
        return "/" + "/".join(parts)

    def inside(path: str) -> bool:
        return path == work or path.startswith(work + "/") or path in devices

    def check_open(given: str | None, flags: int) -> str | None:
        """Why opening `given` is refused, or None."""
        path, writing = absolute(given), flags & write_flags
        if path is None:
            return None
        if inside(path):
            return f"writing through .. ({given})" if writing and "/../" in f"/{given}/" else None
        if writing:
            return f"writing {path}"
        parts = path.split("/")
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != own_pid:
            return f"reading {path}"
        try:
            is_dir = stat_path(path).st_mode & 0o170000 == 0o040000
        except OSError:
            return None
        return f"opening directory {path}" if is_dir else None

    def hook(event: str, args: tuple) -> None:
        reason = None
        if event.startswith(refused) or (event == "os.kill" and args[0] != getpid()):
            reason = event
        elif event == "open":
            reason = check_open(text(args[0]), args[2] or 0)
        elif event in path_events:
            for path_index, dir_fd_index in path_events[event]:
                path = absolute(text(args[path_index]), None if dir_fd_index is None else args[dir_fd_index])
                if path is not None and not inside(path):
                    reason = f"{event} on {path}"
        if reason is not None:
            raise PermissionError(f"sandbox: {reason} is not allowed here")

    sys.addaudithook(hook)


if __name__ == "__main__":  # the child: `python -I -S -B -c _BOOT CODE CONFIG`
    _sandbox_main(sys.argv[2])  # never returns
