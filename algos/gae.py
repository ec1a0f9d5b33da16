"""Token-reward estimators: GAE (PPO / VAPO), REINFORCE++ returns, and VAPO's length-adaptive λ.

These take per-token rewards (B, T) rather than per-sequence scores, GAE also takes critic values
and returns a pair, so they do not share the ADVANTAGES calling convention
fn(scores=, group_ids=, mask=) and are deliberately NOT registered there: registering them would
break "one uniform signature per axis" (STYLE.md §4.4). They are building blocks the trainer's
critic path composes (GAE -> masked_whiten for the policy, returns for the critic; VAPO runs GAE
twice with different λ).

Masked positions (padding, or tool-observation tokens inside a response) are SKIPPED by the
backward recursions (spec §1.3, verl HEAD): they neither discount nor contribute, a reward placed
on them is ignored, and the next valid token's value/advantage is carried across them.
"""

import torch
from torch import Tensor

from algos.aggregation import masked_whiten


@torch.no_grad()
def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float,
        lam: float | Tensor) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438 eq. 16), spec §1.3:

        δ_t = r_t + γ·V_next − V_t ;   A_t = δ_t + γλ·A_next ;   R_t = A_t + V_t
        (t runs backwards over masked-in tokens only; V_next = A_next = 0 after the last one)

    token_rewards, values, mask: (B, T); lam: float or (B,) tensor (VAPO's per-sequence λ, see
    length_adaptive_lambda) -> advantages (B, T), returns (B, T), both 0 where mask = 0.
    V[b, t] is the value of the state before token t (spec §0). Returns are the critic targets and
    are built from the RAW advantages; whitening is the caller's job (masked_whiten over the batch),
    so one call serves VAPO's decoupled GAE (λ_policy for A, λ = 1 for R). No gradient flows.

    Differs from verl `compute_gae_advantage_return`: no whitening inside; masked positions are 0 in
    both outputs (verl carries A_next into them, and its whitening then makes them non-zero).
    The masked-in values and advantages equal verl HEAD's (same skip rule).
    """
    is_valid = mask.bool()
    dtype = torch.promote_types(token_rewards.dtype, values.dtype)
    r, v = token_rewards.to(dtype), values.to(dtype)
    B, T = r.shape
    lam = torch.as_tensor(lam, dtype=dtype, device=r.device)
    if lam.shape not in ((), (B,)):
        raise ValueError(f"lam must be a float or a (B,) = ({B},) tensor, got shape {tuple(lam.shape)}")
    gamma_lam = gamma * lam  # () or (B,), broadcasts against the (B,) state below

    next_value = r.new_zeros(B)
    next_adv = r.new_zeros(B)
    advs = []
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma_lam * next_adv
        # Skip masked tokens: the state (V_next, A_next) passes through them unchanged.
        valid = is_valid[:, t]
        next_value = torch.where(valid, v[:, t], next_value)
        next_adv = torch.where(valid, adv_t, next_adv)
        advs.append(torch.where(valid, adv_t, 0.0))
    advantages = torch.stack(advs[::-1], dim=1)  # (B, T)
    returns = torch.where(is_valid, advantages + v, 0.0)
    return advantages, returns


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, *, gamma: float) -> Tensor:
    """REINFORCE++ (Hu, arXiv 2501.03262): discounted return-to-go, whitened over the whole batch.

        G_t = Σ_{k ≥ t, masked-in} γ^{n(t,k)} r_k,  n(t,k) = #masked-in tokens in [t, k) ;  Â = whiten(G)·mask

    token_rewards, mask: (B, T) -> advantages (B, T), 0 where mask = 0. Differs from vanilla
    REINFORCE by the batch-wide normalisation in place of a learned or group baseline (the
    paper's KL-in-reward term is the caller's: put −β·k1 into token_rewards). Equals
    gae(r, V = 0, λ = 1) followed by masked_whiten, which is how it is computed.
    Raises ValueError if the batch has ≤ 1 masked-in token (whitening needs 2).

    Differs from verl `compute_reinforce_plus_plus_outcome_advantage` on masked positions inside a
    response: verl RESETS the running return there (tokens before a tool observation never see the
    rewards after it), this skips them like GAE does. Identical for right-padded data. verl also
    returns the raw returns; nothing consumes them without a critic, so only Â is returned.
    """
    # With V = 0 and λ = 1, δ_t = r_t and A_t = r_t + γ·A_next: the GAE advantage IS the return-to-go.
    returns_to_go, _ = gae(token_rewards, torch.zeros_like(token_rewards), mask, gamma=gamma, lam=1.0)
    return masked_whiten(returns_to_go, mask)


def length_adaptive_lambda(lengths: Tensor, *, alpha: float) -> Tensor:
    """VAPO length-adaptive GAE λ (arXiv 2504.05118, spec §4.3): λ_b = 1 − 1/(α·l_b), clamped to [0, 1).

    lengths (B,) int or float (response lengths L_b) -> λ (B,) float32 (float64 if lengths are).
    Derived from asking Σ_t λ^t = 1/(1 − λ) = α·l, so the effective horizon grows with the length
    (α = 0.05: l = 100 -> 0.8, 1000 -> 0.98). Pass the result as gae(..., lam=λ) for the POLICY
    advantages only; the critic's returns use λ = 1 (decoupled GAE).

    Clamp: α·l ≤ 1 (l ≤ 20 at α = 0.05, including empty rows) gives λ ≤ 0, raised to exactly 0
    (one-step TD). The upper end is the largest float below 1 in the output dtype
    (1 − 2^-24 ≈ 1 − 5.96e-8 for float32): the formula is < 1 for every finite l, but in float32 it
    would round to exactly 1.0 once α·l > 2^24, and this keeps λ strictly below 1 anyway.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    out_dtype = lengths.dtype if lengths.dtype == torch.float64 else torch.float32
    lam = 1.0 - 1.0 / (alpha * lengths.to(torch.float64))  # l = 0 -> −inf -> clamped to 0
    below_one = torch.nextafter(torch.tensor(1.0, dtype=out_dtype), torch.tensor(0.0, dtype=out_dtype))
    return lam.clamp(min=0.0).to(out_dtype).clamp(max=below_one.item())
