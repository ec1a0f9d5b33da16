"""Held-out evaluation: greedy answers to the eval prompts, scored by the run's rewards."""

from __future__ import annotations

import numpy as np

from rlcore.agent import reward_inputs
from rollout import SamplingParams


def evaluate(engine, reward_fn, prompts, tokenizer, *, max_new_tokens: int, stop_token_ids=(),
             batch_size: int = 256) -> dict[str, float]:
    """accuracy = mean of the first reward term (0/1 for exact/math); reward_mean = the weighted sum.
    engine: an Engine, or the AgentEngine with tools (multi-turn greedy rollouts, tools run)."""
    greedy = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop_token_ids))
    samples = []
    engine.wake()
    for start in range(0, len(prompts), batch_size):
        samples += [group[0] for group in engine.generate(prompts.token_ids[start : start + batch_size], greedy)]
    engine.sleep()
    responses, rows = reward_inputs(samples, prompts.rows, tokenizer)  # with tools: final turn + trajectory
    result = reward_fn(prompts.texts, responses, rows)
    first = next(iter(result.components.values()))
    return {"accuracy": float(np.mean(first)), "reward_mean": float(np.mean(result.scores))}
