"""The CLI caps OpenMP spin-waiting before torch loads (bench/cpu_contention.py measures why)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

# Records the wait settings at the moment anything first imports torch: libgomp reads them once, at load.
PROBE = """
import os, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("at torch import:", os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"))
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Watch())
import rlcore.cli
"""


@pytest.mark.parametrize("given, expected", [({}, "1000 None"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE"),
                                             ({"GOMP_SPINCOUNT": "5"}, "5 None")])
def test_cli_caps_openmp_spinning_before_torch_loads(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env |= given  # a user's choice is kept
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, check=True).stdout
    assert f"at torch import: {expected}" in out
