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
from rewards.steps import step_end_tokens
from rlcore import dist
from rlcore.batch import RolloutBatch, StepRewards


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
    steps: StepRewards | None = None
    """With a dense process reward: the kept samples' weighted step scores and step-end tokens."""


def collect(*, cfg, sampler, prompts, engine, sampling, tokenizer, reward_fn, timer) -> Collected:
    f, cache_len = cfg.algo.filter, cfg.algo.shaping.overlong_cache_tokens
    # The sampler draws the global batch and hands this rank its share; rounds run in lockstep over
    # the ranks so every sampler stays at the same position.
    need_global, n = cfg.train.prompts_per_step, cfg.rollout.samples_per_prompt
    need = need_global // sampler.world_size
    kept_prompts, kept_samples, kept_scores, kept_steps = [], [], [], []
    drawn: list[int] = []
    scores_all, components, other, examples = [], defaultdict(list), defaultdict(list), []
    rounds = num_constant = 0
    while dist.any_rank(len(kept_prompts) < need) and rounds < (f.max_rounds if f.drop_constant_groups else 1):
        rounds += 1
        idx = sampler.next_batch(need_global)
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
        steps = _steps(result, flat, tokenizer) if result.step_scores is not None else None
        scores_all += scores.tolist()
        for key, values in result.components.items():  # reward terms first: the first is the accuracy
            components[key] += values
        if penalty is not None:
            components["overlong"] += penalty.tolist()
        for key, value in result.metrics.items():
            if not key.endswith("/mean"):
                other[key].append(value)
        examples = examples or list(zip(texts, responses, scores.tolist()))[:4]
        grouped = scores.view(len(idx), n)  # (P, G)
        # A group has signal when its samples differ in score or in their summed step rewards.
        total = grouped if steps is None else grouped + torch.tensor([sum(r) for r, _ in steps]).view(len(idx), n)
        has_signal = total.max(1).values > total.min(1).values
        num_constant += int((~has_signal).sum())
        keep = has_signal | (not f.drop_constant_groups)
        for j in keep.nonzero()[:, 0].tolist()[: need - len(kept_prompts)]:
            kept_prompts.append(prompts.token_ids[idx[j]])
            kept_samples.append(samples[j])
            kept_scores.append(grouped[j])
            kept_steps += steps[j * n:(j + 1) * n] if steps else []

    # Every rank trains on as many groups as the rank that kept the fewest (equal micro-batch and
    # optimizer-step counts keep the sharded update in lockstep).
    fewest = -int(dist.all_reduce(torch.tensor([-len(kept_prompts)]), "max").item())
    if 0 < fewest < len(kept_prompts):
        kept_prompts, kept_samples, kept_scores = kept_prompts[:fewest], kept_samples[:fewest], kept_scores[:fewest]
        kept_steps = kept_steps[: fewest * n]
    metrics = _reward_metrics(scores_all, components, other)
    if f.drop_constant_groups:
        metrics |= {"filter/dropped_frac": num_constant / len(drawn), "filter/rounds": float(rounds),
                    "filter/hit_max_rounds": float(len(kept_prompts) < need)}
        if len(kept_prompts) < need:
            print(f"warning: dynamic sampling kept {len(kept_prompts)} of {need} groups after {rounds} rounds "
                  "(algo.filter.max_rounds); training on those", file=sys.stderr)
        if fewest == 0:  # a rank kept nothing: every rank trains on its last round (equal sizes)
            kept_prompts = [prompts.token_ids[i] for i in idx]
            kept_samples, kept_scores, kept_steps = samples, list(grouped), steps or []
    batch = RolloutBatch.from_samples(kept_prompts, kept_samples)
    step_rewards = StepRewards.from_lists(kept_steps) if kept_steps else None
    return Collected(batch, torch.cat(kept_scores), metrics, drawn, examples, step_rewards)


def _steps(result, flat, tokenizer) -> list[tuple[list[float], list[int]]]:
    """Per sample: (weighted step scores, the policy-token index where each step ends)."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    out = []
    for (_, s), scores, char_ends in zip(flat, result.step_scores, result.step_char_ends):
        ends = step_end_tokens(decode, s.token_ids, char_ends)
        out.append((scores[:len(ends)], ends))  # a step sharing its last token with the one before is dropped
    return out


def _reward_metrics(scores: list[float], components: dict, other: dict) -> dict[str, float]:
    """Over every round: means of the scores and components; counts (errors, timeouts, samples with
    no steps) summed, the other per-round statistics (a PRM's step statistics) averaged."""
    t = torch.tensor(scores)
    first = next(iter(components.values()))
    metrics = {"reward/mean": t.mean().item(), "reward/std": t.std().item() if len(t) > 1 else 0.0,
               "reward/accuracy": float(sum(first) / len(first))}
    metrics |= {f"reward/{key}/mean": sum(v) / len(v) for key, v in components.items()}
    counts = ("/errors", "/timeouts", "/no_step_samples")
    return metrics | {key: sum(v) if key.endswith(counts) else sum(v) / len(v) for key, v in other.items()}
