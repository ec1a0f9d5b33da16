"""Steps 1-4 of the RL step: draw prompts, sample, score, and (DAPO) drop groups with no signal.

A group whose rewards are all equal has zero group-relative advantage, so it adds nothing to the
gradient but dilutes the batch. With algo.filter.drop_constant_groups, such groups are dropped and
more prompts are sampled until the step holds its groups, for at most algo.filter.max_rounds rounds;
then the step trains on what it has and says so. Reward metrics cover every sample generated, so
they describe the policy, not the filter.

Without the filter the batch does not depend on the rewards: with `overlap`, collect() hands it back
at once and the rule rewards run in the reward worker processes while the trainer's model passes run
(reference, critic, old log-probs); Collecting.result() waits for them.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from algos import overlong_penalty
from rewards import PendingReward, RewardResult
from rewards.steps import step_end_tokens
from rlcore import dist
from rlcore.agent import AgentEngine, Trajectory, agent_metrics, reward_inputs
from rlcore.batch import RolloutBatch, StepRewards
from rollout import Sample


@dataclass(frozen=True)
class Collected:
    batch: RolloutBatch
    """The kept groups, a group's samples adjacent."""
    scores: torch.Tensor
    """(B,) rewards of the kept samples, length shaping included."""
    metrics: dict[str, float]
    """reward/* (and agent/* with tools) over every sample generated this step; filter/* when filtering."""
    prompt_indices: list[int]
    """Every prompt index drawn this step, in order (for audit and resume checks)."""
    examples: list[tuple[str, str, float, Trajectory | None]]
    """(prompt, response, reward, the trajectory with tools or None) of the first samples, for the
    TensorBoard text."""
    steps: StepRewards | None = None
    """With a dense process reward: the kept samples' weighted step scores and step-end tokens."""
    reward_errors: dict[str, str] = field(default_factory=dict)
    """Reward component key -> the first error (or timeout) message of this step, where there was one."""


class Collecting:
    """The step's batch, known now, and its rewards, which may still be scored in the reward workers:
    `result()` waits for them (timed as the "reward" phase) and returns the Collected step."""

    def __init__(self, batch: RolloutBatch, finish: Callable[[], Collected]):
        self.batch, self._finish, self._done = batch, finish, None

    def result(self) -> Collected:
        if self._done is None:
            self._done = self._finish()
        return self._done


@dataclass(frozen=True)
class _Round:
    """One round of sampling: the prompt indices drawn, their samples, the decoded texts, and the
    rewards (in flight until scored)."""
    idx: list[int]
    samples: list[list[Sample]]
    texts: list[str]
    responses: list[str]
    reward: PendingReward


@dataclass(frozen=True)
class _Scored:
    scores: torch.Tensor  # (P * G,) length shaping included
    result: RewardResult
    penalty: torch.Tensor | None
    steps: list[tuple[list[float], list[int]]] | None


def collect(*, cfg, sampler, prompts, engine, sampling, tokenizer, reward_fn, timer, overlap: bool = True
            ) -> Collecting:
    f, n = cfg.algo.filter, cfg.rollout.samples_per_prompt
    # The sampler draws the global batch and hands this rank its share; rounds run in lockstep over
    # the ranks so every sampler stays at the same position.
    need_global = cfg.train.prompts_per_step
    need = need_global // sampler.world_size

    def generate(idx: list[int]) -> _Round:
        with timer("generate"):
            samples = engine.generate([prompts.token_ids[i] for i in idx], sampling)
        flat = [(i, s) for i, group in zip(idx, samples) for s in group]
        texts = [prompts.texts[i] for i, _ in flat]
        # With tools: the final turn is the response, the whole trajectory rides in the row.
        responses, rows = reward_inputs([s for _, s in flat], [prompts.rows[i] for i, _ in flat], tokenizer)
        pending = reward_fn.submit(texts, responses, rows)
        return _Round(idx, samples, texts, responses, pending)

    def rollout_metrics(rounds: list[_Round]) -> dict[str, float]:
        metrics = agent_metrics([s for r in rounds for group in r.samples for s in group])
        if isinstance(engine, AgentEngine):
            metrics["timing/tools"] = engine.pop_tool_wall_seconds()
        return metrics

    def score(r: _Round) -> _Scored:
        return _score(r, cfg, tokenizer, timer)

    if not f.drop_constant_groups:
        # One round, kept whole: the batch is known before its rewards, so the reward workers score
        # them while the caller runs its model passes (reference, critic, old log-probs).
        r = generate(sampler.next_batch(need_global))
        batch = RolloutBatch.from_samples([prompts.token_ids[i] for i in r.idx], r.samples)
        agent = rollout_metrics([r])

        def finish() -> Collected:
            s = score(r)
            return Collected(batch, s.scores, _reward_metrics([r], [s]) | agent, list(r.idx), _examples(r, s),
                             StepRewards.from_lists(s.steps) if s.steps else None, _first_errors([s]))
        if not overlap:
            done = finish()
            return Collecting(batch, lambda: done)
        return Collecting(batch, finish)

    kept_prompts, kept_samples, kept_scores, kept_steps = [], [], [], []
    rounds, scored = [], []
    num_constant = 0
    while dist.any_rank(len(kept_prompts) < need) and len(rounds) < f.max_rounds:
        r = generate(sampler.next_batch(need_global))
        s = score(r)
        rounds.append(r)
        scored.append(s)
        grouped = s.scores.view(len(r.idx), n)  # (P, G)
        # A group has signal when its samples differ in score or in their summed step rewards.
        total = grouped if s.steps is None else grouped + torch.tensor([sum(x) for x, _ in s.steps]).view(len(r.idx), n)
        has_signal = total.max(1).values > total.min(1).values
        num_constant += int((~has_signal).sum())
        for j in has_signal.nonzero()[:, 0].tolist()[: need - len(kept_prompts)]:
            kept_prompts.append(prompts.token_ids[r.idx[j]])
            kept_samples.append(r.samples[j])
            kept_scores.append(grouped[j])
            kept_steps += s.steps[j * n:(j + 1) * n] if s.steps else []

    # Every rank trains on as many groups as the rank that kept the fewest (equal micro-batch and
    # optimizer-step counts keep the sharded update in lockstep).
    fewest = -int(dist.all_reduce(torch.tensor([-len(kept_prompts)]), "max").item())
    if 0 < fewest < len(kept_prompts):
        kept_prompts, kept_samples, kept_scores = kept_prompts[:fewest], kept_samples[:fewest], kept_scores[:fewest]
        kept_steps = kept_steps[: fewest * n]
    drawn = [i for r in rounds for i in r.idx]
    metrics = _reward_metrics(rounds, scored) | rollout_metrics(rounds)
    metrics |= {"filter/dropped_frac": num_constant / len(drawn), "filter/rounds": float(len(rounds)),
                "filter/hit_max_rounds": float(len(kept_prompts) < need)}
    if len(kept_prompts) < need:
        print(f"warning: dynamic sampling kept {len(kept_prompts)} of {need} groups after {len(rounds)} rounds "
              "(algo.filter.max_rounds); training on those", file=sys.stderr)
    if fewest == 0:  # a rank kept nothing: every rank trains on its last round (equal sizes)
        kept_prompts = [prompts.token_ids[i] for i in r.idx]
        kept_samples, kept_scores, kept_steps = r.samples, list(s.scores.view(len(r.idx), n)), s.steps or []
    batch = RolloutBatch.from_samples(kept_prompts, kept_samples)
    done = Collected(batch, torch.cat(kept_scores), metrics, drawn, _examples(rounds[0], scored[0]),
                     StepRewards.from_lists(kept_steps) if kept_steps else None, _first_errors(scored))
    return Collecting(batch, lambda: done)


def _score(r: _Round, cfg, tokenizer, timer) -> _Scored:
    """Wait for a round's rewards; add the overlong length penalty; map dense step scores to tokens."""
    cache_len = cfg.algo.shaping.overlong_cache_tokens
    with timer("reward"):
        result = r.reward.result()
        scores = torch.tensor(result.scores, dtype=torch.float32)
        lengths = torch.tensor([len(s.token_ids) for group in r.samples for s in group])
        penalty = overlong_penalty(lengths, max_len=cfg.rollout.max_new_tokens, cache_len=cache_len) \
            if cache_len else None
    scores = scores if penalty is None else scores + penalty
    flat = [s for group in r.samples for s in group]
    steps = _steps(result, flat, tokenizer) if result.step_scores is not None else None
    return _Scored(scores, result, penalty, steps)


def _first_errors(scored: list[_Scored]) -> dict[str, str]:
    out: dict[str, str] = {}
    for s in scored:
        for key, error in s.result.first_errors.items():
            out.setdefault(key, error)
    return out


def _examples(r: _Round, s: _Scored) -> list[tuple[str, str, float, Trajectory | None]]:
    flat = [x if isinstance(x, Trajectory) else None for group in r.samples for x in group]
    return list(zip(r.texts, r.responses, s.scores.tolist(), flat))[:4]


def _steps(result, flat: list[Sample], tokenizer) -> list[tuple[list[float], list[int]]]:
    """Per sample: (weighted step scores, the policy-token index where each step ends)."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    out = []
    for s, scores, char_ends in zip(flat, result.step_scores, result.step_char_ends):
        ends = step_end_tokens(decode, s.token_ids, char_ends)
        out.append((scores[:len(ends)], ends))  # a step sharing its last token with the one before is dropped
    return out


def _reward_metrics(rounds: list[_Round], scored: list[_Scored]) -> dict[str, float]:
    """Over every round: means of the scores and components; counts (errors, timeouts, samples with
    no steps) summed, the other per-round statistics (a PRM's step statistics) averaged;
    perf/reward_seconds: the reward workers' wall time, overlapped with other work or not."""
    t = torch.cat([s.scores for s in scored])
    components, other = defaultdict(list), defaultdict(list)
    for s in scored:
        for key, values in s.result.components.items():  # reward terms first: the first is the accuracy
            components[key] += values
        if s.penalty is not None:
            components["overlong"] += s.penalty.tolist()
        for key, value in s.result.metrics.items():
            if not key.endswith("/mean"):
                other[key].append(value)
    first = next(iter(components.values()))
    metrics = {"reward/mean": t.mean().item(), "reward/std": t.std().item() if len(t) > 1 else 0.0,
               "reward/accuracy": float(sum(first) / len(first)), "reward/samples": float(len(t)),
               "perf/reward_seconds": sum(r.reward.rule_seconds for r in rounds)}
    metrics |= {f"reward/{key}/mean": sum(v) / len(v) for key, v in components.items()}
    counts = ("/errors", "/timeouts", "/no_step_samples")
    return metrics | {key: sum(v) if key.endswith(counts) else sum(v) / len(v) for key, v in other.items()}
