"""Rollout–training mismatch correction (spec §5.2): truncated importance sampling (TIS) weights.

The rollout engine μ (vLLM) and the training engine π_old give the same tokens different
log-probs, so nominally on-policy PPO/GRPO is off-policy. The weights below multiply the per-token
policy loss (policy_loss(..., is_weights=w)); rollout_mismatch_metrics says how large the gap is.
"""

import torch
from torch import Tensor

from algos.aggregation import masked_mean

LEVELS = ("token", "sequence")


@torch.no_grad()
def truncated_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, cap: float,
                         level: str = "token") -> Tensor:
    """Truncated IS weights π_old/μ (Yao, Liu et al. 2025, "Your Efficient RL Framework Secretly Brings
    You Off-Policy RL Training"; spec §5.2):

        token:     w_t = min(exp(clamp(old_logp_t − rollout_logp_t, −20, 20)), C)
        sequence:  w_b = min(exp(clamp(Σ_t m·(old_logp_t − rollout_logp_t), −20, 20)), C), broadcast over t

    old_logprobs (training engine, before the update), rollout_logprobs (the engine's, of the actual
    sampling distribution), mask: (B, T) -> weights (B, T), detached, 0 where mask = 0. C = cap.
    Differs from plain IS by the upper truncation at C (bias traded for bounded variance); the ±20
    clamp only keeps exp finite (verl). Sequence level is the unbiased weight for a sequence-level
    objective but far more often truncated on long responses. Same as verl
    `compute_rollout_correction_weights` with rollout_is_batch_normalize=False.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    if level not in LEVELS:
        raise ValueError(f"unknown IS level {level!r}; valid: {list(LEVELS)}")
    is_valid = mask.bool()
    # Padding may hold garbage log-probs: select (not multiply) so inf/NaN there cannot leak in.
    log_ratio = torch.where(is_valid, old_logprobs - rollout_logprobs, 0.0)  # (B, T)
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)  # (B, 1) -> (B, T)
    weights = torch.exp(log_ratio.clamp(-20.0, 20.0)).clamp(max=cap)
    return torch.where(is_valid, weights, 0.0)


@torch.no_grad()
def rollout_mismatch_metrics(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                             weights: Tensor) -> dict[str, float]:
    """Train–rollout mismatch statistics over masked-in tokens, as python floats (one device sync).

    old_logprobs, rollout_logprobs, mask, weights (from truncated_is_weights): (B, T) -> dict:
    "abs_logprob_diff_mean", "abs_logprob_diff_max" = mean / max of |old_logp − rollout_logp|;
    "kl_k1" = mean of rollout_logp − old_logp, the k1 estimate of KL(μ‖π_old) (tokens are sampled
    from μ); "is_weight_mean", "is_weight_min", "is_weight_max" of the weights. Max and min of an
    empty mask are reported as 0.
    """
    is_valid = mask.bool()
    diff = torch.where(is_valid, old_logprobs - rollout_logprobs, 0.0)
    w = torch.where(is_valid, weights, 0.0)
    has_any = is_valid.any()
    stats = torch.stack([
        masked_mean(diff.abs(), is_valid),
        diff.abs().amax(),  # |Δ| ≥ 0, so the 0 fill never wins over a real token
        masked_mean(-diff, is_valid),
        masked_mean(w, is_valid),
        torch.where(has_any, torch.where(is_valid, w, torch.inf).amin(), 0.0),
        w.amax(),  # weights ≥ 0, same argument as above
    ]).tolist()
    keys = ("abs_logprob_diff_mean", "abs_logprob_diff_max", "kl_k1", "is_weight_mean", "is_weight_min",
            "is_weight_max")
    return dict(zip(keys, stats))
