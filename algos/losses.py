"""Policy losses (per token, then aggregated) and the entropy used for the entropy bonus.

Every entry of POLICY_LOSSES is called as
fn(logprobs=..., old_logprobs=..., advantages=..., mask=..., **kwargs) -> (loss, metrics), where
loss is a scalar tensor to back-propagate and metrics a dict of detached python floats.
"""

import torch
from torch import Tensor

from algos.aggregation import Count, aggregate, masked_mean
from algos.registry import POLICY_LOSSES, register

RATIO_LEVELS = ("token", "sequence")


def _ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, ratio_level: str) -> tuple[Tensor, Tensor]:
    """The importance ratio multiplying A, and the per-token log-ratio logp − old_logp for metrics.

    token:    ρ_t = exp(clamp(logp_t − old_logp_t, −20, 20))  (verl vanilla)
    sequence: GSPO-token, ρ_t = sg[s_b]·π_θ(y_t)/sg[π_θ(y_t)], s_b = exp(masked mean_t of (logp − old_logp)).
              Its value is s_b on every token of sequence b, its gradient s_b·∇logp_t (s_b is a
              constant), so with per-sequence A it is exactly GSPO's s_b·A·(1/|o_b|)Σ_t ∇logp_t
              under seq-mean-token-mean. log ρ is clamped at max 10 only, and the token
              log-ratios are not clamped (verl `gspo`).
    logprobs, old_logprobs, mask: (B, T) -> ratio (B, T), log_ratio (B, T).
    """
    if ratio_level == "token":
        log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
        return torch.exp(log_ratio), log_ratio
    is_valid = mask.bool()
    # Padding may hold garbage log-probs: select (not multiply) so inf/NaN there cannot leak into s_b.
    log_ratio = torch.where(is_valid, logprobs - old_logprobs, 0.0)  # (B, T)
    log_s = log_ratio.sum(-1) / is_valid.sum(-1).clamp(min=1)  # (B,) length-normalised; empty row -> s = 1
    # logp − sg(logp) is 0 in value and carries ∇logp_t: the GSPO-token straight-through form.
    log_ratio_tok = (logprobs - logprobs.detach() + log_s.detach().unsqueeze(-1)).clamp(max=10.0)  # (B, T)
    return torch.exp(log_ratio_tok), log_ratio


@register(POLICY_LOSSES, "vanilla")
def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                ratio_level: str = "token", is_weights: Tensor | None = None,
                agg: str = "token-mean", num_tokens: Count = None, num_seqs: Count = None,
                norm_len: Count = None) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347 eq. 7), written as a loss to minimise:

        ρ = exp(clamp(logp − old_logp, −20, 20))
        L = max(−A·ρ, −A·clamp(ρ, 1 − clip_low, 1 + clip_high))            (spec §1.4)
        dual-clip, only where A < 0:  L = min(L, −c·A),  c = dual_clip > 1
        TIS, if given:  L ← w·L  (w = truncated_is_weights, detached; spec §5.2)

    logprobs, old_logprobs, advantages, mask, is_weights: (B, T) -> (loss scalar, metrics).
    Differs from vanilla PPO in optional knobs: decoupled bounds (clip_high > clip_low is
    DAPO's clip-higher, arXiv 2503.14476), dual-clip (Ye et al. 2019, arXiv 1912.09729), which
    caps the loss of a negative-advantage token whose ratio has exploded, a sequence-level ratio
    (ratio_level="sequence" is GSPO, see gspo_loss) and rollout-mismatch IS weights (verl's
    rollout_is_weights). The log-ratio clamp keeps exp finite (verl). Aggregated by
    `aggregate(loss_tok, mask, agg, num_tokens=, num_seqs=, norm_len=)`; pass global counts when
    the batch is split (see algos/aggregation.py).

    metrics (local masked means, not scaled by global counts): "clipfrac" = frac of tokens where the
    ratio clip binds, "approx_kl" = mean(old_logp − logp) (clamped log-ratio at token level, as
    verl's ppo_kl; unclamped at sequence level, as verl's gspo), "clipfrac_lower" = frac where
    dual-clip binds (0 when off). Metrics ignore is_weights.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual_clip}); use None to disable dual-clip")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; valid: {list(RATIO_LEVELS)}")
    ratio, log_ratio = _ratio(logprobs, old_logprobs, mask, ratio_level)  # (B, T) each
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

    if is_weights is not None:
        loss_tok = loss_tok * is_weights.detach()  # a constant per token: rescales the gradient only

    loss = aggregate(loss_tok, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)

    with torch.no_grad():
        stats = torch.stack([
            masked_mean((loss_clipped > loss_unclipped).to(loss_tok.dtype), mask),
            masked_mean(-log_ratio, mask),
            masked_mean(is_dual_clipped.to(loss_tok.dtype), mask),
        ]).tolist()  # one device sync for all three
    return loss, dict(zip(("clipfrac", "approx_kl", "clipfrac_lower"), stats))


@register(POLICY_LOSSES, "gspo")
def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              agg: str = "seq-mean-token-mean", **kwargs) -> tuple[Tensor, dict[str, float]]:
    """GSPO (Zheng et al., arXiv 2507.18071; in its GSPO-token form), spec §5.1:

        s_b = (π_θ(o_b)/π_old(o_b))^{1/|o_b|} = exp(1/|o_b| Σ_t (logp_t − old_logp_t))
        L   = max(−A·s, −A·clamp(s, 1 − clip_low, 1 + clip_high)) on every token of sequence b

    policy_loss(..., ratio_level="sequence"); same arguments and metrics. Differs from PPO/GRPO by
    one length-normalised ratio per sequence instead of noisy per-token ratios, so a whole response
    is clipped or kept together (paper: clip_low 3e-4, clip_high 4e-4). The GSPO-token form accepts
    per-token advantages and equals GSPO when A is constant over each sequence.

    Aggregation: verl forces seq-mean-token-mean for gspo whatever loss_agg_mode says. Here `agg`
    is honoured, because aggregation is its own recipe axis and must keep its global counts
    (micro-batch invariance); the default seq-mean-token-mean is the paper's 1/G Σ_i objective, so
    a GSPO recipe should set it. Also unlike verl's gspo (which has no dual-clip), dual_clip
    applies if passed; is_weights apply as in verl.
    """
    return policy_loss(logprobs, old_logprobs, advantages, mask, ratio_level="sequence", agg=agg, **kwargs)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: H = logsumexp(z) − Σ_v softmax(z)_v · z_v (spec §1.6).

    logits (B, T, V) -> entropy (B, T) (any leading shape). The caller divides logits by the
    sampling temperature first. This form needs no log of a tiny probability, so it stays finite
    where −Σ p·log p would hit 0·log 0.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
