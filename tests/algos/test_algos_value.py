"""Clipped value loss (spec §1.5, §8.2.7): hand-computed loss, metrics and gradient."""

import pytest
import torch

from algos import value_loss

TOL = dict(rtol=1e-5, atol=1e-6)

# v = [1, 0, 2], v_old = 0.5 everywhere, R = [0, 1, 2.5], c = 0.2 -> v_clip = clamp(v, 0.3, 0.7) = [0.7, 0.3, 0.7].
#   t0: (1 − 0)² = 1,      (0.7 − 0)² = 0.49   -> max 1     (unclipped wins)
#   t1: (0 − 1)² = 1,      (0.3 − 1)² = 0.49   -> max 1     (unclipped wins)
#   t2: (2 − 2.5)² = 0.25, (0.7 − 2.5)² = 3.24 -> max 3.24  (clipped wins)
# A 4th, masked token holds garbage. token-mean = 5.24/3, loss = 0.5·5.24/3 = 0.873333; vf_clipfrac = 1/3.
VALUES = [[1.0, 0.0, 2.0, 50.0]]
OLD, RETURNS, MASK = [[0.5, 0.5, 0.5, 0.0]], [[0.0, 1.0, 2.5, -3.0]], [[1.0, 1.0, 1.0, 0.0]]


def _call(values, **kw):
    return value_loss(values, torch.tensor(OLD), torch.tensor(RETURNS), torch.tensor(MASK), clip=0.2, **kw)


def test_value_loss_by_hand():
    loss, metrics = _call(torch.tensor(VALUES))
    assert loss.item() == pytest.approx(0.5 * 5.24 / 3, abs=1e-6)
    # value_mean = (1 + 0 + 2)/3 = 1. Explained variance: R = [0, 1, 2.5], Var(R) = 3.166667/3 = 1.055556;
    # R − v = [−1, 1, 0.5], Var = 2.166667/3 = 0.722222; 1 − 0.722222/1.055556 = 0.315789.
    assert metrics == pytest.approx({"vf_clipfrac": 1 / 3, "value_mean": 1.0, "vf_explained_var": 0.315789},
                                    abs=1e-5)
    assert all(type(x) is float for x in metrics.values())


def test_value_loss_gradient_zero_where_clipped_term_wins():
    # dL/dv = 0.5 · (1/3) · 2(v − R) on tokens where the unclipped term wins: t0 (1 − 0)/3 = 1/3,
    # t1 (0 − 1)/3 = −1/3; t2 takes the clipped branch, whose v_clip is at its bound -> 0; padding -> 0.
    values = torch.tensor(VALUES, requires_grad=True)
    loss, _ = _call(values)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[1 / 3, -1 / 3, 0.0, 0.0]]), **TOL)


def test_value_loss_aggregation_forwarded():
    # seq-mean-token-sum with one sequence: 0.5·5.24 = 2.62; token-mean with a global count of 10: 0.262.
    loss, _ = _call(torch.tensor(VALUES), agg="seq-mean-token-sum")
    assert loss.item() == pytest.approx(2.62, abs=1e-6)
    loss, _ = _call(torch.tensor(VALUES), num_tokens=10)
    assert loss.item() == pytest.approx(0.262, abs=1e-6)


def test_value_loss_rejects_nonpositive_clip():
    with pytest.raises(ValueError, match="clip must be > 0"):
        value_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), clip=0.0)
