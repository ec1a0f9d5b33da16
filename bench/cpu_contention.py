"""The quickstart on an idle CPU and beside one busy core: how much slower a neighbour makes it.

    python bench/cpu_contention.py [--full] [--steps 10] [--warmstart 300] [--repeats 1]
                                   [--variant NAME=ENV,ENV ...] [--only NAME ...] [--conditions idle loaded]

Each variant runs `rlcore train quickstart` (the real CLI, a fresh warm-start cache every run so the
warm start is measured too) twice per repeat: alone, and beside `python -c "while True: pass"` (one
core kept busy, as another user's job would). It prints one JSON line per run and one per variant
with the median seconds and the ratio loaded / idle. The issue's goal (issue 13, item 9): at most 2.5x,
and the idle time no worse than before.

Variants (environment for the run; the default pair):
  now      as shipped: the CLI sets GOMP_SPINCOUNT=1000 before torch loads (rlcore/cpu.py)
  before   GOMP_SPINCOUNT set but empty, so the CLI leaves it alone and libgomp uses its default
           (spin 300k iterations before sleeping)
  passive  OMP_WAIT_POLICY=PASSIVE (no spinning at all)
Others can be given, e.g. --variant threads1=OMP_NUM_THREADS=1.

--full runs the quickstart exactly as `rlcore train` does (3000-step warm start stopping at 40 %
train accuracy, 200 RL steps): minutes idle, long loaded. Without it: --warmstart steps of warm start
(run to the end) and --steps RL steps, the same phases in small.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"now": {}, "before": {"GOMP_SPINCOUNT": ""}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def quickstart_args(full: bool, steps: int, warmstart: int) -> list[str]:
    if full:
        return []
    return [f"trainer.total_steps={steps}", f"model.warmstart.steps={warmstart}", "model.warmstart.until_accuracy=0",
            "trainer.eval_every=0", "trainer.save_every=0"]


def run_once(args: list[str], env: dict[str, str], loaded: bool) -> dict:
    """Seconds of one `rlcore train quickstart` in a fresh folder and cache, beside a busy core if loaded."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_env = {**os.environ, "PYTHONPATH": str(REPO), "RLCORE_CACHE": f"{tmp}/cache", **env}
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "rlcore", "train", "quickstart", *args,
                                   f"trainer.output_dir={tmp}/run"], env=run_env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"rlcore train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            summary = json.loads(Path(tmp, "run", "summary.json").read_text())
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    return {"seconds": round(seconds, 2), "train_seconds": round(summary["train_seconds"], 2),
            "load_avg_1m_before": load_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the quickstart as shipped (minutes)")
    parser.add_argument("--steps", type=int, default=10, help="RL steps (without --full)")
    parser.add_argument("--warmstart", type=int, default=300, help="warm-start steps (without --full)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ENV,ENV",
                        help="extra variant, e.g. threads1=OMP_NUM_THREADS=1 (repeatable)")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--conditions", nargs="+", choices=["idle", "loaded"], default=["idle", "loaded"],
                        help="idle: alone; loaded: beside one busy core (default: both)")
    opts = parser.parse_args()
    variants = dict(VARIANTS)
    for spec in opts.variant:
        name, _, env = spec.partition("=")
        variants[name] = dict(kv.split("=", 1) for kv in env.split(",") if kv)
    if opts.only:
        variants = {k: v for k, v in variants.items() if k in opts.only}
    args = quickstart_args(opts.full, opts.steps, opts.warmstart)
    results: dict[tuple[str, bool], list[float]] = {}
    for repeat in range(opts.repeats):
        for name, env in variants.items():  # interleaved, so drifting load hits every variant alike
            for loaded in [c == "loaded" for c in opts.conditions]:
                r = run_once(args, env, loaded)
                results.setdefault((name, loaded), []).append(r["seconds"])
                print(json.dumps({"variant": name, "loaded": loaded, "repeat": repeat, **r}), flush=True)
    for name in variants:
        idle, busy = (statistics.median(results[(name, b)]) if (name, b) in results else None for b in (False, True))
        ratio = round(busy / idle, 2) if idle and busy else None
        print(json.dumps({"variant": name, "env": variants[name], "idle_s": idle, "loaded_s": busy, "ratio": ratio,
                          "cpus": os.cpu_count(), "args": args}), flush=True)


if __name__ == "__main__":
    main()
