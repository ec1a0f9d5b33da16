"""Second layer of the code sandbox, in the program's own interpreter: a Python audit hook.

It refuses what a test program never needs (sockets, exec/spawn, kill of other processes, ctypes, gc
walks, writes outside the work dir, other pids' /proc; fork where there is no pid namespace). A program
can get around it (it runs in the same interpreter), so where bubblewrap isolates the run it is a
second barrier only, and without isolation it is a speed bump, not a wall. Shipped into the sandbox
as a code object (rewards/sandbox_process.py), so it imports only os and sys.
"""

import os
import sys


def install_audit_hook(work: str, *, allow_fork: bool) -> None:
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
