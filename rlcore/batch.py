"""Typed batch containers and token-budget micro-batching.

Shapes: B = sequences, T = response tokens (right-padded), P = longest prompt + response.

Two different things mark a row's response tokens, and they differ once rollouts call tools:
    lengths (B,)   the row's REAL response tokens: positions t < lengths[b] are tokens of the sequence
                   (the model's, and in multi-turn rollouts the chat template's and the tools'),
                   positions t >= lengths[b] are PADDING. Forward passes feed the real tokens and
                   nothing else; padding exists only to make a rectangle.
    mask (B, T)    the TRAINED tokens: 1 on tokens the policy sampled, 0 on padding AND on the
                   template / tool-output tokens inside a trajectory (real tokens with mask 0). Log-probs,
                   entropy, KL, the policy and value losses, the aggregation counts and the advantages
                   are all taken over the mask.
In a single-turn rollout the two coincide (mask = 1 exactly on t < lengths[b]).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from rollout import Sample


@dataclass(frozen=True)
class RolloutBatch:
    """What one rollout produced, as tensors; one row per sample, a group's samples adjacent."""

    prompt_ids: list[list[int]]
    """B prompts (repeated per sample)."""
    response_ids: Tensor
    """(B, T) long, response tokens (multi-turn: model, template and tool tokens), 0 after the end."""
    mask: Tensor
    """(B, T) float, 1 on tokens the model sampled (EOS included), 0 on template / tool tokens and padding."""
    rollout_logprobs: Tensor
    """(B, T) float, engine log-probs of the sampled tokens (0 where mask is 0)."""
    group_ids: Tensor
    """(B,) long, index of the prompt within the step."""
    is_truncated: Tensor
    """(B,) bool, hit max_new_tokens without a stop token."""
    routing: list[Tensor] | None = None
    """MoE: per sample, (prompt + response - 1, layers, top_k) expert ids chosen during rollout."""
    lengths: Tensor | None = None
    """(B,) long, real response tokens per row (trained or not); None: response_lengths(mask), one past the
    last trained token (a multi-turn trajectory ends with a model turn)."""

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def real_lengths(self) -> Tensor:
        """(B,) long real response tokens per row."""
        return response_lengths(self.mask) if self.lengths is None else self.lengths

    @staticmethod
    def from_samples(prompts: list[list[int]], samples: list[list[Sample]]) -> "RolloutBatch":
        """samples: rollout.Sample (every token the model's) or rlcore.agent.Trajectory (a `mask`
        marking the model's tokens among the template's and the tools')."""
        flat = [(g, p, s) for g, (p, group) in enumerate(zip(prompts, samples)) for s in group]
        T = max(1, max(len(s.token_ids) for _, _, s in flat))
        ids = torch.zeros(len(flat), T, dtype=torch.long)
        logps = torch.zeros(len(flat), T)
        mask = torch.zeros(len(flat), T)
        for i, (_, _, s) in enumerate(flat):
            n = len(s.token_ids)
            ids[i, :n] = torch.tensor(s.token_ids, dtype=torch.long)
            logps[i, :n] = torch.tensor(s.logprobs)
            trained = getattr(s, "mask", None)
            mask[i, :n] = 1.0 if trained is None else torch.tensor(trained, dtype=torch.float32)
        return RolloutBatch(
            prompt_ids=[p for _, p, _ in flat],
            response_ids=ids,
            mask=mask,
            rollout_logprobs=logps,
            group_ids=torch.tensor([g for g, _, _ in flat], dtype=torch.long),
            is_truncated=torch.tensor([s.finish_reason == "length" for _, _, s in flat]),
            routing=None if any(s.routing is None for _, _, s in flat) else [s.routing for _, _, s in flat],
            lengths=torch.tensor([len(s.token_ids) for _, _, s in flat], dtype=torch.long),
        )


@dataclass(frozen=True)
class StepRewards:
    """Process-reward steps of a rollout, padded to S = the most steps of any sample."""

    rewards: Tensor
    """(B, S) float, the step scores times the prm term's weight."""
    ends: Tensor
    """(B, S) long, the response-token index of each step's last token."""
    mask: Tensor
    """(B, S) float, 1 on real steps."""

    @staticmethod
    def from_lists(steps: list[tuple[list[float], list[int]]]) -> "StepRewards":
        """steps: per sample, (step scores, step-end token indices) of equal length."""
        S = max(1, max(len(r) for r, _ in steps))
        rewards, ends, mask = torch.zeros(len(steps), S), torch.zeros(len(steps), S, dtype=torch.long), \
            torch.zeros(len(steps), S)
        for i, (r, e) in enumerate(steps):
            if len(r) != len(e):
                raise ValueError(f"sample {i}: {len(r)} step scores but {len(e)} step ends")
            rewards[i, :len(r)], ends[i, :len(e)], mask[i, :len(r)] = torch.tensor(r), torch.tensor(e), 1.0
        return StepRewards(rewards, ends, mask)


@dataclass(frozen=True)
class TrainBatch:
    """Everything the update needs, all (B, T) float over response tokens unless noted."""

    prompt_ids: list[list[int]]
    response_ids: Tensor
    """(B, T) long."""
    mask: Tensor
    """Trained tokens (module docstring)."""
    old_logprobs: Tensor | None
    """None when the update is exactly on-policy: the update's own log-probs, detached, are then
    bitwise the old ones, and the separate forward is skipped (Actor.update returns them)."""
    ref_logprobs: Tensor | None
    advantages: Tensor
    is_weights: Tensor | None = None
    """Truncated importance weights against the rollout engine (algo.rollout_correction), or None."""
    nll_mask: Tensor | None = None
    """(B, T) mask of the tokens of positively rewarded samples, for VAPO's NLL loss, or None."""
    routing: list[Tensor] | None = None
    """MoE: the rollout's expert ids per sample (RolloutBatch.routing), replayed when
    algo.routing_replay is on and compared with the training forward's own routing."""
    lengths: Tensor | None = None
    """(B,) long, real response tokens per row (RolloutBatch.lengths); None: response_lengths(mask)."""

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def real_lengths(self) -> Tensor:
        """(B,) long real response tokens per row."""
        return response_lengths(self.mask) if self.lengths is None else self.lengths

    def select(self, idx: list[int]) -> "TrainBatch":
        """Rows `idx`, with T trimmed to the longest selected response (real tokens, not just trained)."""
        index = torch.tensor(idx, dtype=torch.long)
        T = max(1, int(self.real_lengths()[index].max().item()))
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[index] if v.dim() == 1 else v[index, :T]  # None fields stay None
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx]
            else:
                out[f.name] = v
        return replace(self, **out)


def split_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy micro-batches of row indices whose padded size (rows x longest) fits max_tokens.

    Rows are visited longest first so similar lengths share a micro-batch (less padding).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if current and new_longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def response_lengths(mask: Tensor) -> Tensor:
    """(B,) long: one past each row's last token with mask 1 (0 for a row without one).

    For batches that do not carry their real lengths. Tokens after a row's last trained token affect
    no trained token (attention is causal), so ending the row there changes no log-prob or value.
    """
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.ne(0) * positions).amax(-1) if mask.shape[1] else torch.zeros(mask.shape[0], dtype=torch.long)


def balance_by_tokens(lengths: list[int], max_tokens: int, num_parts: int | None = None) -> list[list[int]]:
    """Micro-batches of row indices for packed forwards (no padding: a part costs the sum of its lengths).

    The fewest parts whose token sums fit max_tokens (at least num_parts when given), the tokens spread
    evenly: rows longest first, each onto the part with the fewest tokens so far (LPT scheduling, within
    4/3 of the best possible largest part). A row longer than max_tokens gets a part of its own.
    """
    if not lengths:
        return []
    count = max(num_parts or 1, math.ceil(sum(lengths) / max_tokens))
    while True:
        parts = _lpt(lengths, min(count, len(lengths)))
        largest = max(sum(lengths[i] for i in p) for p in parts)
        if largest <= max_tokens or count >= len(lengths):
            return parts
        count += 1


def _lpt(lengths: list[int], count: int) -> list[list[int]]:
    """count parts, longest-processing-time-first; rows in ascending index order within a part."""
    heap = [(0, k) for k in range(count)]  # (tokens so far, part)
    parts: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        tokens, k = heapq.heappop(heap)
        parts[k].append(i)
        heapq.heappush(heap, (tokens + lengths[i], k))
    return [sorted(p) for p in parts]
