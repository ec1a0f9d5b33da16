"""GAE, masked_whiten, REINFORCE++ and VAPO's length-adaptive λ (spec §1.3, §4, §10): hand values,
mask holes, per-sequence λ, and vectorised-vs-loop equivalence."""

import pytest
import torch

from algos import ADVANTAGES, gae, last_masked_index, length_adaptive_lambda, masked_whiten, reinforce_pp_advantages

TOL = dict(rtol=1e-5, atol=1e-6)


def test_gae_spec_vector():
    # r = [0,0,1], V = [0.5,0.6,0.7], γ = 1, λ = 0.95 (spec §10), backwards:
    #   t=2: δ = 1 + 0 − 0.7 = 0.3,            A = 0.3
    #   t=1: δ = 0 + 0.7 − 0.6 = 0.1,          A = 0.1 + 0.95·0.3   = 0.385
    #   t=0: δ = 0 + 0.6 − 0.5 = 0.1,          A = 0.1 + 0.95·0.385 = 0.46575
    # returns = A + V = [0.96575, 0.985, 1.0].
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3),
                   gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3]]), **TOL)
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0]]), **TOL)


def test_gae_discount_and_padding_is_zero():
    # γ = 0.5, λ = 0.5, r = [0, 2], V = [1, 1], then two padding slots with garbage (V = 9, r = 7):
    #   t=1: δ = 2 + 0 − 1 = 1,                A = 1
    #   t=0: δ = 0 + 0.5·1 − 1 = −0.5,         A = −0.5 + 0.25·1 = −0.25
    # returns [0.75, 2]; padding: advantages and returns exactly 0, and its garbage never enters.
    adv, ret = gae(torch.tensor([[0.0, 2.0, 7.0, 7.0]]), torch.tensor([[1.0, 1.0, 9.0, 9.0]]),
                   torch.tensor([[1, 1, 0, 0]]), gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.25, 1.0, 0.0, 0.0]]), **TOL)
    torch.testing.assert_close(ret, torch.tensor([[0.75, 2.0, 0.0, 0.0]]), **TOL)


def test_gae_skips_mask_hole_inside_response():
    # The spec vector with a tool-observation token (mask 0) inserted at position 1, holding a value
    # of 9 and a reward of 5: both are ignored and V_next / A_next pass through unchanged, so the
    # masked-in positions reproduce [0.46575, ·, 0.385, 0.3] and the hole gets 0 (not discounted).
    adv, ret = gae(torch.tensor([[0.0, 5.0, 0.0, 1.0]]), torch.tensor([[0.5, 9.0, 0.6, 0.7]]),
                   torch.tensor([[1.0, 0.0, 1.0, 1.0]]), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.46575, 0.0, 0.385, 0.3]]), **TOL)
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.0, 0.985, 1.0]]), **TOL)


def test_gae_hole_is_not_a_discount_step():
    # γ = 0.5, λ = 1, V = 0, r = [0, ·, 1] with a hole in the middle: A_0 = 0 + 0.5·1 = 0.5
    # (one discount step across the hole, not 0.25 as if it were a token).
    adv, _ = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.tensor([[1, 0, 1]]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.0, 1.0]]), **TOL)


def test_gae_per_sequence_lambda_equals_rowwise_scalar():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = (torch.arange(T) < torch.tensor([[6], [3], [1], [5]])).float()
    lams = torch.tensor([0.0, 0.5, 0.95, 1.0])
    adv, ret = gae(r, v, mask, gamma=0.9, lam=lams)
    for b in range(B):
        adv_b, ret_b = gae(r[b:b + 1], v[b:b + 1], mask[b:b + 1], gamma=0.9, lam=lams[b].item())
        torch.testing.assert_close(adv[b:b + 1], adv_b, **TOL)
        torch.testing.assert_close(ret[b:b + 1], ret_b, **TOL)


def test_gae_rejects_wrong_lambda_shape():
    with pytest.raises(ValueError, match=r"lam must be a float or a \(B,\)"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=1.0, lam=torch.ones(3))


def test_gae_no_grad_and_dtype():
    v = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    adv, ret = gae(torch.ones(1, 2), v, torch.ones(1, 2), gamma=1.0, lam=1.0)
    assert adv.dtype == torch.float64 and not adv.requires_grad and not ret.requires_grad


def _gae_reference_loop(r, v, mask, gamma, lams):
    """Scalar Python loop, one row and one token at a time, straight from spec §1.3."""
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        v_next = a_next = 0.0
        for t in reversed(range(T)):
            if mask[b, t] == 0:
                continue  # carried through: v_next, a_next unchanged; A_t reported as 0
            delta = r[b, t].item() + gamma * v_next - v[b, t].item()
            a_next = delta + gamma * lams[b] * a_next
            v_next = v[b, t].item()
            adv[b, t] = a_next
    return adv, (adv + v.double()) * mask.double()


@pytest.mark.parametrize("seed", range(4))
def test_gae_vectorised_matches_reference_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 9
    r, v = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()  # holes anywhere, incl. empty-ish rows
    mask[0] = 0.0  # one empty row
    lams = torch.rand(B, generator=g, dtype=torch.float64)
    adv, ret = gae(r, v, mask, gamma=0.97, lam=lams)
    ref_adv, ref_ret = _gae_reference_loop(r, v, mask, 0.97, lams.tolist())
    torch.testing.assert_close(adv, ref_adv, **TOL)
    torch.testing.assert_close(ret, ref_ret, **TOL)


# ---- masked_whiten -------------------------------------------------------------------------------

def test_whiten_spec_vector():
    # A = [0.46575, 0.385, 0.3]: μ = 0.383583, Σ(x−μ)² = 0.0137396, σ² = 0.0137396/2 = 0.0068698 (unbiased),
    # σ = 0.0828843: [0.082167, 0.001417, −0.083583]/σ = [0.991344, 0.017092, −1.008436] (spec §10).
    out = masked_whiten(torch.tensor([[0.46575, 0.385, 0.3]]), torch.ones(1, 3))
    torch.testing.assert_close(out, torch.tensor([[0.991344, 0.017092, -1.008436]]), **TOL)


def test_whiten_masked_unbiased_shift_mean_and_zero_padding():
    # x = [1, 3, 5] masked in, padding holds inf: μ = 3, σ² = (4 + 0 + 4)/2 = 4, σ = 2
    # -> [−1, 0, 1] (population σ would give ±1.224745); shift_mean=False adds μ back: [2, 3, 4].
    x = torch.tensor([[1.0, 3.0, float("inf")], [5.0, float("inf"), float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), **TOL)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False),
                               torch.tensor([[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]]), **TOL)


@pytest.mark.parametrize("mask", [[[0, 0, 0]], [[0, 1, 0]]])
def test_whiten_needs_two_tokens(mask):
    with pytest.raises(ValueError, match="at least 2 masked-in elements"):
        masked_whiten(torch.ones(1, 3), torch.tensor(mask))


# ---- REINFORCE++ ---------------------------------------------------------------------------------

def test_reinforce_pp_outcome_reward_whitened_over_batch():
    # γ = 1, score on the last valid token: return-to-go = the score on every token.
    # Row 0 (L=2, score 1) -> [1, 1]; row 1 (L=3, score 0) -> [0, 0, 0]. N = 5, μ = 0.4,
    # Σ(x−μ)² = 2·0.36 + 3·0.16 = 1.2, σ² = 1.2/4 = 0.3, σ = 0.547723:
    # 0.6/σ = 1.095445, −0.4/σ = −0.730297; padding 0.
    r = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    adv = reinforce_pp_advantages(r, torch.tensor([[1, 1, 0], [1, 1, 1]]), gamma=1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.095445, 1.095445, 0.0], [-0.730297] * 3]), **TOL)


def test_reinforce_pp_discount_skips_hole():
    # γ = 0.5, r = [0, ·, 0, 1] with a hole at 1 (reward 3 there ignored): G = [0.25, ·, 0.5, 1];
    # μ = 1.75/3 = 0.583333, Σ(x−μ)² = 0.111111 + 0.006944 + 0.173611 = 0.291667, σ² = 0.145833,
    # σ = 0.381881: [−0.872872, 0, −0.218218, 1.091089].
    adv = reinforce_pp_advantages(torch.tensor([[0.0, 3.0, 0.0, 1.0]]), torch.tensor([[1, 0, 1, 1]]), gamma=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.872872, 0.0, -0.218218, 1.091089]]), **TOL)


def test_outcome_score_lands_on_the_last_model_token_after_a_tool_turn():
    # Rows with a tool turn (mask 0 at 2-3) before the answer at 4, then padding: the score belongs at
    # index 4 (Σ mask − 1 = 2 would be a tool token, whose reward GAE ignores: the signal would vanish).
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert last_masked_index(mask).tolist() == [4, 2, 0]
    # REINFORCE++ on scores [1, 0, ·]: G = the score on every model token -> [1, 1, ·, ·, 1] and [0, 0, 0];
    # N = 6, μ = 0.5, σ² = 6·0.25/5 = 0.3, σ = 0.547723: ±0.912871.
    adv = ADVANTAGES["reinforce_pp"](scores=torch.tensor([1.0, 0.0, 0.0]), group_ids=torch.tensor([0, 1, 2]),
                                     mask=mask)
    expected = torch.tensor([[1, 1, 0, 0, 1, 0], [-1, -1, -1, 0, 0, 0], [0] * 6], dtype=torch.float32) * 0.912871
    torch.testing.assert_close(adv, expected, **TOL)


def _verl_reinforce_pp_loop(r, mask, gamma):
    """verl compute_reinforce_plus_plus_outcome_advantage: running return reset at mask = 0."""
    returns = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=r.dtype)
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    return masked_whiten(returns, mask) * mask


@pytest.mark.parametrize("seed", range(3))
def test_reinforce_pp_matches_verl_on_right_padded(seed):
    # verl resets at mask holes where we skip; on right-padded data with zero rewards in the
    # padding the two agree.
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 8
    mask = (torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)).double()
    r = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    torch.testing.assert_close(reinforce_pp_advantages(r, mask, gamma=0.9), _verl_reinforce_pp_loop(r, mask, 0.9),
                               **TOL)


# ---- VAPO length-adaptive λ ----------------------------------------------------------------------

def test_length_adaptive_lambda_spec_vector():
    # α = 0.05, λ = 1 − 1/(0.05·l): l=21 -> 1 − 1/1.05 = 0.047619; 100 -> 1 − 1/5 = 0.8; 1000 -> 0.98;
    # 10000 -> 0.998; l = 20 -> 0 and l = 5, 0 -> negative / −inf, clamped to 0 (spec §10).
    lam = length_adaptive_lambda(torch.tensor([21, 100, 1000, 10000, 20, 5, 0]), alpha=0.05)
    assert lam.dtype == torch.float32
    torch.testing.assert_close(lam, torch.tensor([0.047619, 0.8, 0.98, 0.998, 0.0, 0.0, 0.0]), **TOL)


def test_length_adaptive_lambda_stays_below_one():
    # α·l = 5e7 > 2^24: 1 − 2e-8 rounds to 1.0 in float32; the clamp keeps 1 − 2^-24.
    lam = length_adaptive_lambda(torch.tensor([10 ** 9]), alpha=0.05)
    assert lam.item() == 1.0 - 2.0 ** -24
    lam64 = length_adaptive_lambda(torch.tensor([1000.0], dtype=torch.float64), alpha=0.05)
    assert lam64.dtype == torch.float64 and lam64.item() == pytest.approx(0.98, abs=1e-12)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        length_adaptive_lambda(torch.tensor([10]), alpha=0.0)
