"""What this machine gives the code sandbox (probed once per process) and the command that starts a run.

Three guarantees depend on the machine; each is missing where the OS cannot provide it:
- isolation: bubblewrap (`bwrap`, Debian package bubblewrap) starts the interpreter in new mount, pid,
  network, ipc and uts namespaces on an empty read-only root holding only the interpreter binary, its
  standard library (site-packages masked), the shared libraries it loads, fresh /proc and /dev, and
  two size-capped tmpfs: the work dir (/work) and /dev/shm. Needs root, or unprivileged user namespaces.
- memory_cap / process_cap: a cgroup per run with the memory / pids controller (rewards/sandbox_cgroup.py).
The code reward refuses to run without one of them unless the recipe names it in `allow_missing`.
"""

import functools
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field

from rewards.sandbox_cgroup import CgroupRoot, find_root

WORK_DIR = "/work"  # the run's cwd, HOME and TMPDIR inside the sandbox
GUARANTEES = {
    "isolation": "the program sees only the interpreter, its standard library and its own work dir: no other "
                 "host file, unix socket, process or network",
    "memory_cap": "one memory cap over everything a sample holds: all its processes, shared memory, memfds and "
                  "files",
    "process_cap": "one cap on the number of a sample's processes and threads",
}
WITHOUT = {
    "isolation": "the program can read every file its user can (the training data with its answers, the "
                 "checkout, $HOME), connect to unix sockets, and see and signal processes; only a Python audit "
                 "hook, which a program can get around, stands in the way",
    "memory_cap": "memory is capped per process (RLIMIT_AS): N processes may hold N x memory_mb, and memfds "
                  "and shared memory are not capped at all",
    "process_cap": "processes are capped by RLIMIT_NPROC, which counts every process of the user the program "
                   "runs as",
}
# Imports every extension module of the standard library (so the shared libraries they need are mapped),
# then prints what is mapped and the interpreter's own search path.
_PROBE = r"""
import ctypes, importlib, json, os, sys
dynload = [p for p in sys.path if p.endswith("lib-dynload")]
for name in sorted({f.split(".")[0] for d in dynload for f in os.listdir(d) if f.endswith(".so")}):
    if not name.startswith(("_test", "xx", "_xx", "_tkinter", "_ctypes_test")):
        try:
            importlib.import_module(name)
        except Exception:
            pass
try:
    ctypes.CDLL("libgcc_s.so.1")  # glibc loads it on thread cancellation: map it now
except OSError:
    pass
files = set()
for line in open("/proc/self/maps"):
    parts = line.split(None, 5)
    if len(parts) == 6 and parts[5].startswith("/") and os.path.isfile(parts[5].strip()):
        files.add(parts[5].strip())
print(json.dumps({"files": sorted(files), "path": [p for p in sys.path if os.path.exists(p)]}))
"""


@dataclass(frozen=True)
class Host:
    """python: the interpreter (real path) run in the sandbox. bwrap: its path, None without isolation.
    view: bwrap arguments that build the sandbox's file system. missing: guarantee -> why it is missing."""

    python: str
    bwrap: str | None
    view: tuple[str, ...]
    library_path: str
    cgroups: CgroupRoot | None
    missing: dict[str, str] = field(default_factory=dict)


class SandboxError(RuntimeError):
    """The sandbox could not run the program at all, or would run it with less than was asked for."""


@functools.cache
def probe() -> Host:
    """This machine's sandbox layers; cached (the first call costs ~0.2 s: two interpreter starts)."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    missing = {}
    try:
        cgroups, why = find_root()
    except (OSError, ValueError) as e:  # an unusual /proc/self/cgroup or mountinfo
        cgroups, why = None, f"cannot read this process's cgroups ({type(e).__name__}: {e})"
    if cgroups is None:
        missing["memory_cap"] = missing["process_cap"] = why
    else:
        for controller, name in (("memory", "memory_cap"), ("pids", "process_cap")):
            if controller not in cgroups.controllers:
                missing[name] = f"no writable cgroup with the {controller} controller"
    bwrap, view, library_path, why = _isolation(python)
    if bwrap is None:
        missing["isolation"] = why
    return Host(python, bwrap, view, library_path, cgroups, missing)


def _isolation(python: str) -> tuple[str | None, tuple[str, ...], str, str]:
    """(bwrap, view, library path, "") if a trial sandbox runs the interpreter, else (None, (), "", why)."""
    bwrap = shutil.which("bwrap", path=os.environ.get("PATH", "") + ":/usr/bin:/bin")
    if bwrap is None:
        return None, (), "", "bubblewrap is not installed (apt-get install bubblewrap; dnf install bubblewrap)"
    try:
        files, search_path = _interpreter_files(python)
        view, library_path = _view_args(python, files, search_path), ":".join(_library_dirs(files))
        trial = subprocess.run(
            [bwrap, *base_args(view, library_path, 1, 1), python, "-I", "-S", "-c", "import json, ctypes, hashlib"],
            capture_output=True, text=True, timeout=60)
    except (OSError, ValueError, subprocess.SubprocessError, SandboxError) as e:
        return None, (), "", f"cannot build the sandbox's view of {python} ({type(e).__name__}: {e})"
    if trial.returncode != 0:
        return None, (), "", (f"bwrap cannot start a sandbox here ({trial.stderr.strip()[-300:]}); it needs root "
                              "or unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)")
    return bwrap, view, library_path, ""


def check(allow_missing: tuple[str, ...] | list[str]) -> Host:
    """The host, if every guarantee is in force or named in `allow_missing`; else SandboxError saying
    what is missing, what that means, how to fix it, and the key that accepts it."""
    unknown = set(allow_missing) - set(GUARANTEES)
    if unknown:
        raise ValueError(f"allow_missing: unknown guarantee(s) {sorted(unknown)}; valid: {sorted(GUARANTEES)}")
    host = probe()
    refused = [name for name in GUARANTEES if name in host.missing and name not in allow_missing]
    if refused:
        lines = [f"- {name} ({GUARANTEES[name]}): missing because {host.missing[name]}. Without it {WITHOUT[name]}."
                 for name in refused]
        raise SandboxError(
            "the code sandbox cannot give every guarantee on this machine:\n" + "\n".join(lines)
            + f"\nFix the machine, or accept the weaker sandbox by adding allow_missing: [{', '.join(refused)}] "
              "to the code reward's args (docs/rewards.md, 'What the code sandbox guarantees').")
    return host


def base_args(view: tuple[str, ...], library_path: str, work_mb: int, shm_mb: int) -> list[str]:
    """bwrap's arguments up to the command: namespaces, the view, the two tmpfs, a read-only root."""
    return [
        "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session", "--clearenv",
        "--setenv", "HOME", WORK_DIR, "--setenv", "TMPDIR", WORK_DIR, "--setenv", "LANG", "C.UTF-8",
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LD_LIBRARY_PATH", library_path,
        "--tmpfs", "/", *view, "--proc", "/proc", "--dev", "/dev",
        "--perms", "1777", "--size", str(shm_mb << 20), "--tmpfs", "/dev/shm",
        "--perms", "0755", "--size", str(work_mb << 20), "--tmpfs", WORK_DIR,
        "--remount-ro", "/", "--chdir", WORK_DIR,
    ]


def _interpreter_files(python: str) -> tuple[list[str], list[str]]:
    """(files the interpreter maps once every stdlib extension is imported, its sys.path under -I -S)."""
    out = subprocess.run([python, "-I", "-S", "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    found = json.loads(out.stdout)
    return found["files"], found["path"]


def _view_args(python: str, files: list[str], search_path: list[str]) -> tuple[str, ...]:
    """bwrap arguments that make the interpreter work inside: its binary, the dirs of its standard
    library (site-packages masked) and of the shared libraries it maps, its other mapped files (locale
    data), each symlink on the way (e.g. /lib64 -> usr/lib64 for the loader). Whole directories for the
    libraries: one mount each, where a mount per file costs ~1 ms per 10 files at every start-up."""
    stdlib = {os.path.realpath(p) for p in search_path}
    bound = sorted(stdlib | set(_library_dirs(files)))
    bound = [d for d in bound if not any(d.startswith(o + "/") for o in bound)]  # nested in another: covered
    inside = lambda path: any(path == d or path.startswith(d + "/") for d in bound)  # noqa: E731
    ops: dict[str, tuple[str, ...]] = {}
    for path in [python, _elf_interpreter(python), *files]:
        for op in _path_ops(path):
            if not inside(op[-1]):
                ops.setdefault(op[-1], op)
    for d in bound:
        ops[d] = ("--ro-bind", d, d)
    for d in stdlib:
        site = os.path.join(d, "site-packages")
        if os.path.isdir(site):  # installed packages are not the standard library
            ops[site] = ("--tmpfs", site)
    for path in list(ops):  # bwrap would copy each parent's host mode (/root: 0700, closed to the run's uid)
        parent = os.path.dirname(path)
        while parent != "/" and parent not in ops and not inside(parent):
            ops[parent] = ("--perms", "0755", "--dir", parent)
            parent = os.path.dirname(parent)
    ordered = sorted(ops.values(), key=lambda op: (op[-1].count("/"), op[-1]))  # parents before children
    return tuple(arg for op in ordered for arg in op)


def _path_ops(path: str, depth: int = 0) -> list[tuple[str, ...]]:
    """Ops that make `path` resolve as on the host: each symlink on the way, then a bind of the file."""
    if depth > 40:
        raise SandboxError(f"too many levels of symbolic links resolving {path}")
    current = "/"
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            target = os.readlink(candidate)
            rest = "/".join(parts[i + 1:])
            resolved = os.path.normpath(os.path.join(current, target))
            return [("--symlink", target, candidate),
                    *_path_ops(os.path.join(resolved, rest) if rest else resolved, depth + 1)]
        current = candidate
    return [("--ro-bind", current, current)]


def _library_dirs(files: list[str]) -> list[str]:
    return sorted({os.path.dirname(f) for f in files if ".so" in os.path.basename(f)})


def _elf_interpreter(binary: str) -> str:
    """The dynamic loader an ELF executable names (PT_INTERP), e.g. /lib64/ld-linux-x86-64.so.2."""
    with open(binary, "rb") as f:
        data = f.read(1 << 16)
    if data[:4] != b"\x7fELF":
        raise SandboxError(f"{binary} is not an ELF executable")
    is_64, order = data[4] == 2, "<" if data[5] == 1 else ">"
    if is_64:
        phoff, = struct.unpack_from(order + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36)
    else:
        phoff, = struct.unpack_from(order + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x2A)
    for i in range(phnum):
        header = phoff + i * phentsize
        kind, = struct.unpack_from(order + "I", data, header)
        if kind == 3:  # PT_INTERP
            offset, size = struct.unpack_from(order + ("QxxxxxxxxxxxxxxxxQ" if is_64 else "IxxxxxxxxI"),
                                              data, header + (8 if is_64 else 4))
            return data[offset:offset + size].rstrip(b"\0").decode()
    raise SandboxError(f"{binary} names no dynamic loader (statically linked?)")
