"""Attack suite for the `code` reward's sandbox: each attack must be contained and score 0.

Every attack program prints the expected output ("PWNED") only if the attack worked, so a
leak would show up as a score of 1. Each runs twice: through code_reward (all layers), and
through run_python without the audit hook, to show the OS layers hold by themselves. After
each test no sandbox process may be left. The classes of issue 14 (verdict, memory, files,
sockets, leftovers) are in test_sandbox_guarantees.py.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from sandbox_kit import (EXPECTED, REPO, TIMEOUT_S, fenced, no_stray_processes,  # noqa: F401 (autouse)
                         require_full_sandbox, run_cgroups, run_without_hook, sandbox_processes,
                         wait_for_no_sandbox_processes)

from rewards import REWARDS, CompositeReward
from rewards.sandbox import run_python

code = REWARDS["code"]
SECRET_NAME = "RLCORE_ATTACK_SECRET"


INFINITE_LOOP = """
import signal
signal.signal(signal.SIGXCPU, signal.SIG_IGN)  # shrug off the soft CPU limit
while True:
    pass
print("PWNED")
"""


def test_infinite_loop():
    start = time.monotonic()
    assert code("p", fenced(INFINITE_LOOP), EXPECTED, timeout_s=TIMEOUT_S) == 0.0
    assert time.monotonic() - start < TIMEOUT_S + 1.0
    assert run_python(INFINITE_LOOP, timeout_s=TIMEOUT_S).status == "timeout"


FORK_BOMB = """
import os, time
children = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.setsid()  # leave the session: a killpg alone would miss it
        time.sleep(60)
        os._exit(0)
    children += 1
print("PWNED" if children >= 100 else f"only {children}")
"""


def test_fork_bomb_is_capped_and_cleaned_up():
    assert code("p", fenced(FORK_BOMB), EXPECTED, timeout_s=TIMEOUT_S, max_processes=8) == 0.0
    result = run_without_hook(FORK_BOMB)
    assert result.stdout.startswith("only "), result.stdout  # RLIMIT_NPROC stopped it
    assert int(result.stdout.split()[1]) < 8
    # The sleepers called setsid; they die with the pid namespace (checked by the fixture).


BIG_ALLOCATION = """
block = bytearray(10 * 1024 ** 3)  # 10 GB
block[-1] = 1
print("PWNED")
"""


def test_10_gb_allocation():
    assert code("p", fenced(BIG_ALLOCATION), EXPECTED, memory_mb=512) == 0.0
    assert run_python(BIG_ALLOCATION, timeout_s=TIMEOUT_S, memory_mb=512).status == "memory"


def write_outside_program(targets: list[str]) -> str:
    return f"""
import os
written = 0
for path in {targets!r}:
    for attempt in (lambda: open(path, "w").write("x"), lambda: os.close(os.open(path, os.O_CREAT | os.O_WRONLY))):
        try:
            attempt()
            written += 1
        except OSError as e:
            print(type(e).__name__, e)
print("PWNED" if written else "contained")
"""


def test_writing_outside_the_work_dir(tmp_path):
    name = f"rlcore-attack-{uuid.uuid4().hex}"
    host_targets = [str(tmp_path / "pwned"), f"/tmp/{name}"]
    program = write_outside_program([*host_targets, f"/dev/shm/{name}"])  # the run's own /dev/shm is fine
    code("p", fenced(program), EXPECTED)
    result = run_without_hook(program)
    assert result.stdout.count("No such file or directory") == 2 * len(host_targets), result.stdout
    for target in [*host_targets, f"/dev/shm/{name}"]:
        assert not os.path.exists(target), target


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that records every connection it accepts."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn.recv(100))
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def test_network_is_unreachable(listener):
    port, accepted = listener
    program = f"""
import socket
try:
    s = socket.create_connection(("127.0.0.1", {port}), timeout=0.5)
    s.sendall(b"leak")
    print("PWNED")
except Exception as e:
    print(type(e).__name__, e)
"""
    assert code("p", fenced(program), EXPECTED) == 0.0
    result = run_without_hook(program)
    assert "PWNED" not in result.stdout and "ConnectionRefusedError" in result.stdout, result.stdout
    time.sleep(0.2)
    assert accepted == []


def read_secret_program(parent_pid: int) -> str:
    return f"""
import os
found = os.environ.get({SECRET_NAME!r}, "")
for pid in [os.getppid(), {parent_pid}, *[p for p in os.listdir("/proc") if p.isdigit()]]:
    try:
        data = open(f"/proc/{{pid}}/environ", "rb").read()
    except Exception:
        continue
    for item in data.split(b"\\0"):
        if item.startswith({SECRET_NAME!r}.encode() + b"="):
            found = item.split(b"=", 1)[1].decode()
print(found or "nothing", sorted(os.environ))
"""


def test_parent_environment_is_not_readable(monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv(SECRET_NAME, secret)
    program = read_secret_program(os.getpid())
    assert code("p", fenced(program), {"tests": [{"input": "", "output": secret}]}) == 0.0
    for result in (run_python(program, timeout_s=TIMEOUT_S), run_without_hook(program)):
        assert secret not in result.stdout + result.stderr
        assert result.stdout.startswith("nothing ['HOME', 'LANG', 'PATH', 'TMPDIR']"), result.stdout


def signal_parent_program(parent_pid: int) -> str:
    return f"""
import os, signal
hits = 0
for pid in (os.getppid(), {parent_pid}):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
            hits += pid == {parent_pid}
        except Exception as e:
            print(type(e).__name__, e)
try:
    os.kill(-1, signal.SIGKILL)  # everything this process may signal
except Exception as e:
    print(type(e).__name__, e)
print("PWNED" if hits else "contained")
"""


def test_signalling_the_parent():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        program = signal_parent_program(os.getpid())
        assert code("p", fenced(program), EXPECTED) == 0.0
        result = run_without_hook(program)
        assert result.stdout.strip().endswith("contained"), result.stdout
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == []  # and SIGKILL would have ended this test process


def test_a_killed_worker_leaves_nothing_behind(tmp_path):
    # The reward worker running a sandbox can itself be killed (the pool's timeout): nothing of the
    # sandbox may outlive it, not even children that left the session, and no temp dir or cgroup
    # may stay behind (its cgroups are removed by the next run, here in this process).
    require_full_sandbox()
    program = FORK_BOMB.replace('print("PWNED"', 'time.sleep(60)\nprint("PWNED"')
    script = f"import sys; sys.path.insert(0, {str(REPO)!r}); from rewards.sandbox import run_python; " \
             f"run_python({program!r}, timeout_s=60.0)"
    temp = tmp_path.parent / f"rlcore-killed-worker-{uuid.uuid4().hex}"  # its own, so others' runs don't count
    temp.mkdir(mode=0o711)
    temp.chmod(0o711)
    worker = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(temp)})
    try:
        deadline = time.monotonic() + 20.0
        while len(running := sandbox_processes([worker.pid])) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(running) >= 3, running  # the spawn, the sandbox's init, the program (+ its forks)
    finally:
        worker.kill()
        worker.wait()
    assert wait_for_no_sandbox_processes([worker.pid]) == []
    assert run_python("pass", timeout_s=5.0).status == "ok"
    assert run_cgroups(worker.pid) == []
    assert list(temp.iterdir()) == []


def test_attacks_in_a_batch_then_a_normal_program_still_scores(tmp_path, monkeypatch):
    # The trainer's path: the worker pool, the workers' environment holding the secret.
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv(SECRET_NAME, secret)
    target = f"/tmp/rlcore-attack-{uuid.uuid4().hex}"
    secret_row = {"tests": [{"input": "", "output": secret}]}
    batch = [(INFINITE_LOOP, EXPECTED), (FORK_BOMB, EXPECTED), (BIG_ALLOCATION, EXPECTED),
             (write_outside_program([target]), EXPECTED), (read_secret_program(0), secret_row),
             (signal_parent_program(0), EXPECTED), ("print('PWNED')", EXPECTED)]  # the last one is honest
    responses, rows = [fenced(program) for program, _ in batch], [row for _, row in batch]
    with CompositeReward([("code", 1.0, {"timeout_s": TIMEOUT_S})], timeout_s=20.0, num_workers=2) as reward:
        result = reward(["p"] * len(responses), responses, rows)
        again = reward(["p"], [fenced("print(input()[::-1])")], [{"tests": [{"input": "abc", "output": "cba"}]}])
    assert result.components["code"] == [0.0] * (len(batch) - 1) + [1.0]
    assert result.metrics["reward/code/errors"] == 0.0  # no worker was killed or crashed
    assert result.metrics["reward/code/timeouts"] == 0.0
    assert again.scores == [1.0]
    assert not os.path.exists(target)
