"""CPU threading defaults, set before torch loads its OpenMP runtime (the CLI imports this first).

On a CPU shared with other work, torch's OpenMP threads spin-waited for a peer thread that the OS
had descheduled: the quickstart took ~43 min beside other jobs on 2 cores instead of ~3 (issue 13,
item 9; bench/cpu_contention.py measures it). A passive wait policy makes an idle OpenMP thread
sleep at once instead of spinning, so a thread that shares its core with another job is not robbed of
its time slice by spinning, and a woken thread runs promptly. libgomp (torch's Linux wheels) reads
OMP_WAIT_POLICY, Intel's OpenMP KMP_BLOCKTIME, once, when the library loads: setting them after
`import torch` does nothing. A value already in the environment is kept, so a user can choose
otherwise. torchrun children inherit the environment of the `rlcore` that launches them.
"""

from __future__ import annotations

import os

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def apply_cpu_defaults() -> None:
    """Set the OpenMP wait policy unless the environment already names one; call before importing torch."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
