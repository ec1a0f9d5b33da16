"""`code` reward throughput: sandboxed programs scored per second through the real worker pool.

    python bench/code_reward.py [--programs 60] [--workers 2] [--tests 3] [--timeout-s 1.0]
                                [--kind stdio|assert] [--repo PATH]

Workload: --programs responses, each with --tests tests (stdin/stdout, or assert-style on a function
f), scored by CompositeReward with the `code` reward: 70% pass every test, 20% give a wrong answer,
10% loop forever (each of their tests runs to the timeout; they dominate the wall time). One warm-up
batch first (worker start-up), then one timed batch. --repo scores with another checkout's rewards
(e.g. main, for a before/after in one session). Prints one JSON line; check loadavg_1m, the machine
may be shared.
"""

import argparse
import json
import os
import sys
import time

PROGRAMS = {  # kind -> {"stdio": program, "assert": program}, share of the batch
    "pass": ({"stdio": "n = int(input())\nprint(sum(range(n + 1)))",
              "assert": "def f(n):\n    return sum(range(n + 1))"}, 0.7),
    "fail": ({"stdio": "n = int(input())\nprint(n * (n - 1) // 2)",
              "assert": "def f(n):\n    return n * (n - 1) // 2"}, 0.2),
    "timeout": ({"stdio": "n = int(input())\nwhile n >= 0:\n    n += 1",
                 "assert": "def f(n):\n    while n >= 0:\n        n += 1"}, 0.1),
}


def make_batch(num_programs: int, num_tests: int, kind: str) -> tuple[list[str], list[dict]]:
    kinds = [name for name, (_, share) in PROGRAMS.items() for _ in range(round(share * num_programs))]
    kinds = (kinds + ["pass"] * num_programs)[:num_programs]
    responses = [f"```python\n{PROGRAMS[name][0][kind]}\n```" for name in kinds]
    numbers = range(1, num_tests + 1)
    tests = [{"input": f"{n}\n", "output": f"{n * (n + 1) // 2}\n"} for n in numbers] if kind == "stdio" else \
        [f"assert f({n}) == {n * (n + 1) // 2}" for n in numbers]
    return responses, [{"tests": tests}] * num_programs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tests", type=int, default=3, help="stdin/stdout tests per program")
    parser.add_argument("--timeout-s", type=float, default=1.0, help="per test")
    parser.add_argument("--kind", choices=("stdio", "assert"), default="stdio", help="the tests' kind")
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="checkout whose rewards/ to score with (default: this one)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.repo))
    from rewards import CompositeReward
    from rewards.sandbox import run_python

    responses, rows = make_batch(args.programs, args.tests, args.kind)
    spec = ("code", 1.0, {"timeout_s": args.timeout_s})
    with CompositeReward([spec], timeout_s=args.tests * (args.timeout_s + 1.0), num_workers=args.workers) as reward:
        reward(["p"] * 2, responses[:2], rows[:2])  # warm-up: waits for the workers to start
        start = time.perf_counter()
        result = reward(["p"] * args.programs, responses, rows)
        seconds = time.perf_counter() - start
    probe = run_python("pass", timeout_s=5.0)
    expected = sum(1.0 for r in responses if PROGRAMS["pass"][0][args.kind] in r)
    assert sum(result.scores) == expected and result.metrics["reward/code/errors"] == 0, result.metrics
    print(json.dumps({
        "bench": "code_reward",
        "repo": os.path.abspath(args.repo),
        "kind": args.kind,
        "programs": args.programs,
        "workers": args.workers,
        "programs_per_s": round(args.programs / seconds, 2),
        "tests_per_s": round(args.programs * args.tests / seconds, 2),
        "tests_per_program": args.tests,
        "timeout_s": args.timeout_s,
        "seconds": round(seconds, 2),
        "sandbox": list(getattr(probe, "guarantees", None) or getattr(probe, "layers", ())),
        "loadavg_1m": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
