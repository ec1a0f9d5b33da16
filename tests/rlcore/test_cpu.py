"""The CLI sets the OpenMP wait policy before torch loads (bench/cpu_contention.py measures why)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

# Records OMP_WAIT_POLICY at the moment anything first imports torch: libgomp reads it once, at load.
PROBE = """
import os, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("at torch import:", os.environ.get("OMP_WAIT_POLICY"), os.environ.get("KMP_BLOCKTIME"))
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Watch())
import rlcore.cli
"""


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE 0"), ("ACTIVE", "ACTIVE 0")])
def test_cli_sets_a_passive_openmp_wait_before_torch_loads(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given  # a user's choice is kept
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, check=True).stdout
    assert f"at torch import: {expected}" in out
