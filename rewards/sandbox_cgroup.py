"""One cgroup per sandboxed run: a memory cap and a process cap over everything the run holds.

Per-process rlimits do not add up: four forked children each under RLIMIT_AS hold four times the
cap, and memfds, tmpfs files and shared memory are not address space at all. The memory controller
charges all of them (page cache and shmem included) to the cgroup of the process that touched them,
and the pids controller counts every process and thread. cgroup v2 is used where this process may
create children with both controllers, else v1's memory and pids hierarchies; each run gets a child
named rlcore-sandbox-<pid of the creating process>-<n>, which the sandboxed processes join before
anything of theirs runs (the spawn command writes its own pid into cgroup.procs, then execs).

A creating process that is killed leaves its (empty: the sandbox died with it) cgroups behind; every
creation removes those whose creator is gone.
"""

import itertools
import os
import re
import signal
import time
from dataclasses import dataclass

_PREFIX = "rlcore-sandbox-"
_STALE = re.compile(_PREFIX + r"(\d+)-\d+$")
_counter = itertools.count()


@dataclass(frozen=True)
class CgroupRoot:
    """Where this process may create per-run cgroups: v2 (one dir) or v1 (one dir per controller).
    controllers: "memory" and/or "pids" -> the parent dir for that controller's run cgroups."""

    version: int
    controllers: dict[str, str]

    def create(self, memory_bytes: int, max_pids: int) -> "RunCgroup":
        """A fresh cgroup (per controller hierarchy) with the limits written; stale ones removed first."""
        name = f"{_PREFIX}{os.getpid()}-{next(_counter)}"
        dirs: dict[str, str] = {}
        for controller, parent in self.controllers.items():
            remove_stale(parent)  # a listdir and a kill(pid, 0) per entry: ~0.1 ms
            path = os.path.join(parent, name)
            if path not in dirs.values():  # v2: both controllers share one dir
                os.mkdir(path)
            dirs[controller] = path
        run = RunCgroup(self.version, dirs)
        try:
            run.set_limits(memory_bytes, max_pids)
        except OSError:
            run.remove()
            raise
        return run


@dataclass(frozen=True)
class RunCgroup:
    """One run's cgroup(s). procs_files: what the spawn command writes its pid into."""

    version: int
    dirs: dict[str, str]

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in sorted(set(self.dirs.values()))]

    def set_limits(self, memory_bytes: int, max_pids: int) -> None:
        memory, pids = self.dirs.get("memory"), self.dirs.get("pids")
        if memory is not None:
            if self.version == 2:
                _write(memory, "memory.max", memory_bytes)
                _write(memory, "memory.swap.max", 0, optional=True)  # swapped-out pages would escape the cap
                _write(memory, "memory.oom.group", 1, optional=True)  # an OOM ends the whole run, not one child
            else:
                _write(memory, "memory.limit_in_bytes", memory_bytes)
                _write(memory, "memory.memsw.limit_in_bytes", memory_bytes, optional=True)  # memory + swap
        if pids is not None:
            _write(pids, "pids.max", max_pids)

    def oom_kills(self) -> int:
        """How many processes the kernel killed for exceeding the memory cap (0 without the controller)."""
        memory = self.dirs.get("memory")
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(memory, name)) as f:
                counts = dict(line.split() for line in f if len(line.split()) == 2)
        except (OSError, TypeError):
            return 0
        return int(counts.get("oom_kill", 0))

    def kill(self) -> None:
        """SIGKILL every process in the run's cgroups (those that left its process group too)."""
        for path in set(self.dirs.values()):
            _kill_members(path)

    def remove(self) -> None:
        """Kill what is left and remove the cgroups (a dying process keeps one busy for a moment)."""
        for path in set(self.dirs.values()):
            _remove(path)


def find_root() -> tuple[CgroupRoot | None, str]:
    """Where this process may create run cgroups, or (None, why not: what to do about it)."""
    cgroup_lines = _read_lines("/proc/self/cgroup")
    mounts = _cgroup_mounts()
    own = {}
    for line in cgroup_lines:
        hierarchy, controllers, path = line.split(":", 2)
        for name in (controllers.split(",") if controllers else ["unified"] if hierarchy == "0" else []):
            own[name] = path
    reasons = []
    if "unified" in own and "cgroup2" in mounts:
        root, why = _find_v2(mounts["cgroup2"], own["unified"])
        if root is not None:
            return root, ""
        reasons.append(why)
    v1 = {c: os.path.normpath(os.path.join(mounts[c], own[c].lstrip("/")))
          for c in ("memory", "pids") if c in mounts and c in own}
    usable = {c: d for c, d in v1.items() if _can_create_child(d, c, 1)}
    if usable:
        return CgroupRoot(1, usable), ""
    reasons.append(f"cgroup v1: no writable memory/pids hierarchy ({', '.join(v1.values()) or 'none mounted'})")
    return None, "; ".join(reasons)


def _find_v2(mount: str, own_path: str) -> tuple[CgroupRoot | None, str]:
    """The deepest cgroup from ours upwards that gives its children memory and pids and that we may write.

    Controllers are never switched on here: that would change how the host accounts its other cgroups."""
    path = os.path.join(mount, own_path.lstrip("/"))
    while True:
        if {"memory", "pids"} <= set(_read_text(os.path.join(path, "cgroup.subtree_control")).split()) \
                and _can_create_child(path, "memory", 2):
            return CgroupRoot(2, {"memory": path, "pids": path}), ""
        if os.path.realpath(path) == os.path.realpath(mount):
            return None, (f"cgroup v2: no cgroup from {own_path} up to the root both hands memory and pids to "
                          "its children and is writable by this user (run as root, or under a cgroup delegated "
                          "to this user with those controllers enabled)")
        path = os.path.dirname(path)


def _can_create_child(parent: str, controller: str, version: int) -> bool:
    """Create, limit and remove a probe child: the only reliable test of write access."""
    probe = os.path.join(parent, f"{_PREFIX}{os.getpid()}-probe")
    limit_file = {"memory": "memory.max" if version == 2 else "memory.limit_in_bytes", "pids": "pids.max"}[controller]
    try:
        os.mkdir(probe)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        _write(probe, limit_file, 64 << 20 if controller == "memory" else 8)
        return True
    except OSError:
        return False
    finally:
        _remove(probe)


def remove_stale(parent: str) -> None:
    """Remove run cgroups under `parent` whose creating process is gone (killed mid-run)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        match = _STALE.match(name)
        if match and not is_alive(int(match.group(1))):
            _remove(os.path.join(parent, name))


def is_alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _kill_members(path: str) -> None:
    kill_file = os.path.join(path, "cgroup.kill")  # v2, Linux 5.14+: the kernel kills them all at once
    if os.path.exists(kill_file):
        try:
            _write(path, "cgroup.kill", 1)
            return
        except OSError:
            pass
    for _ in range(10):  # members may fork while we kill: repeat until none is left
        pids = [int(p) for p in _read_lines(os.path.join(path, "cgroup.procs")) if p]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _remove(path: str) -> None:
    deadline = time.monotonic() + 2.0
    while True:
        _kill_members(path)
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY: killed members not reaped yet
            if time.monotonic() >= deadline:
                return  # left for remove_stale once this process is gone
            time.sleep(0.01)


def _cgroup_mounts() -> dict[str, str]:
    """"cgroup2" -> its mount point, and each v1 controller -> the mount point of its hierarchy."""
    mounts = {}
    for line in _read_lines("/proc/self/mountinfo"):
        fields = line.split(" - ")
        if len(fields) != 2:
            continue
        point, (fstype, _, options) = line.split()[4], fields[1].split()[:3]
        if fstype == "cgroup2":
            mounts.setdefault("cgroup2", point)
        elif fstype == "cgroup":
            for option in options.split(","):
                mounts.setdefault(option, point)
    return mounts


def _write(directory: str, name: str, value: int, *, optional: bool = False) -> None:
    try:
        with open(os.path.join(directory, name), "w") as f:
            f.write(str(value))
    except FileNotFoundError:
        if not optional:
            raise


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _read_lines(path: str) -> list[str]:
    return _read_text(path).splitlines()
