"""Critic loss for PPO / VAPO (spec §1.5): clipped value regression onto the GAE returns."""

import torch
from torch import Tensor

from algos.aggregation import Count, aggregate, masked_mean


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float,
               agg: str = "token-mean", num_tokens: Count = None, num_seqs: Count = None,
               norm_len: Count = None) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss (PPO2 baselines; spec §1.5, §8.2.7), to minimise:

        v_clip = clamp(v, v_old − c, v_old + c)
        L_V    = 0.5 · agg( max((v − R)², (v_clip − R)²) )

    values (current critic predictions), old_values (predictions at rollout time), returns
    (GAE targets R = A + V, see algos.gae.gae), mask: (B, T) -> (loss scalar, metrics).
    Differs from plain MSE regression by the pessimistic max with a prediction clipped around the
    OLD value, so one update cannot move V by more than c where that would look better; where the
    clipped term wins, the gradient is 0. Aggregated like the policy loss (pass global counts when
    the batch is split, see algos/aggregation.py). Same as verl `compute_value_loss`.

    metrics (local masked means, python floats): "vf_clipfrac" = frac of tokens where the clipped
    term is larger; "value_mean" = mean prediction; "vf_explained_var" = 1 − Var(R − v)/Var(R)
    (population variances, + 1e-8; 1 = perfect critic, ≤ 0 = no better than predicting the mean).
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    values_clipped = values.clamp(old_values - clip, old_values + clip)  # tensor bounds, per token
    loss_unclipped = (values - returns).square()
    loss_clipped = (values_clipped - returns).square()
    loss_tok = torch.maximum(loss_unclipped, loss_clipped)  # (B, T)
    loss = 0.5 * aggregate(loss_tok, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)

    with torch.no_grad():
        err = returns - values
        var_returns = masked_mean((returns - masked_mean(returns, mask)).square(), mask)
        var_err = masked_mean((err - masked_mean(err, mask)).square(), mask)
        stats = torch.stack([
            masked_mean((loss_clipped > loss_unclipped).to(loss_tok.dtype), mask),
            masked_mean(values, mask),
            1.0 - var_err / (var_returns + 1e-8),
        ]).tolist()  # one device sync
    return loss, dict(zip(("vf_clipfrac", "value_mean", "vf_explained_var"), stats))
