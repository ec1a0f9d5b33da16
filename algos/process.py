"""Process supervision: step-level rewards (from a process reward model) -> token rewards / advantages.

A response with K steps has step rewards r^{(1..K)}; step j ends at response token index end_j.
Padded to S steps per sample: step_rewards (B, S) float, step_ends (B, S) long, step_mask (B, S)
(1 on real steps). Both functions are unregistered: their inputs are steps, not the group
estimators' per-sequence scores (see algos/__init__.py).
"""

import torch
from torch import Tensor

from algos.advantages import CONSTANT_STD_TOL


def step_token_rewards(step_rewards: Tensor, step_ends: Tensor, step_mask: Tensor, mask: Tensor) -> Tensor:
    """Each step's reward on its last token (PPO with a PRM, spec §6): r[b, end_j] += r^{(j)}.

    step_rewards (B, S), step_ends (B, S) long, step_mask (B, S), mask (B, T) -> token rewards (B, T),
    0 on tokens that end no step. Steps sharing an end token add up; a step whose end lies outside
    its response (end < 0, end >= T or on a masked-out token) raises, since it would misplace credit.
    """
    real = step_mask.bool()
    ends = torch.where(real, step_ends, torch.zeros_like(step_ends)).long()  # (B, S); padding -> token 0
    T = mask.shape[1]
    if real.any():
        bad = real & ((step_ends < 0) | (step_ends >= T))
        if not bad.any():
            bad = real & (mask.gather(1, ends) == 0)
        if bad.any():
            b, s = bad.nonzero()[0].tolist()
            raise ValueError(f"step {s} of sample {b} ends at token {int(step_ends[b, s])}, outside its response")
    dtype = torch.promote_types(step_rewards.dtype, torch.float32)
    values = torch.where(real, step_rewards.to(dtype), torch.zeros((), dtype=dtype))
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).scatter_add(1, ends, values)


def grpo_process_advantages(step_rewards: Tensor, step_ends: Tensor, step_mask: Tensor, group_ids: Tensor,
                            mask: Tensor, *, eps: float = 1e-6) -> Tensor:
    """GRPO process supervision (DeepSeekMath, arXiv 2402.03300 §4.1.3; spec §2.2):

        r̃_i^{(j)} = (r_i^{(j)} − mean(R)) / (std(R) + ε),   R = every step reward of every sample in the group
        Â_{i,t} = Σ_{j : end_j ≥ t} r̃_i^{(j)}

    step_rewards (B, S), step_ends (B, S) long response-token indices, step_mask (B, S),
    group_ids (B,) (same id = same prompt), mask (B, T) -> advantages (B, T).
    Implementation: r̃ on each step's last token, then a reverse cumulative sum, times the mask, so
    tokens after a sample's last step get 0. std is unbiased (N−1) as for outcome GRPO. Differs from
    the paper, which leaves these cases open: a group with fewer than two steps in all, or whose step
    rewards are all equal (std < CONSTANT_STD_TOL), gets exactly 0 — no signal, and no ulp noise
    divided by ε. With one step per sample ending on its last token this is grpo_advantages.
    """
    real = step_mask.bool()
    x = step_rewards.to(torch.float64)
    _, inverse = torch.unique(group_ids, return_inverse=True)  # (B,) group index 0..num_groups-1
    step_group = inverse[:, None].expand_as(x)[real]  # (N,) group of each real step
    values = x[real]  # (N,)
    zeros = torch.zeros(int(inverse.max()) + 1 if len(inverse) else 0, dtype=torch.float64, device=x.device)
    count = zeros.index_add(0, step_group, torch.ones_like(values))
    mean = zeros.index_add(0, step_group, values) / count.clamp(min=1)
    var = zeros.index_add(0, step_group, (values - mean[step_group]).square()) / (count - 1).clamp(min=1)
    std = var.sqrt()
    has_signal = (count > 1) & (std >= CONSTANT_STD_TOL)  # (num_groups,)
    normed = torch.where(has_signal[step_group], (values - mean[step_group]) / (std[step_group] + eps),
                         torch.zeros_like(values))
    scaled = torch.zeros_like(x)
    scaled[real] = normed
    token_rewards = step_token_rewards(scaled, step_ends, step_mask, mask)  # (B, T) float64
    # Reverse cumulative sum: each token gets the sum over the steps ending at or after it.
    advantages = token_rewards.flip(-1).cumsum(-1).flip(-1)
    out_dtype = torch.promote_types(step_rewards.dtype, torch.float32)
    return advantages.to(out_dtype) * mask.to(out_dtype)
