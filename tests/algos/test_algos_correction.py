"""Truncated IS weights for the rollout–training mismatch (spec §5.2) and the mismatch metrics."""

import math

import pytest
import torch

from algos import policy_loss, rollout_mismatch_metrics, truncated_is_weights

TOL = dict(rtol=1e-5, atol=1e-6)
E = math.e

# old − rollout log-ratios; the last column is padding with huge garbage.
#   row 0: [0.5, −0.5, 0.3 | 9]   row 1: [1.0, 0.5 | 9, 9]
OLD = torch.tensor([[0.5, -0.5, 0.3, 9.0], [1.0, 0.5, 9.0, 9.0]])
ROLLOUT = torch.zeros(2, 4)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_token_level():
    # w = min(e^d, 2): [e^0.5 = 1.648721, e^−0.5 = 0.606531, e^0.3 = 1.349859, pad 0],
    #                  [min(e, 2) = 2, 1.648721, pad 0, pad 0].
    w = truncated_is_weights(OLD, ROLLOUT, MASK, cap=2.0)
    expected = torch.tensor([[1.648721, 0.606531, 1.349859, 0.0], [2.0, 1.648721, 0.0, 0.0]])
    torch.testing.assert_close(w, expected, **TOL)


def test_sequence_level():
    # Σ masked d: row 0 = 0.5 − 0.5 + 0.3 = 0.3 -> e^0.3 = 1.349859 on its 3 tokens;
    # row 1 = 1.5 -> e^1.5 = 4.481689, capped to 2 on its 2 tokens. Padding 0.
    w = truncated_is_weights(OLD, ROLLOUT, MASK, cap=2.0, level="sequence")
    expected = torch.tensor([[1.349859] * 3 + [0.0], [2.0, 2.0, 0.0, 0.0]])
    torch.testing.assert_close(w, expected, **TOL)


def test_clamp_20_and_detached():
    # Sequence sums ±50 are clamped to ±20 before exp: e^20 is then capped at 5, e^−20 = 2.061154e-9.
    old = torch.tensor([[25.0, 25.0], [-25.0, -25.0]], requires_grad=True)
    w = truncated_is_weights(old, torch.zeros(2, 2), torch.ones(2, 2), cap=5.0, level="sequence")
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([[5.0, 5.0], [2.061154e-9, 2.061154e-9]]), rtol=1e-5, atol=0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown IS level 'geometric'"):
        truncated_is_weights(OLD, ROLLOUT, MASK, cap=2.0, level="geometric")
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(OLD, ROLLOUT, MASK, cap=0.0)


def test_mismatch_metrics():
    # Masked d = [0.5, −0.5, 0.3, 1.0, 0.5]: mean |d| = 2.8/5 = 0.56, max 1.0; kl_k1 = mean(−d) = −1.8/5 = −0.36.
    # Token weights [1.648721, 0.606531, 1.349859, 2, 1.648721]: mean 7.253832/5 = 1.450766, min 0.606531, max 2.
    w = truncated_is_weights(OLD, ROLLOUT, MASK, cap=2.0)
    metrics = rollout_mismatch_metrics(OLD, ROLLOUT, MASK, w)
    assert metrics == pytest.approx({"abs_logprob_diff_mean": 0.56, "abs_logprob_diff_max": 1.0, "kl_k1": -0.36,
                                     "is_weight_mean": 1.450766, "is_weight_min": 0.606531, "is_weight_max": 2.0},
                                    abs=1e-5)
    assert all(type(x) is float for x in metrics.values())


def test_mismatch_metrics_empty_mask_is_zero():
    zeros = torch.zeros(1, 2)
    metrics = rollout_mismatch_metrics(zeros, zeros, zeros, zeros)
    assert metrics == {k: 0.0 for k in metrics}


def test_policy_loss_multiplies_by_is_weights():
    # ρ = 1 (logp = old), A = [1, 1]: per-token loss −1; weights [2, 0.5] -> token-mean (−2 − 0.5)/2 = −1.25;
    # gradient −A·w/2 = [−1, −0.25]. Metrics are unweighted (clipfrac 0).
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2),
                                is_weights=torch.tensor([[2.0, 0.5]]))
    loss.backward()
    assert loss.item() == pytest.approx(-1.25, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -0.25]]), **TOL)
    assert metrics["clipfrac"] == 0.0
