"""A reward that waits 20 ms before an exact-match check: the stand-in for a remote verifier or judge
(bench/profile_step.py --only reward_overlap). Used as python:bench/latency_reward.py:exact_after_wait."""

import time


def exact_after_wait(prompt: str, response: str, row: dict) -> float:
    time.sleep(0.02)
    return float(response.strip() == str(row["answer"]).strip())
