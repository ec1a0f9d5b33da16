"""Clipped policy loss (spec §1.4) and entropy (spec §1.6): hand-computed values on tiny tensors."""

import math

import pytest
import torch

from algos import entropy_from_logits, policy_loss

TOL = dict(rtol=1e-5, atol=1e-6)
E = math.e


def _loss(log_ratio, adv, mask=None, **kw):
    """policy_loss on one sequence (B=1) with old_logp = 0, so logp − old_logp = log_ratio."""
    logp = torch.tensor([log_ratio], dtype=torch.float64)
    adv = torch.tensor([adv], dtype=torch.float64)
    mask = torch.ones_like(logp) if mask is None else torch.tensor([mask], dtype=torch.float64)
    return policy_loss(logp, torch.zeros_like(logp), adv, mask, **kw)


def test_four_clip_cases_symmetric():
    # ε = 0.2, L = max(−A·ρ, −A·clamp(ρ, 0.8, 1.2)):
    #   A=2,  ρ=e   -> max(−2e, −2.4)     = −2.4   (clipped: no extra credit above 1.2)
    #   A=2,  ρ=1/e -> max(−2/e, −1.6)    = −2/e   (unclipped: pessimistic side)
    #   A=−1, ρ=e   -> max(e, 1.2)        = e      (unclipped)
    #   A=−1, ρ=1/e -> max(1/e, 0.8)      = 0.8    (clipped)
    # token-mean = (−2.4 − 2/e + e + 0.8)/4 = 0.0956307; clipfrac = 2/4; approx_kl = mean(−d) = 0.
    loss, metrics = _loss([1.0, -1.0, 1.0, -1.0], [2.0, 2.0, -1.0, -1.0])
    torch.testing.assert_close(loss, torch.tensor((-2.4 - 2 / E + E + 0.8) / 4, dtype=torch.float64), **TOL)
    assert loss.item() == pytest.approx(0.0956307, abs=1e-6)
    assert metrics == pytest.approx({"clipfrac": 0.5, "approx_kl": 0.0, "clipfrac_lower": 0.0}, abs=1e-6)
    assert all(type(v) is float for v in metrics.values())


def test_decoupled_clip_low_high():
    # clip_low 0.1, clip_high 0.3 (DAPO clip-higher): bounds [0.9, 1.3].
    #   A=1,  ρ=e    -> max(−e, −1.3)     = −1.3
    #   A=1,  ρ=1.25 -> max(−1.25, −1.25) = −1.25 (inside [0.9,1.3]; symmetric 0.2 would clip to −1.2)
    #   A=−1, ρ=1/e  -> max(1/e, 0.9)     = 0.9
    # token-mean = (−1.3 − 1.25 + 0.9)/3 = −0.55; clipfrac = 2/3.
    loss, metrics = _loss([1.0, math.log(1.25), -1.0], [1.0, 1.0, -1.0], clip_low=0.1, clip_high=0.3)
    assert loss.item() == pytest.approx(-0.55, abs=1e-6)
    assert metrics["clipfrac"] == pytest.approx(2 / 3, abs=1e-6)
    loss_sym, _ = _loss([math.log(1.25)], [1.0])
    assert loss_sym.item() == pytest.approx(-1.2, abs=1e-6)


def test_dual_clip_caps_negative_advantage_only():
    # c = 3:
    #   A=−1, ρ=e²=7.389 -> Lc = max(7.389, 1.2) = 7.389 > −c·A = 3 -> 3 (dual-clipped)
    #   A=−1, ρ=e        -> Lc = e = 2.718 < 3 -> 2.718 (not dual-clipped)
    #   A=1,  ρ=e²       -> Lc = −1.2; the cap −c·A = −3 would lower it, but dual-clip skips A ≥ 0
    # token-mean = (3 + e − 1.2)/3 = 1.506094; clipfrac_lower = 1/3; clipfrac = 1/3 (third token only).
    loss, metrics = _loss([2.0, 1.0, 2.0], [-1.0, -1.0, 1.0], dual_clip=3.0)
    assert loss.item() == pytest.approx((3 + E - 1.2) / 3, abs=1e-6)
    assert metrics["clipfrac_lower"] == pytest.approx(1 / 3, abs=1e-6)
    assert metrics["clipfrac"] == pytest.approx(1 / 3, abs=1e-6)
    # Without dual-clip the first token keeps its 7.389.
    loss_off, metrics_off = _loss([2.0, 1.0, 2.0], [-1.0, -1.0, 1.0])
    assert loss_off.item() == pytest.approx((math.exp(2) + E - 1.2) / 3, abs=1e-6)
    assert metrics_off["clipfrac_lower"] == 0.0


@pytest.mark.parametrize("c", [1.0, 0.5, -3.0])
def test_dual_clip_must_exceed_one(c):
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        _loss([0.0], [1.0], dual_clip=c)


def test_log_ratio_clamped_to_20():
    # logp − old_logp = 50 is clamped to 20: A=−1 gives loss e^20 = 4.851652e8, finite;
    # approx_kl uses the clamped log-ratio: −20.
    loss, metrics = _loss([50.0], [-1.0])
    assert loss.item() == pytest.approx(math.exp(20), rel=1e-6)
    assert metrics["approx_kl"] == pytest.approx(-20.0)


def test_mask_excludes_tokens_from_loss_and_metrics():
    # Second token is padding with a huge ratio; only token 1 (A=1, ρ=1 -> −1) counts, and
    # approx_kl is the masked mean of −d = −0.0 only.
    loss, metrics = _loss([0.0, 5.0], [1.0, -7.0], mask=[1.0, 0.0])
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert metrics == pytest.approx({"clipfrac": 0.0, "approx_kl": 0.0, "clipfrac_lower": 0.0}, abs=1e-6)


def test_gradient_zero_on_clipped_tokens():
    # token-mean over 2 tokens: token 0 unclipped (ρ=1, A=1): dL/dlogp = −A·ρ/2 = −0.5;
    # token 1 clipped (ρ=e, A=1 -> −1.2 constant): gradient 0.
    logp = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 0.0]]), **TOL)


def test_dual_clip_gradient():
    # c = 3, ε = 0.2, token-mean over 4 tokens, dL/dlogp = dL/dρ · ρ / 4:
    #   A=−1, ρ=e²=7.389  -> capped at −c·A = 3, a constant        -> 0
    #   A=−1, ρ=e^0.5     -> Lc = −A·ρ = 1.648721 < 3 (unclipped)   -> −A·ρ/4 = 0.412180
    #   A=−1, ρ=e^−1      -> Lc = max(0.368, 0.8) = 0.8 (ratio clip) -> 0
    #   A=2,  ρ=e^0.1     -> unclipped −2ρ                          -> −2·1.105171/4 = −0.552585
    logp = torch.tensor([[2.0, 0.5, -1.0, 0.1]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    loss, _ = policy_loss(logp, torch.zeros_like(logp), adv, torch.ones_like(adv), dual_clip=3.0)
    loss.backward()
    expected = torch.tensor([[0.0, math.exp(0.5) / 4, 0.0, -2 * math.exp(0.1) / 4]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, **TOL)


def test_unknown_ratio_level():
    with pytest.raises(ValueError, match="unknown ratio_level 'seq'"):
        _loss([0.0], [1.0], ratio_level="seq")


def test_aggregation_and_counts_are_forwarded():
    # Loss per token at ρ = 1 is −A: A = [[1, 2], [3, 0]] with mask [[1,1],[1,0]] -> Σ l·m = −6.
    logp, adv = torch.zeros(2, 2), torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    cases = [
        ({}, -6.0 / 3),                                            # token-mean, 3 local tokens
        ({"num_tokens": 12}, -6.0 / 12),                           # global token count
        ({"agg": "seq-mean-token-sum"}, (-3.0 - 3.0) / 2),        # per-seq sums −3, −3
        ({"agg": "seq-mean-token-mean", "num_seqs": 4}, (-1.5 - 3.0) / 4),
        ({"agg": "seq-mean-token-sum-norm"}, -6.0 / (2 * 2)),      # 2 seqs x K = T = 2
        ({"agg": "seq-mean-token-sum-norm", "norm_len": 10}, -6.0 / (2 * 10)),
    ]
    for kwargs, expected in cases:
        loss, _ = policy_loss(logp, logp, adv, mask, **kwargs)
        assert loss.item() == pytest.approx(expected, abs=1e-6), kwargs


def test_entropy_from_logits_hand_values():
    # Uniform over 4: H = ln 4 = 1.386294. logits [0, ln 3]: p = [0.25, 0.75],
    # H = −(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335. Shifting logits by a constant changes nothing.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -1e4, -1e4]]], dtype=torch.float64)  # (1, 2, 4)
    h = entropy_from_logits(logits)
    assert h.shape == (1, 2)
    torch.testing.assert_close(h, torch.tensor([[1.386294, 0.562335]], dtype=torch.float64), **TOL)
    torch.testing.assert_close(entropy_from_logits(logits + 100.0), h, **TOL)


def test_entropy_matches_categorical():
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected, **TOL)
