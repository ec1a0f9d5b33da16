"""Advantage estimators: per-sequence scores -> per-token advantages (B, T).

Every entry of ADVANTAGES is called as fn(scores=..., group_ids=..., mask=..., **kwargs), so the
trainer never branches on the estimator name. Estimators on per-token rewards with a different
signature (GAE, REINFORCE++) live unregistered in algos/gae.py.
"""

import torch
from torch import Tensor

from algos.aggregation import last_masked_index
from algos.gae import reinforce_pp_advantages
from algos.registry import ADVANTAGES, register

# A group whose score std is below this is treated as constant and gets advantage exactly 0.
# Guards fractional rewards: a 1-ulp mean error divided by std + eps (≈ 1e-6) would otherwise give
# spurious |A| ≈ 0.01-0.06 (spec §2.1). Rewards live on an O(1) scale, so 1e-6 is far below any
# real spread.
CONSTANT_STD_TOL = 1e-6


def _group_stats(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group mean, unbiased group std and group size, each (B,), in float64.

    Vectorised with index_add (no Python loop over groups). group_ids may be any integers:
    torch.unique maps them to 0..num_groups-1 first.
    """
    unique_ids, inverse = torch.unique(group_ids, return_inverse=True)  # inverse (B,) in 0..num_groups-1
    num_groups = unique_ids.numel()
    # float64: G identical float32 rewards sum exactly in float64 and divide back to the same value,
    # so a constant float32 group has deviation exactly 0; CONSTANT_STD_TOL covers float64 inputs.
    x = scores.to(torch.float64)
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=scores.device)
    count = zeros.index_add(0, inverse, torch.ones_like(x))  # (num_groups,)
    mean = zeros.index_add(0, inverse, x) / count
    sq_dev = (x - mean[inverse]).square()  # (B,)
    # Unbiased (N−1) like torch.std in verl/TRL; singletons are zeroed by the caller, clamp avoids 0/0.
    var = zeros.index_add(0, inverse, sq_dev) / (count - 1).clamp(min=1)
    return mean[inverse], var.sqrt()[inverse], count[inverse]


@register(ADVANTAGES, "grpo")
def grpo_advantages(scores: Tensor, group_ids: Tensor, mask: Tensor, *, eps: float = 1e-6,
                    norm_by_std: bool = True) -> Tensor:
    """GRPO outcome advantage (DeepSeekMath, arXiv 2402.03300 §4.1.2): Â_{i,t} = (r_i − mean(r)) / (std(r) + ε).

    scores (B,) float or int, group_ids (B,) int (same id = same prompt; any values, any order),
    mask (B, T) -> advantages (B, T), the sequence's advantage on every masked-in token, 0 elsewhere.
    std is unbiased (N−1) as in verl/TRL. Differs from verl `compute_grpo_outcome_advantage`:
    a single-sample group gets 0 (verl: r/(1 + ε)), and a constant group (std < CONSTANT_STD_TOL)
    gets exactly 0, also for fractional rewards. norm_by_std=False is Dr.GRPO (arXiv 2503.20783):
    Â = r − mean(r), removing the question-difficulty bias of dividing by std.
    """
    mean, std, count = _group_stats(scores, group_ids)  # each (B,)
    adv = scores.to(torch.float64) - mean
    if norm_by_std:
        adv = adv / (std + eps)
    # A lone sample or a constant group carries no learning signal: return an exact 0.
    adv = torch.where((count > 1) & (std >= CONSTANT_STD_TOL), adv, torch.zeros_like(adv))
    out_dtype = torch.promote_types(scores.dtype, torch.float32)  # int / bf16 scores -> float32
    return adv.to(out_dtype).unsqueeze(-1) * mask.to(out_dtype)  # (B, 1) * (B, T) -> (B, T)


@register(ADVANTAGES, "drgrpo")
def drgrpo_advantages(scores: Tensor, group_ids: Tensor, mask: Tensor) -> Tensor:
    """Dr.GRPO advantage (arXiv 2503.20783): Â_{i,t} = r_i − mean(r), no division by std.

    scores (B,), group_ids (B,), mask (B, T) -> advantages (B, T). Same as
    grpo_advantages(norm_by_std=False); a registered name so a recipe can choose it directly.
    """
    return grpo_advantages(scores, group_ids, mask, norm_by_std=False)


@register(ADVANTAGES, "rloo")
def rloo_advantages(scores: Tensor, group_ids: Tensor, mask: Tensor) -> Tensor:
    """RLOO advantage (Kool et al. 2019; Ahmadian et al., arXiv 2402.14740): leave-one-out baseline

        Â_{i,t} = r_i − 1/(G−1) Σ_{j≠i} r_j  =  G/(G−1) · (r_i − mean(r))

    scores (B,), group_ids (B,), mask (B, T) -> advantages (B, T). Differs from GRPO by using the
    mean of the OTHER samples as baseline (so the baseline is independent of r_i and the estimator
    unbiased) and by not dividing by std; it is Dr.GRPO scaled by G/(G−1), group by group.
    Same group rules as grpo_advantages: a single-sample group gets 0, a constant group
    (std < CONSTANT_STD_TOL) an exact 0. Differs from verl `compute_rloo_outcome_advantage`,
    which leaves a singleton's raw score r_i as its advantage.
    """
    mean, std, count = _group_stats(scores, group_ids)  # each (B,), float64
    adv = count / (count - 1).clamp(min=1) * (scores.to(torch.float64) - mean)
    adv = torch.where((count > 1) & (std >= CONSTANT_STD_TOL), adv, torch.zeros_like(adv))
    out_dtype = torch.promote_types(scores.dtype, torch.float32)
    return adv.to(out_dtype).unsqueeze(-1) * mask.to(out_dtype)  # (B, 1) * (B, T) -> (B, T)


@register(ADVANTAGES, "reinforce_pp")
def reinforce_pp_outcome_advantages(scores: Tensor, group_ids: Tensor, mask: Tensor) -> Tensor:
    """REINFORCE++ (Hu, arXiv 2501.03262) on outcome scores, in the group estimators' signature.

    scores (B,), group_ids (B,) unused, mask (B, T) -> advantages (B, T). Each score goes on its
    sample's last masked-in token (last_masked_index: with tool turns, the last one the policy
    sampled); the return-to-go with γ = 1 is then the score on every token, and it is whitened
    over the whole batch (masked_whiten): the batch-wide normalisation replaces GRPO's group
    baseline, which is why group_ids is ignored. Differs from the paper by leaving out its
    per-token KL penalty in the reward: use algo.kl as a loss here, or call
    reinforce_pp_advantages with your own token rewards.
    """
    lengths = mask.sum(-1).long()
    token_rewards = torch.zeros(mask.shape, dtype=torch.promote_types(scores.dtype, torch.float32),
                                device=mask.device)
    rows = torch.arange(len(scores), device=mask.device)
    token_rewards[rows, last_masked_index(mask)] = scores.to(token_rewards.dtype) * (lengths > 0)
    return reinforce_pp_advantages(token_rewards, mask, gamma=1.0)
