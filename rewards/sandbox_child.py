"""The inside of the code sandbox: confine this interpreter, then run the program, serve it, or judge.

rewards/sandbox_process.py starts `python -I -S -B -c BOOT rlcore-sandbox CODE_FD CONFIG_FD` (inside
bubblewrap where there is isolation). BOOT makes modules of the code objects read from CODE_FD (sandbox_wire,
sandbox_audit, this file, sandbox_judge, compiled under neutral file names, so no traceback shows the
checkout's path) and calls `main` with CONFIG_FD (a marshalled dict). Roles:
- "program": run the source like `python solution.py` (stdin/stdout tests).
- "serve": run the source, then answer calls into it from the judge, one JSON line each way; the
  program never sees a test, only the plain-data arguments of the calls it serves.
- "judge": run the assert tests (rewards/sandbox_judge.py).
Messages to the parent go out as JSON lines on cfg["out_fd"]; the program may write there too, which
can only end or fail its own run. Imports only os, sys, marshal (+ resource, ctypes, json).
"""

import marshal
import os
import sys

from rewards.sandbox_audit import install_audit_hook
from rewards.sandbox_wire import decode, dumps, encode, loads

_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS, _SIGKILL = 1, 38, 9


def main(config_fd: int) -> None:
    """Entry from BOOT: confine, report "started" (the program's clock starts now), run the role."""
    cfg = marshal.loads(os.pread(config_fd, os.fstat(config_fd).st_size, 0))
    os.close(config_fd)
    exit_code = 1
    try:
        _confine(cfg)
        send(cfg, {"event": "started"})
        if cfg["role"] == "judge":
            from rewards.sandbox_judge import run_judge  # it imports this module: not at the top

            exit_code = run_judge(cfg)
        else:
            exit_code = (run_program if cfg["role"] == "program" else serve)(cfg)
    except BaseException as e:  # only the sandbox's own errors get here; the program's are handled
        os.write(2, f"sandbox: {type(e).__name__}: {e}\n".encode(errors="replace"))
    finally:
        os._exit(exit_code)


def send(cfg: dict, message: dict) -> None:
    data = dumps(message)
    while data:
        data = data[os.write(cfg["out_fd"], data):]


# ----------------------------------------------------------------------------------------------
# Confinement: limits, then privileges, then the audit hook. Nothing of the program has run yet.
# ----------------------------------------------------------------------------------------------


def _confine(cfg: dict) -> None:
    import builtins

    isolated = cfg["isolated"]  # bwrap has set no_new_privs, and dropped every capability unless we are root
    if not isolated and _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # setuid binaries gain nothing
        raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")
    _set_limits(cfg)
    for name in ("LD_LIBRARY_PATH", "PWD"):  # the loader's, and bwrap's; the program gets HOME/LANG/PATH/TMPDIR
        os.environ.pop(name, None)
    if cfg["run_uid"] is not None:
        os.chown(cfg["work"], cfg["run_uid"], cfg["run_uid"])
        if not isolated:
            _keep_imports_working()
        os.setgroups([])
        os.setresgid(cfg["run_uid"], cfg["run_uid"], cfg["run_uid"])
        os.setresuid(cfg["run_uid"], cfg["run_uid"], cfg["run_uid"])  # drops every capability
    elif not isolated:
        _drop_capabilities()  # root that cannot change uid (rootless container); a no-op otherwise
    if not isolated:  # in bubblewrap the pid namespace ends with its init, which dies with its parent
        if _libc().prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0:
            raise OSError("prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != cfg["parent_pid"]:
            os._exit(1)  # the parent died before the prctl took effect
    os.chdir(cfg["work"])
    builtins.exit = builtins.quit = _exit_builtin  # -S skips site, which defines them
    if cfg["use_audit_hook"]:
        install_audit_hook(cfg["work"], allow_fork=isolated)


def _set_limits(cfg: dict) -> None:
    """rlimits; the CPU limit counts from now (the interpreter's start-up is not the program's time)."""
    import math
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s, mb = max(1, math.ceil(cfg["cpu_s"] + usage.ru_utime + usage.ru_stime)), 1024 * 1024
    limits = [
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),  # SIGXCPU at soft, SIGKILL at hard
        (resource.RLIMIT_AS, cfg["memory_mb"] * mb, cfg["memory_mb"] * mb),  # one huge allocation: MemoryError
        (resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb, cfg["max_file_mb"] * mb),
        (resource.RLIMIT_NOFILE, cfg["max_open_files"], cfg["max_open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if cfg["max_nproc"] is not None:  # only where no pids cgroup counts the run's processes
        limits.append((resource.RLIMIT_NPROC, cfg["max_nproc"], cfg["max_nproc"]))
    for limit, soft, hard in limits:
        current_hard = resource.getrlimit(limit)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(limit, (soft, hard))


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _drop_capabilities() -> None:
    """capset(all zero): a root without its own uid could otherwise undo the limits."""
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    if _libc().capset(header, (ctypes.c_uint32 * 6)()) != 0:  # effective, permitted, inheritable: none
        raise OSError(ctypes.get_errno(), "capset failed")


def _keep_imports_working() -> None:
    """Without isolation, import through dir fds opened as root: the interpreter may live in /root (0700).

    /proc/self/fd/N resolves without searching N's parents. Rewrites sys.path and the __path__ of
    packages imported already (codecs import encodings.* lazily, e.g. "idna" for sockets).
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


def _exit_builtin(code: object = None) -> None:
    raise SystemExit(code)


# ----------------------------------------------------------------------------------------------
# The program: run like `python solution.py`; then, as "serve", answer the judge's calls.
# ----------------------------------------------------------------------------------------------


def run_program(cfg: dict) -> int:
    """Run the source as __main__; returns the exit code `python solution.py` would have."""
    main_module, exit_code = _exec_source(cfg)
    if main_module is None:
        return exit_code
    return _shut_down(exit_code)


def serve(cfg: dict) -> int:
    """Run the source; if it ran to its end, say "ready" and answer calls until the parent hangs up."""
    main_module, exit_code = _exec_source(cfg)
    if main_module is None or exit_code != 0:
        return _shut_down(exit_code) if main_module is not None else exit_code
    send(cfg, {"event": "ready"})
    handles: list = []

    def new_handle(value: object) -> dict:
        handles.append(value)
        return {"handle": len(handles) - 1, "type": type(value).__name__}

    def resolve(tag: dict) -> object:
        if "ref" not in tag or not 0 <= tag["ref"] < len(handles):
            raise ValueError(f"no such object: {tag}")
        return handles[tag["ref"]]

    with os.fdopen(cfg["in_fd"], "rb", buffering=1 << 16) as requests:
        for line in requests:
            send(cfg, _answer(line, main_module.__dict__, new_handle, resolve))
    return 0


def _answer(line: bytes, namespace: dict, new_handle, resolve) -> dict:
    """One call into the program: its result as plain data (or a handle), or the exception it raised."""
    try:
        request = loads(line)
        op = request["op"]
        if op == "load":
            if request["name"] not in namespace:
                raise NameError(f"name {request['name']!r} is not defined")
            return {"value": encode(namespace[request["name"]], new_handle)}
        target = resolve(request["target"])
        if op == "call":
            args = [decode(a, resolve) for a in request["args"]]
            kwargs = {k: decode(v, resolve) for k, v in request["kwargs"]}
            value = target(*args, **kwargs)
            reply = {"value": encode(value, new_handle)}
            reply.update(_mutated(request, args, kwargs, new_handle))
            return reply
        if op == "getattr":
            value = getattr(target, request["name"])
        elif op == "getitem":
            value = target[decode(request["key"], resolve)]
        elif op == "iter":
            value = iter(target)
        elif op == "next":
            value = next(target)
        else:
            raise ValueError(f"unknown op {op!r}")
        return {"value": encode(value, new_handle)}
    except (SystemExit, KeyboardInterrupt) as e:  # they end `python solution.py`; the judge hears "ended"
        os.write(2, f"{type(e).__name__}: {_message(e)}\n".encode(errors="replace"))
        os._exit(1)
    except BaseException as e:
        return {"raise": {"type": type(e).__name__, "message": _message(e)}}


def _mutated(request: dict, args: list, kwargs: dict, new_handle) -> dict:
    """Arguments the call changed in place (lists, dicts, sets), so the judge's copies can follow."""
    changed_args = [[i, new] for i, (old, value) in enumerate(zip(request["args"], args))
                    if type(value) in (list, dict, set) and (new := encode(value, new_handle)) != old]
    changed_kwargs = [[k, new] for (k, old) in request["kwargs"]
                      if type(kwargs[k]) in (list, dict, set) and (new := encode(kwargs[k], new_handle)) != old]
    return {"mutated": changed_args, "mutated_kwargs": changed_kwargs} if changed_args or changed_kwargs else {}


def _message(error: BaseException) -> str:
    try:
        return str(error)[:2000]
    except BaseException:
        return "(str() of the exception failed)"


def _exec_source(cfg: dict) -> tuple[object, int]:
    """(the __main__ module, exit code) after running the source; (None, 1) if it does not compile."""
    try:
        code = compile(cfg["source"], "solution.py", "exec")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:  # ValueError: NUL
        sys.excepthook(type(e), e.with_traceback(None), None)
        send(cfg, {"event": "memory" if isinstance(e, MemoryError) else "syntax_error"})
        return None, 1
    main_module = type(sys)("__main__")
    sys.modules["__main__"], sys.argv = main_module, ["solution.py"]
    exit_code = 1
    try:
        exec(code, main_module.__dict__)
        exit_code = 0
    except SystemExit as e:  # the exit codes of a plain `python solution.py`
        if e.code is None or isinstance(e.code, int):
            exit_code = (e.code or 0) & 0xFF
        else:  # sys.exit("message")
            print(e.code, file=sys.stderr)
        if cfg["role"] == "serve":
            exit_code = exit_code or 1  # ending before the tests is never a pass
    except BaseException as e:
        if isinstance(e, MemoryError):
            send(cfg, {"event": "memory"})
        tb = e.__traceback__.tb_next  # drop this frame: the traceback starts in the program
        sys.excepthook(type(e), e.with_traceback(tb), tb)
    return main_module, exit_code


def _shut_down(exit_code: int) -> int:
    """What interpreter shutdown would do: wait for non-daemon threads (the "run main() in a thread with
    a big stack" idiom), run atexit handlers, flush."""
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
    return exit_code
