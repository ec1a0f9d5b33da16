"""bench/gpu_step.py (the GPU goals of the benchmarks issue) runs end to end at a tiny shape on CPU, and
its decode roofline matches a hand count."""

import importlib.util
import json
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "bench" / "gpu_step.py"


def test_decode_floor_counts_weights_once_per_step_and_the_live_rows_cache():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # rows of 2 and 1 tokens, prompts of 3: step 0 reads W + 2 rows x 3 tokens, step 1 W + 1 row x 4 tokens
    seconds = bench.decode_floor_seconds([2, 1], 3, weight_bytes=100, kv_per_token=10, bandwidth=10.0)
    assert seconds == (100 + 2 * 3 * 10) / 10 + (100 + 1 * 4 * 10) / 10


def test_runs_every_experiment_at_a_tiny_shape_on_cpu():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "tiny", "--reps", "2", "--mm-sizes", "128",
         "--copy-mb", "8", "--train-rows", "2", "--train-len", "32", "--prompts", "2", "--samples", "2",
         "--prompt-len", "4", "--new-tokens", "8", "--steps", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["experiment"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(records) == {"peak", "train", "decode", "sync", "step"}
    assert records["train"]["mfu"] > 0 and records["train"]["tokens_per_s"] > 0  # (a tiny matmul's peak: no bound)
    assert 0 < records["decode"]["of_roofline"] <= 1 and records["decode"]["generated"] > 0
    assert records["sync"]["max_checksum_error"] == 0.0 and records["sync"]["bytes"] > 0
    assert 0 < records["step"]["sync_and_switch_share"] < 1
