"""KL estimators k1/k2/k3 (spec §1.2): spec §10 vector, clamps, and error message."""

import math

import pytest
import torch

from algos import KL_ESTIMATORS, kl_penalty

TOL = dict(rtol=1e-5, atol=1e-6)


def _p(*probs):
    return torch.log(torch.tensor([probs], dtype=torch.float64))  # (B=1, T)


@pytest.mark.parametrize("kind, expected", [
    # p = 0.5, p_ref = 0.4, d = ln(0.5/0.4) = 0.223144 (spec §10):
    ("k1", 0.223144),   # d
    ("k2", 0.024897),   # 0.5·d² = 0.5·0.049793
    ("k3", 0.023144),   # u = −d, e^u − u − 1 = 0.8 + 0.223144 − 1
])
def test_spec_vector(kind, expected):
    kl = kl_penalty(_p(0.5), _p(0.4), kind)
    assert kl.shape == (1, 1)
    assert kl.item() == pytest.approx(expected, abs=1e-6)


def test_per_token_shape_and_values():
    # Tokens (p, p_ref) = (0.5, 0.4), (0.2, 0.2), (0.1, 0.4):
    # k1 = [0.223144, 0, ln 0.25 = −1.386294]; k2 = ½k1² = [0.024897, 0, 0.960906];
    # k3 = [0.023144, 0, e^{ln 4} − ln 4 − 1 = 1.613706].
    logp, ref = _p(0.5, 0.2, 0.1), _p(0.4, 0.2, 0.4)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[0.223144, 0.0, -1.386294]],
                                                                          dtype=torch.float64), **TOL)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[0.024897, 0.0, 0.960906]],
                                                                          dtype=torch.float64), **TOL)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([[0.023144, 0.0, 1.613706]],
                                                                          dtype=torch.float64), **TOL)


def test_k3_clamps():
    # ref − logp = 30 is clamped to 20, e^20 − 21 ≈ 4.85e8 is clamped to 10;
    # ref − logp = −30 -> u = −20: e^−20 + 20 − 1 = 19.000000002, clamped to 10.
    logp = torch.tensor([[0.0, 0.0]])
    ref = torch.tensor([[30.0, -30.0]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([[10.0, 10.0]]), **TOL)


def test_k3_equals_grpo_paper_form_and_is_nonnegative():
    # DeepSeekMath D_KL = π_ref/π − log(π_ref/π) − 1, inside the clamp range.
    g = torch.Generator().manual_seed(0)
    logp = -3 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    ref = -3 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    ratio = torch.exp(ref) / torch.exp(logp)
    k3 = kl_penalty(logp, ref, "k3")
    torch.testing.assert_close(k3, ratio - torch.log(ratio) - 1, **TOL)
    assert (k3 >= 0).all()


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'low_var_kl'.*\['k1', 'k2', 'k3'\]"):
        kl_penalty(_p(0.5), _p(0.4), "low_var_kl")


def test_registry_entries_match_kl_penalty():
    logp, ref = _p(0.5, 0.1), _p(0.4, 0.3)
    for kind, fn in KL_ESTIMATORS.items():
        assert torch.equal(fn(logp, ref), kl_penalty(logp, ref, kind))
    assert math.isclose(KL_ESTIMATORS["k1"](logp, ref)[0, 1].item(), math.log(1 / 3), rel_tol=1e-9)


def test_k3_gradient():
    # k3 = e^u − u − 1 with u = ref − logp, so dk3/dlogp = −e^u + 1 = 1 − π_ref/π: its expectation under π
    # is the gradient of the FORWARD KL(π_ref‖π), not of KL(π‖π_ref) (spec §1.2), hence "subtle".
    #   p = 0.5, p_ref = 0.4: 1 − 0.8 = 0.2;   u = −1: 1 − e^−1 = 0.632121;
    #   u = 3: k3 = e^3 − 4 = 16.09 > 10 is clamped -> gradient 0;   u = 30: clamped at 20 -> gradient 0.
    logp = torch.tensor([[math.log(0.5), 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.4), -1.0, 3.0, 30.0]], dtype=torch.float64)
    kl_penalty(logp, ref, "k3").sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.2, 1 - math.exp(-1), 0.0, 0.0]], dtype=torch.float64),
                               **TOL)


def test_adaptive_kl_coef_by_hand():
    from algos import adaptive_kl_coef

    # KL above target by 50%: error clipped to +0.2; beta * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512.
    assert adaptive_kl_coef(0.1, 0.15, target=0.1, horizon=10000, num_samples=256) == pytest.approx(0.100512, abs=1e-9)
    # KL at 95% of target: error -0.05; 0.2 * (1 - 0.05 * 1000 / 10000) = 0.199.
    assert adaptive_kl_coef(0.2, 0.095, target=0.1, horizon=10000, num_samples=1000) == pytest.approx(0.199, abs=1e-9)
    # KL at 0: error clipped to -0.2.
    assert adaptive_kl_coef(0.2, 0.0, target=0.1, horizon=100, num_samples=100) == pytest.approx(0.16, abs=1e-9)
