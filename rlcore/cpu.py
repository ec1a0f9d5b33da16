"""CPU threading defaults, set before torch loads its OpenMP runtime (the CLI imports this first).

On a CPU shared with other work, torch's OpenMP threads spun for a peer thread that the OS had
descheduled: the quickstart took ~43 min beside other jobs on 2 cores instead of ~3 (issue 13, item 9;
bench/cpu_contention.py measures it). libgomp (torch's Linux wheels) spins GOMP_SPINCOUNT iterations
(300,000 by default) before it sleeps; 1,000, what libgomp itself uses when it knows the cores are
oversubscribed, keeps a thread from burning its neighbour's slice while a quick hand-off still skips
the sleep. Measured (short quickstart, idle / beside one busy core, 2 cores): default 18.4 / 47.6 s;
1,000 spins 18.6 / 31.6 s; OMP_WAIT_POLICY=PASSIVE (no spin) 25 / 26 s, a third slower idle.
libgomp reads these once, when it loads: setting them after `import torch` does nothing. A user's own
GOMP_SPINCOUNT or OMP_WAIT_POLICY is kept. torchrun children inherit the environment of the `rlcore`
that launches them.
"""

from __future__ import annotations

import os

SPIN_COUNT = "1000"


def apply_cpu_defaults() -> None:
    """Cap OpenMP spin-waiting unless the environment already says how to wait; call before importing torch."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
