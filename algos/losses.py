"""Policy losses (per token, then aggregated) and the entropy used for the entropy bonus.

Every entry of POLICY_LOSSES is called as
fn(logprobs=..., old_logprobs=..., advantages=..., mask=..., **kwargs) -> (loss, metrics), where
loss is a scalar tensor to back-propagate and metrics a dict of detached python floats.
"""

import torch
from torch import Tensor

from algos.aggregation import Count, aggregate, masked_mean
from algos.registry import POLICY_LOSSES, register


@register(POLICY_LOSSES, "vanilla")
def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                agg: str = "token-mean", num_tokens: Count = None, num_seqs: Count = None,
                norm_len: Count = None) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347 eq. 7), written as a loss to minimise:

        ρ = exp(clamp(logp − old_logp, −20, 20))
        L = max(−A·ρ, −A·clamp(ρ, 1 − clip_low, 1 + clip_high))            (spec §1.4)
        dual-clip, only where A < 0:  L = min(L, −c·A),  c = dual_clip > 1

    logprobs, old_logprobs, advantages, mask: (B, T) -> (loss scalar, metrics).
    Differs from vanilla PPO in two optional knobs: decoupled bounds (clip_high > clip_low is
    DAPO's clip-higher, arXiv 2503.14476) and dual-clip (Ye et al. 2019, arXiv 1912.09729), which
    caps the loss of a negative-advantage token whose ratio has exploded. The log-ratio clamp keeps
    exp finite (verl). Aggregated by `aggregate(loss_tok, mask, agg, num_tokens=, num_seqs=,
    norm_len=)`; pass global counts when the batch is split (see algos/aggregation.py).

    metrics (local masked means, not scaled by global counts): "clipfrac" = frac of tokens where the
    ratio clip binds, "approx_kl" = mean(old_logp − logp) (clamped log-ratio, as verl's ppo_kl),
    "clipfrac_lower" = frac where dual-clip binds (0 when off).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual_clip}); use None to disable dual-clip")
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # max of the two losses = min of the two objectives: the pessimistic bound of PPO.
    loss_tok = torch.maximum(loss_unclipped, loss_clipped)  # (B, T)

    if dual_clip is None:
        is_dual_clipped = torch.zeros_like(loss_tok, dtype=torch.bool)
    else:
        # For A < 0 the clipped loss −A·ρ grows without bound in ρ; cap it at −c·A (A ≥ 0 untouched).
        loss_cap = -advantages * dual_clip
        is_neg = advantages < 0
        is_dual_clipped = is_neg & (loss_tok > loss_cap)
        loss_tok = torch.where(is_neg, torch.minimum(loss_tok, loss_cap), loss_tok)

    loss = aggregate(loss_tok, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)

    with torch.no_grad():
        stats = torch.stack([
            masked_mean((loss_clipped > loss_unclipped).to(loss_tok.dtype), mask),
            masked_mean(-log_ratio, mask),
            masked_mean(is_dual_clipped.to(loss_tok.dtype), mask),
        ]).tolist()  # one device sync for all three
    return loss, dict(zip(("clipfrac", "approx_kl", "clipfrac_lower"), stats))


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: H = logsumexp(z) − Σ_v softmax(z)_v · z_v (spec §1.6).

    logits (B, T, V) -> entropy (B, T) (any leading shape). The caller divides logits by the
    sampling temperature first. This form needs no log of a tiny probability, so it stays finite
    where −Σ p·log p would hit 0·log 0.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
