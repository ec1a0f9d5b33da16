"""Per-token KL estimators between the policy and the reference policy (spec §1.2).

Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html, with
d = logp − ref_logp sampled from the policy. Used either as a penalty in the reward (k1, PPO /
InstructGPT style) or as a loss term (k3, GRPO style, aggregated like the policy loss); never both.
All functions: logprobs, ref_logprobs (B, T) -> per-token estimate (B, T), NOT masked (the caller
aggregates with the response mask).
"""

import torch
from torch import Tensor

from algos.registry import KL_ESTIMATORS, register


@register(KL_ESTIMATORS, "k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = d = logp − ref_logp: unbiased estimate of KL(π‖π_ref).

    As a loss its expected gradient is 0 (pure noise), so use it in the reward, not in the loss.
    """
    return logprobs - ref_logprobs


@register(KL_ESTIMATORS, "k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = ½ d²: biased value, but its on-policy gradient is the true ∇ KL(π‖π_ref)."""
    return 0.5 * (logprobs - ref_logprobs).square()


@register(KL_ESTIMATORS, "k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = e^u − u − 1, u = ref_logp − logp: GRPO's D_KL (DeepSeekMath, arXiv 2402.03300 eq. 4).

    π_ref/π − log(π_ref/π) − 1 is unbiased and always ≥ 0. Differs from the paper by verl's
    `low_var_kl` clamps: u to ±20 so e^u cannot overflow, the result to ±10 so one token whose
    reference probability collapsed cannot dominate the batch.
    """
    u = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(u) - u - 1.0).clamp(-10.0, 10.0)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate of `kind` ("k1", "k2", "k3"): (B, T), (B, T) -> (B, T).

    Unknown kind -> ValueError listing the valid kinds.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs, ref_logprobs)


def adaptive_kl_coef(coef: float, current_kl: float, *, target: float, horizon: int, num_samples: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019, arXiv 1909.08593 §2.2; spec §1.1):

        e = clip(KL_cur / KL_target − 1, −0.2, 0.2);   β ← β · (1 + e · n / horizon)

    current_kl: batch mean of the per-sequence masked mean of the per-token KL (k1 by default);
    num_samples: n, the number of samples in the step. Same as verl's AdaptiveKLController.update.
    """
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * num_samples / horizon)
