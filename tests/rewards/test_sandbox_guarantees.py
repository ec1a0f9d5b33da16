"""The code sandbox's guarantees (docs/rewards.md), one test per class of attack that once got through.

Each attack is an example of its class: the verdict decided where the program can reach it (a forged
completion marker, an always-equal object, patched builtins), memory capped per process rather than
per sample (forked children, memfds), the host's files and unix sockets visible, and the weak points
around them (open files, start-up time, tracebacks, refusing a machine that lacks a layer).
"""

import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from sandbox_kit import EXPECTED, REPO, fenced, no_stray_processes, run_without_hook  # noqa: F401 (autouse)

from rewards import REWARDS, CompositeReward
from rewards import sandbox_host, sandbox_process
from rewards.sandbox import SandboxError, run_assert_tests, run_python

code = REWARDS["code"]
ASSERT_TESTS = ["assert f(1) == 2", "assert abs(f(1) - 2) < 1e-9", "assert all([f(1) == 2])",
                "assert sorted([f(1), 1]) == [1, 2]"]

# ---------------------------------------------------------------------------------------------
# The verdict: decided by the judge, on plain data, never in the program's interpreter
# ---------------------------------------------------------------------------------------------

FORGED_MARKER = r"""
import os, re, sys
def f(x):
    return 0
found, frame = set(), sys._getframe()
while frame is not None:  # any nonce-like string in any frame, written to every fd as "done"
    for scope in (frame.f_locals, frame.f_globals):
        for value in list(scope.values()):
            for item in (list(value.values()) if isinstance(value, dict) else [value]):
                if isinstance(item, str) and re.fullmatch(r"[0-9a-f]{32}", item):
                    found.add(item)
    frame = frame.f_back
for marker in found | {"ready"}:
    for fd in range(3, 64):
        for line in (f"{marker} done\n", '{"event":"ready"}\n', '{"done":0,"passed":true}\n'):
            try:
                os.write(fd, line.encode())
            except OSError:
                pass
os._exit(0)
"""

ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __lt__(self, other): return True
    def __gt__(self, other): return True
    def __sub__(self, other): return self
    def __abs__(self): return self
    def __bool__(self): return True
    def __hash__(self): return 0
def f(x):
    return Anything()
"""

PATCHED_BUILTINS = """
import builtins
builtins.abs = lambda x: 0
builtins.all = lambda x: True
builtins.sorted = lambda x: [1, 2]
def f(x):
    return 0
"""


def test_a_forged_completion_marker_fails():
    assert code("p", fenced(FORGED_MARKER), {"tests": ["assert f(1) == 2"]}) == 0.0
    assert code("p", fenced("def f(x):\n    return 2"), {"tests": ["assert f(1) == 2"]}) == 1.0  # honest: passes


@pytest.mark.parametrize("program", [ALWAYS_EQUAL, PATCHED_BUILTINS], ids=["always_equal", "patched_builtins"])
def test_an_always_equal_object_or_patched_builtins_fail(program):
    assert code("p", fenced(program), {"tests": ASSERT_TESTS}) == 0.0
    assert code("p", fenced("def f(x):\n    return 2"), {"tests": ASSERT_TESTS}) == 1.0


@pytest.mark.parametrize("ending", ["raise SystemExit(0)", "import os; os._exit(0)", "print('done'); exit(0)"])
def test_a_program_that_ends_inside_a_call_fails(ending):
    # Even a test that swallows every exception: the program's run ended, so the test fails.
    test = "try:\n    f(1)\nexcept BaseException:\n    pass"
    assert code("p", fenced(f"def f(x):\n    {ending}"), {"tests": [test]}) == 0.0
    assert code("p", fenced("def f(x):\n    return 2"), {"tests": [test]}) == 1.0


def test_the_judge_keeps_the_usual_test_formats_working():
    program = """
class Solution:
    def two_sum(self, nums, target):
        seen = {}
        for i, n in enumerate(nums):
            if target - n in seen:
                return [seen[target - n], i]
            seen[n] = i
def rotate(nums):
    nums[:] = nums[-1:] + nums[:-1]
def squares(n):
    yield from (i * i for i in range(n))
def parse(s):
    if not s:
        raise ValueError("empty")
    return {"words": tuple(s.split()), "chars": set(s)}
def exact(x):
    from decimal import Decimal
    from fractions import Fraction
    return Fraction(x, 3), Decimal(x) / 4, 10 ** 40 + x, x + 0.5j
"""
    tests = [
        "assert Solution().two_sum([2, 7, 11], 9) == [0, 1]",
        "def check(candidate):\n    assert candidate(3) is not None\n    assert list(candidate(4)) == [0, 1, 4, 9]\n"
        "check(squares)",  # HumanEval's form
        "nums = [1, 2, 3]\nrotate(nums)\nassert nums == [3, 1, 2]",  # changed in place, copied back
        "import math\nassert math.isclose(sum(squares(3)) / 2, 2.5)",
        "assert parse('a b') == {'words': ('a', 'b'), 'chars': {'a', ' ', 'b'}}",
        "try:\n    parse('')\nexcept ValueError as e:\n    assert 'empty' in str(e)\nelse:\n    assert False",
        "for n in range(50):\n    assert len(list(squares(n))) == n",
        "from decimal import Decimal\nfrom fractions import Fraction\n"
        "assert exact(1) == (Fraction(1, 3), Decimal('0.25'), 10 ** 40 + 1, 1 + 0.5j)",
    ]
    verdicts = run_assert_tests(program, tests, timeout_s=5.0)
    assert [v.passed for v in verdicts] == [True] * len(tests), verdicts


# ---------------------------------------------------------------------------------------------
# Memory: one cap over everything a sample holds
# ---------------------------------------------------------------------------------------------

FOUR_CHILDREN = """
import os, time
readers, pids = [], []
for _ in range(4):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        block = b"x" * (48 * 1024 * 1024)  # written, so resident: 4 x 48 MB against a 128 MB cap
        os.write(w, b"1")
        time.sleep(30)
        os._exit(0)
    os.close(w)
    readers.append(r)
    pids.append(pid)
held = sum(len(os.read(r, 1)) for r in readers)
time.sleep(0.2)
alive = sum(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in pids)  # all four at once, not one after another
print("PWNED" if held == alive == 4 else f"held {held}, {alive} alive")
"""

MEMFDS = """
import os
chunk, fds = b"x" * (1024 * 1024), []
for _ in range(24):  # 24 memfds x 8 MB, each under the 16 MB file-size limit: 192 MB against 128
    fd = os.memfd_create("hold")
    for _ in range(8):
        os.write(fd, chunk)
    fds.append(fd)
print("PWNED" if len(fds) == 24 else "no")
"""


@pytest.mark.parametrize("program", [FOUR_CHILDREN, MEMFDS], ids=["four_children", "memfds"])
def test_a_sample_cannot_hold_more_than_its_memory_cap(program):
    assert code("p", fenced(program), EXPECTED, memory_mb=128, timeout_s=10.0) == 0.0
    result = run_without_hook(program, memory_mb=128, timeout_s=10.0)
    assert "PWNED" not in result.stdout and result.status == "memory", (result.status, result.stdout)


def test_open_files_are_capped():
    program = "import os\nn = 0\ntry:\n    while n < 100000:\n        os.open('/dev/null', os.O_RDONLY)\n" \
              "        n += 1\nexcept OSError as e:\n    print(n, e.strerror)"
    result = run_python(program, timeout_s=5.0, max_open_files=64)
    opened, reason = result.stdout.split(" ", 1)
    assert int(opened) < 64 and "Too many open files" in reason, result.stdout


# ---------------------------------------------------------------------------------------------
# Files and unix sockets: the program sees the interpreter, its standard library, its work dir
# ---------------------------------------------------------------------------------------------


def test_a_file_planted_outside_the_work_dir_cannot_be_read():
    secret = f"answer-{uuid.uuid4().hex}"
    planted = f"/tmp/rlcore-plant-{uuid.uuid4().hex}.txt"
    with open(planted, "w") as f:
        f.write(secret)
    os.chmod(planted, 0o644)  # world-readable, like a training jsonl
    try:
        for path in (planted, str(REPO / "rewards" / "code.py")):
            program = f"print(open({path!r}).read().strip())"
            row = {"tests": [{"input": "", "output": secret if path == planted else open(path).read().strip()}]}
            assert code("p", fenced(program), row) == 0.0, path
            result = run_without_hook(program)
            assert result.stdout == "" and "FileNotFoundError" in result.stderr, result.stderr[-500:]
    finally:
        os.unlink(planted)


@pytest.fixture
def unix_listener():
    """A world-writable unix socket in /tmp that records the bytes of every connection."""
    path = f"/tmp/rlcore-sock-{uuid.uuid4().hex}"
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen()
    server.settimeout(0.1)
    received, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                received.append(conn.recv(100))
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, received
    stop.set()
    thread.join()
    server.close()
    os.unlink(path)


def test_a_unix_socket_opened_by_the_test_is_unreachable(unix_listener):
    path, received = unix_listener
    connect = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r}); s.sendall(b'leak'); " \
              "print('PWNED')"
    # The audit hook is bypassed (sys.audit silenced, then a fresh interpreter without the hook).
    through_exec = f"""
import sys
sys.audit = lambda *args: None
import subprocess
for exe in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
    try:
        out = subprocess.run([exe, "-c", {connect!r}], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr.strip()[-300:])
    except OSError as e:
        print(e)
"""
    code("p", fenced(through_exec), EXPECTED, timeout_s=5.0)
    result = run_without_hook(connect)
    assert "PWNED" not in result.stdout and "FileNotFoundError" in result.stderr, result.stderr[-500:]
    time.sleep(0.3)
    assert received == []


# ---------------------------------------------------------------------------------------------
# Start-up time, tracebacks, machines that lack a layer
# ---------------------------------------------------------------------------------------------


def test_start_up_time_does_not_count_against_the_program(monkeypatch):
    real_popen = subprocess.Popen

    def slow_popen(*args, **kwargs):  # a busy machine: the sandbox takes long to start
        time.sleep(0.5)
        return real_popen(*args, **kwargs)

    run_python("pass", timeout_s=5.0)  # probe the machine first, at normal speed
    monkeypatch.setattr(subprocess, "Popen", slow_popen)
    result = run_python("print(1)", timeout_s=0.3)
    assert (result.status, result.stdout) == ("ok", "1\n")
    assert result.seconds < 0.3


@pytest.mark.parametrize("program", ["open('/work/../x', 'w')", "import socket\nsocket.socket()",
                                     "def f():\n    raise ValueError('boom')\nf()", "import json\njson.loads('{')"])
def test_tracebacks_do_not_show_the_checkout(program):
    result = run_python(program, timeout_s=2.0)
    assert result.status == "crash" and 'File "solution.py"' in result.stderr, result.stderr
    assert str(REPO) not in result.stderr


@pytest.fixture
def weak_machine(monkeypatch):
    """This machine as one without bubblewrap or cgroups (the sandbox then runs the interpreter directly),
    with a temp dir of its own that the runs' uids can reach (under /tmp, mode 0711)."""
    reasons = {name: "pretended missing by the test" for name in sandbox_host.GUARANTEES}
    weak = dataclasses.replace(sandbox_host.probe(), bwrap=None, cgroups=None, missing=reasons)
    monkeypatch.setattr(sandbox_host, "probe", lambda: weak)
    temp = Path(tempfile.mkdtemp(dir="/tmp", prefix="rlcore-weak-"))
    temp.chmod(0o711)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(sandbox_process, "_cleaned_temp", [])
    yield temp
    shutil.rmtree(temp)


def test_a_missing_guarantee_refuses_unless_named(weak_machine):
    row = {"tests": [{"input": "2", "output": "4"}, "assert f(2) == 4"]}
    program = fenced("def f(x):\n    return 2 * x\nif __name__ == '__main__':\n    import sys\n"
                     "    print(f(int(sys.stdin.read() or 0)))")
    with pytest.raises(SandboxError, match=r"(?s)isolation .*\n- memory_cap .*\n- process_cap .*allow_missing: "
                                           r"\[isolation, memory_cap, process_cap\]"):
        code("p", program, row)
    with pytest.raises(SandboxError, match=r"(?s)reward\[0\]: .*allow_missing: \[memory_cap, process_cap\]"):
        CompositeReward([("code", 1.0, {"allow_missing": ["isolation"]})])
    # Accepted: the weaker sandbox still scores right and leaves no temp dir behind.
    everything = ["isolation", "memory_cap", "process_cap"]
    assert code("p", program, row, allow_missing=everything) == 1.0
    assert list(weak_machine.iterdir()) == []


def test_without_isolation_the_work_dirs_of_dead_workers_are_removed(weak_machine):
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = weak_machine / f"rlcore-sandbox-{finished.pid}-abc123"
    (stale / "work").mkdir(parents=True)
    result = run_python("print('hi')", timeout_s=2.0, allow_missing=list(sandbox_host.GUARANTEES))
    assert result.stdout == "hi\n"
    assert list(weak_machine.iterdir()) == []
