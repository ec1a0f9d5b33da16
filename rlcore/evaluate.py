"""Held-out evaluation: greedy answers to the eval prompts, scored by the run's rewards."""

from __future__ import annotations

import numpy as np

from rollout import SamplingParams


def evaluate(engine, reward_fn, prompts, tokenizer, *, max_new_tokens: int, stop_token_ids=(),
             batch_size: int = 256) -> dict[str, float]:
    """accuracy = mean of the first reward term (0/1 for exact/math); reward_mean = the weighted sum."""
    greedy = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop_token_ids))
    responses = []
    engine.wake()
    for start in range(0, len(prompts), batch_size):
        out = engine.generate(prompts.token_ids[start : start + batch_size], greedy)
        responses += [tokenizer.decode(group[0].token_ids, skip_special_tokens=True) for group in out]
    engine.sleep()
    result = reward_fn(prompts.texts, responses, prompts.rows)
    first = next(iter(result.components.values()))
    return {"accuracy": float(np.mean(first)), "reward_mean": float(np.mean(result.scores))}
