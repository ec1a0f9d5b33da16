"""Steps 1-4 of the RL step: draw prompts, sample, score, and (DAPO) drop groups with no signal.

A group whose rewards are all equal has zero group-relative advantage, so it adds nothing to the
gradient but dilutes the batch. With algo.filter.drop_constant_groups, such groups are dropped and
more prompts are sampled until the step holds its groups, for at most algo.filter.max_rounds rounds;
then the step trains on what it has and says so. Reward metrics cover every sample generated, so
they describe the policy, not the filter.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass

import torch

from algos import overlong_penalty
from rlcore.batch import RolloutBatch


@dataclass(frozen=True)
class Collected:
    batch: RolloutBatch
    """The kept groups, a group's samples adjacent."""
    scores: torch.Tensor
    """(B,) rewards of the kept samples, length shaping included."""
    metrics: dict[str, float]
    """reward/* over every sample generated this step; filter/* when filtering."""
    prompt_indices: list[int]
    """Every prompt index drawn this step, in order (for audit and resume checks)."""
    examples: list[tuple[str, str, float]]
    """(prompt, response, reward) of the first samples, for the TensorBoard text."""


def collect(*, cfg, sampler, prompts, engine, sampling, tokenizer, reward_fn, timer) -> Collected:
    f, cache_len = cfg.algo.filter, cfg.algo.shaping.overlong_cache_tokens
    need, n = cfg.train.prompts_per_step, cfg.rollout.samples_per_prompt
    kept_prompts, kept_samples, kept_scores = [], [], []
    drawn: list[int] = []
    scores_all, components, failures, examples = [], defaultdict(list), defaultdict(float), []
    rounds = num_constant = 0
    while len(kept_prompts) < need and rounds < (f.max_rounds if f.drop_constant_groups else 1):
        rounds += 1
        idx = sampler.next_batch(need)
        drawn += idx
        with timer("generate"):
            samples = engine.generate([prompts.token_ids[i] for i in idx], sampling)
        with timer("reward"):
            flat = [(i, s) for i, group in zip(idx, samples) for s in group]
            texts = [prompts.texts[i] for i, _ in flat]
            responses = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for _, s in flat]
            result = reward_fn(texts, responses, [prompts.rows[i] for i, _ in flat])
            scores = torch.tensor(result.scores, dtype=torch.float32)
            lengths = torch.tensor([len(s.token_ids) for _, s in flat])
            penalty = overlong_penalty(lengths, max_len=cfg.rollout.max_new_tokens, cache_len=cache_len) \
                if cache_len else None
        scores = scores if penalty is None else scores + penalty
        scores_all += scores.tolist()
        for key, values in result.components.items():  # reward terms first: the first is the accuracy
            components[key] += values
        if penalty is not None:
            components["overlong"] += penalty.tolist()
        for key, value in result.metrics.items():
            if not key.endswith("/mean"):
                failures[key] += value
        examples = examples or list(zip(texts, responses, scores.tolist()))[:4]
        grouped = scores.view(len(idx), n)  # (P, G)
        has_signal = grouped.max(1).values > grouped.min(1).values
        num_constant += int((~has_signal).sum())
        keep = has_signal | (not f.drop_constant_groups)
        for j in keep.nonzero()[:, 0].tolist()[: need - len(kept_prompts)]:
            kept_prompts.append(prompts.token_ids[idx[j]])
            kept_samples.append(samples[j])
            kept_scores.append(grouped[j])

    metrics = _reward_metrics(scores_all, components, failures)
    if f.drop_constant_groups:
        metrics |= {"filter/dropped_frac": num_constant / len(drawn), "filter/rounds": float(rounds),
                    "filter/hit_max_rounds": float(len(kept_prompts) < need)}
        if len(kept_prompts) < need:
            print(f"warning: dynamic sampling kept {len(kept_prompts)} of {need} groups after {rounds} rounds "
                  "(algo.filter.max_rounds); training on those", file=sys.stderr)
        if not kept_prompts:  # nothing has signal: train on the last round (all advantages are 0)
            kept_prompts = [prompts.token_ids[i] for i in idx]
            kept_samples, kept_scores = samples, list(grouped)
    batch = RolloutBatch.from_samples(kept_prompts, kept_samples)
    return Collected(batch, torch.cat(kept_scores), metrics, drawn, examples)


def _reward_metrics(scores: list[float], components: dict, failures: dict) -> dict[str, float]:
    t = torch.tensor(scores)
    first = next(iter(components.values()))
    metrics = {"reward/mean": t.mean().item(), "reward/std": t.std().item() if len(t) > 1 else 0.0,
               "reward/accuracy": float(sum(first) / len(first))}
    metrics |= {f"reward/{key}/mean": sum(v) / len(v) for key, v in components.items()}
    return metrics | dict(failures)
