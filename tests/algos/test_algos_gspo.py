"""GSPO: sequence-level ratio in policy_loss (spec §5.1): hand values, gradients, clamp, aggregation."""

import math

import pytest
import torch

from algos import POLICY_LOSSES, gspo_loss, policy_loss

TOL = dict(rtol=1e-5, atol=1e-6)

# Two sequences, T = 3, ε = 0.2. old_logp arbitrary; logp = old + d.
#   seq 0: mask [1,1,0], d = [0.2, −0.1 | 5 garbage], A = [1, 2 | 0]:
#          s0 = exp((0.2 − 0.1)/2) = e^0.05 = 1.051271 ∈ [0.8, 1.2] -> unclipped, L = −A·s0 = [−1.051271, −2.102542]
#   seq 1: mask [1,1,1], d = [0.9, 0.6, 0.3], A = [1, 0.5, 2] (per-token advantages, GSPO-token):
#          s1 = e^0.6 = 1.822119 > 1.2, A > 0 -> clipped, L = −1.2·A = [−1.2, −0.6, −2.4]
# seq-mean-token-mean: seq 0 = −3.153813/2 = −1.576907, seq 1 = −4.2/3 = −1.4 -> loss = −1.488453.
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]], dtype=torch.float64)
D = torch.tensor([[0.2, -0.1, 5.0], [0.9, 0.6, 0.3]], dtype=torch.float64)
ADV = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.5, 2.0]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)


def test_gspo_hand_value_and_metrics():
    loss, metrics = gspo_loss(OLD + D, OLD, ADV, MASK)
    assert loss.item() == pytest.approx(-(1.5 * math.exp(0.05) + 1.4) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(-1.488453, abs=1e-6)
    # clipfrac: the 3 tokens of seq 1 out of 5; approx_kl = mean(−d) = −(0.1 + 1.8)/5 = −0.38.
    assert metrics == pytest.approx({"clipfrac": 0.6, "approx_kl": -0.38, "clipfrac_lower": 0.0}, abs=1e-6)


def test_gspo_gradient_hand_formula():
    # GSPO-token coefficient sg[s_b]·π_θ/sg[π_θ]: d/dlogp_t = s_b (s_b itself is a constant).
    # seq-mean-token-mean -> dL/dlogp_{b,t} = (1/2 seqs)·(1/|o_b|)·(−A_{b,t}·s_b) where unclipped:
    #   seq 0: −A·e^0.05/4 = [−0.262818, −0.525636, 0 (padding)];  seq 1: clipped -> 0.
    logp = (OLD + D).requires_grad_()
    loss, _ = gspo_loss(logp, OLD, ADV, MASK)
    loss.backward()
    s0 = math.exp(0.05)
    expected = torch.tensor([[-s0 / 4, -2 * s0 / 4, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, **TOL)


@pytest.mark.parametrize("seed", range(3))
def test_gspo_token_form_equals_sequence_objective_for_sequence_advantages(seed):
    # With A constant over each sequence the GSPO-token loss and gradient equal the paper's
    # sequence objective mean_b max(−A_b·s_b, −A_b·clip(s_b)), differentiating THROUGH s_b = exp(mean d):
    # ∇ = s_b·A_b·(1/|o_b|)Σ_t ∇logp_t (paper's gradient).
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 5
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp0 = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)).double()
    adv_seq = torch.randn(B, generator=g, dtype=torch.float64)

    logp = logp0.clone().requires_grad_()
    loss, _ = gspo_loss(logp, old, adv_seq[:, None].expand(B, T), mask, clip_low=0.1, clip_high=0.15)
    loss.backward()

    ref_logp = logp0.clone().requires_grad_()
    s = torch.exp(((ref_logp - old) * mask).sum(-1) / mask.sum(-1))  # (B,)
    ref = torch.maximum(-adv_seq * s, -adv_seq * s.clamp(0.9, 1.15)).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(logp.grad, ref_logp.grad, **TOL)


def test_gspo_equals_vanilla_for_one_token_sequences():
    # |o| = 1: s = ρ, so the sequence and token ratios coincide (inside the ±20 / 10 clamps).
    g = torch.Generator().manual_seed(0)
    logp, old, adv = (torch.randn(5, 1, generator=g) for _ in range(3))
    seq, _ = policy_loss(logp, old, adv, torch.ones(5, 1), ratio_level="sequence")
    tok, _ = policy_loss(logp, old, adv, torch.ones(5, 1))
    torch.testing.assert_close(seq, tok, **TOL)


def test_gspo_log_ratio_clamped_at_10_only():
    # mean d = 15 -> log s clamped to 10: A = −1 gives loss e^10 = 22026.47 (token level would clamp at 20),
    # and the clamp stops the gradient (verl gspo). mean d = −30 is NOT clamped below: s = e^−30, A = 1
    # -> max(−e^−30, −0.8) = −9.4e-14 ≈ 0.
    logp = torch.tensor([[15.0, 15.0], [-30.0, -30.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    loss, _ = policy_loss(logp, torch.zeros_like(logp), adv, torch.ones_like(adv), ratio_level="sequence",
                          agg="seq-mean-token-mean")
    loss.backward()
    # rel 1e-6, not exact: seq-mean-token-mean divides each row by L + 1e-8 (verl ≥ v0.6.1).
    assert loss.item() == pytest.approx((math.exp(10) - math.exp(-30)) / 2, rel=1e-6)
    assert logp.grad[0].abs().max().item() == 0.0


def test_gspo_aggregation_as_passed():
    # Registered wrapper: default seq-mean-token-mean; an explicit agg is honoured (verl would force
    # seq-mean-token-mean). token-mean: (−3.153813 − 4.2)/5 = −1.470763.
    wrapper = POLICY_LOSSES["gspo"]
    default, _ = wrapper(logprobs=OLD + D, old_logprobs=OLD, advantages=ADV, mask=MASK)
    explicit, _ = policy_loss(OLD + D, OLD, ADV, MASK, ratio_level="sequence", agg="seq-mean-token-mean")
    assert default.item() == explicit.item()
    token_mean, _ = wrapper(logprobs=OLD + D, old_logprobs=OLD, advantages=ADV, mask=MASK, agg="token-mean")
    assert token_mean.item() == pytest.approx(-(3 * math.exp(0.05) + 4.2) / 5, abs=1e-6)
    # The trainer passes global counts: 2 sequences counted as 4 halves the seq-mean loss.
    halved, _ = wrapper(logprobs=OLD + D, old_logprobs=OLD, advantages=ADV, mask=MASK, num_seqs=4)
    assert halved.item() == pytest.approx(default.item() / 2, abs=1e-9)
