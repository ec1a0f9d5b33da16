"""Helpers shared by the sandbox test files (imported by name: pytest puts this folder on sys.path)."""

import os
import time
from pathlib import Path

import pytest

from rewards.sandbox import UID_BASE, run_python
from rewards.sandbox_host import probe

REPO = Path(__file__).resolve().parents[2]
EXPECTED = {"tests": [{"input": "", "output": "PWNED"}]}
TIMEOUT_S = 1.0
ALLOW_MISSING_ENV = "RLCORE_SANDBOX_TESTS_ALLOW_MISSING"


def fenced(program: str) -> str:
    return f"```python\n{program}\n```"


def require_full_sandbox() -> None:
    """Fail loudly where the machine lacks a sandbox guarantee (CI must have them all); a developer
    machine without them may set RLCORE_SANDBOX_TESTS_ALLOW_MISSING=1 to skip instead."""
    missing = probe().missing
    if not missing:
        return
    message = "; ".join(f"{name}: {why}" for name, why in missing.items())
    if os.environ.get(ALLOW_MISSING_ENV) == "1":
        pytest.skip(f"sandbox guarantees missing here ({message})")
    pytest.fail(f"this machine lacks sandbox guarantees the tests need: {message}. Install bubblewrap "
                f"(apt-get install -y bubblewrap) and run as root or with user namespaces and a writable cgroup, "
                f"or set {ALLOW_MISSING_ENV}=1 to skip these tests on a developer machine.")


def run_without_hook(program: str, **limits):
    """run_python with only the OS layers (no audit hook), to show they hold by themselves."""
    require_full_sandbox()
    return run_python(program, **{"timeout_s": TIMEOUT_S, **limits}, use_audit_hook=False)


def own_uids(pid: int) -> range:
    """The run uids a sandbox started by process `pid` gets (rewards/sandbox_process.py)."""
    first = UID_BASE + ((pid & 0x3FFFFF) << 8)
    return range(first, first + 256)


def sandbox_processes(owners: list[int]) -> list[str]:
    """Live processes of sandboxes started by the processes `owners`: by run uid or by run cgroup
    (only ours: other checkouts may run sandboxes on this machine at the same time)."""
    found, marks = [], [f"rlcore-sandbox-{pid}-" for pid in owners]
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
            cgroups = (entry / "cgroup").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").split()[:1] == ["Z"]:
            continue  # already dead, waiting to be reaped
        uid = int(fields["Uid"].split()[0])
        if any(uid in own_uids(pid) for pid in owners) or any(mark in cgroups for mark in marks):
            found.append(f"{entry.name} uid={uid} {cmdline[:100]}")
    return found


def wait_for_no_sandbox_processes(owners: list[int]) -> list[str]:
    deadline = time.monotonic() + 2.0  # the kernel tears a pid namespace down asynchronously
    while (left := sandbox_processes(owners)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(autouse=True)
def no_stray_processes():
    yield
    left = wait_for_no_sandbox_processes([os.getpid()])
    assert left == [], f"sandbox processes left behind: {left}"


def run_cgroups(owner: int) -> list[str]:
    """Run cgroups created by process `owner` that still exist."""
    host = probe()
    parents = set(host.cgroups.controllers.values()) if host.cgroups else set()
    return [os.path.join(p, n) for p in parents for n in os.listdir(p) if n.startswith(f"rlcore-sandbox-{owner}-")]
