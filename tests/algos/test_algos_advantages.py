"""GRPO / Dr.GRPO / RLOO advantages: hand-computed values (spec §10) and vectorised-vs-loop equivalence."""

import pytest
import torch

from algos import ADVANTAGES, grpo_advantages, rloo_advantages

TOL = dict(rtol=1e-5, atol=1e-6)


def test_grpo_spec_vector_two_correct_of_four():
    # r = [1,0,0,1]: mean 0.5, unbiased var = 4·0.25/3 = 1/3, std 0.57735,
    # A = ±0.5 / (0.57735 + 1e-6) = ±0.866024 (spec §10).
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), torch.ones(4, 1))
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.866024, -0.866024, -0.866024, 0.866024]), **TOL)


def test_grpo_spec_vector_one_correct_of_four():
    # r = [1,0,0,0]: mean 0.25, unbiased var = (0.5625 + 3·0.0625)/3 = 0.25, std 0.5,
    # A = 0.75/0.500001 = 1.499997 and −0.25/0.500001 = −0.499999 (population std would give 1.7320).
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long), torch.ones(4, 1))
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.499997, -0.499999, -0.499999, -0.499999]), **TOL)


def test_grpo_interleaved_noncontiguous_ids_and_singleton():
    # ids 5: r = [1, 0] -> mean 0.5, std = sqrt(0.5) = 0.707107, A = ±0.5/0.707108 = ±0.707106;
    # ids 9: r = [3, 1] -> mean 2, std = sqrt(2) = 1.414214, A = ±1/1.414215 = ±0.707106;
    # id 100 is a singleton -> 0 (no baseline to compare against).
    scores = torch.tensor([1.0, 3.0, 0.0, 1.0, 7.0])
    ids = torch.tensor([5, 9, 5, 9, 100])
    adv = grpo_advantages(scores, ids, torch.ones(5, 2))
    expected = torch.tensor([0.7071058, 0.7071063, -0.7071058, -0.7071063, 0.0])
    torch.testing.assert_close(adv, expected[:, None].expand(5, 2), **TOL)


def test_grpo_broadcast_times_mask_bool_or_float():
    # The sequence advantage lands on every masked-in token; padding gets exactly 0.
    scores, ids = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([3, 3, 3, 3])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    a = 0.866024
    expected = torch.tensor([[a, a, 0.0], [-a, 0.0, 0.0], [-a, -a, -a], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(grpo_advantages(scores, ids, mask.float()), expected, **TOL)
    torch.testing.assert_close(grpo_advantages(scores, ids, mask.bool()), expected, **TOL)


def test_grpo_eps_in_denominator():
    # r = [1, 0], eps 0.1: A = ±0.5 / (0.707107 + 0.1) = ±0.619497.
    adv = grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2, 1), eps=0.1)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.619497, -0.619497]), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_constant_fractional_groups_are_exactly_zero(dtype, norm_by_std):
    # Spec §2.1: a 1-ulp error in the float mean of [0.1]·3 divided by std + 1e-6 would give a
    # spurious nonzero advantage; constant groups must give exactly 0, while the mixed group does not.
    scores = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7, 0.7, 0.3, 0.9], dtype=dtype)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    adv = grpo_advantages(scores, ids, torch.ones(10, 3), norm_by_std=norm_by_std)
    assert torch.equal(adv[:8], torch.zeros(8, 3, dtype=adv.dtype))
    assert (adv[8:] != 0).all()


def test_grpo_integer_scores_give_float32():
    adv = grpo_advantages(torch.tensor([1, 0, 0, 1]), torch.zeros(4, dtype=torch.long), torch.ones(4, 1))
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.866024, -0.866024, -0.866024, 0.866024]), **TOL)


def test_drgrpo_no_std_division():
    # norm_by_std=False: r = [1,0,0,0] -> A = r − 0.25 = [0.75, −0.25, −0.25, −0.25].
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long), torch.ones(4, 1),
                          norm_by_std=False)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25]), **TOL)


def _reference_loop(scores, ids, mask, eps, norm_by_std):
    """Plain per-group loop with torch.std (unbiased), the way verl's loop version reads."""
    adv = torch.zeros(len(scores), dtype=torch.float64)
    for gid in ids.unique().tolist():
        idx = (ids == gid).nonzero().flatten()
        r = scores[idx].double()
        if len(r) == 1 or r.std() < 1e-6:
            continue  # singleton or constant group: 0
        adv[idx] = (r - r.mean()) / (r.std() + eps) if norm_by_std else r - r.mean()
    return adv.float()[:, None] * mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_vectorised_matches_reference_loop(seed, norm_by_std):
    g = torch.Generator().manual_seed(seed)
    B, T = 64, 7
    # Sparse, shuffled, partly negative ids so groups are non-contiguous and of mixed size (incl. 1).
    ids = torch.randint(-20, 20, (B,), generator=g) * 1000
    scores = torch.rand(B, generator=g)
    scores[ids == ids[0]] = 0.3  # one constant fractional group
    scores[::5] = torch.randint(0, 2, scores[::5].shape, generator=g).float()  # some 0/1 rewards
    mask = (torch.arange(T) < torch.randint(0, T + 1, (B, 1), generator=g)).float()
    got = grpo_advantages(scores, ids, mask, eps=1e-6, norm_by_std=norm_by_std)
    torch.testing.assert_close(got, _reference_loop(scores, ids, mask, 1e-6, norm_by_std), **TOL)


def test_grpo_without_std_equals_drgrpo_entry():
    g = torch.Generator().manual_seed(0)
    scores, ids = torch.randn(32, generator=g), torch.randint(0, 6, (32,), generator=g)
    mask = torch.rand(32, 5, generator=g) > 0.3
    expected = grpo_advantages(scores, ids, mask, norm_by_std=False)
    assert torch.equal(ADVANTAGES["drgrpo"](scores=scores, group_ids=ids, mask=mask), expected)


# ---- RLOO ----------------------------------------------------------------------------------------

def test_rloo_hand_values_and_singleton():
    # Group 0: r = [1,0,0,0], A_i = r_i − mean of the other three:
    #   1 − 0 = 1;  0 − (1+0+0)/3 = −1/3   (= 4/3 · (r − 0.25) = [1, −1/3, −1/3, −1/3]).
    # Group 7: r = [2, 5] -> [2 − 5, 5 − 2] = [−3, 3]. Group 9 is a singleton -> 0 (verl would keep r = 4).
    scores = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0, 5.0, 4.0])
    ids = torch.tensor([0, 0, 7, 0, 0, 7, 9])
    mask = torch.tensor([[1, 1]] * 6 + [[1, 0]])
    expected = torch.tensor([1.0, -1 / 3, -3.0, -1 / 3, -1 / 3, 3.0, 0.0])[:, None] * mask
    torch.testing.assert_close(rloo_advantages(scores, ids, mask), expected, **TOL)


def _rloo_reference_loop(scores, ids, mask):
    """Leave-one-out by definition: each sample minus the mean of the rest of its group."""
    adv = torch.zeros(len(scores), dtype=torch.float64)
    for i in range(len(scores)):
        others = scores[(ids == ids[i]) & (torch.arange(len(scores)) != i)].double()
        if len(others) > 0:
            adv[i] = scores[i].double() - others.mean()
    return adv.float()[:, None] * mask


@pytest.mark.parametrize("seed", range(3))
def test_rloo_equals_group_scaled_drgrpo_and_reference_loop(seed):
    # RLOO = G/(G−1) · Dr.GRPO group by group, on random mixed-size groups (singletons: both 0).
    g = torch.Generator().manual_seed(seed)
    B, T = 48, 5
    ids = torch.randint(0, 12, (B,), generator=g)
    scores = torch.randn(B, generator=g)
    mask = (torch.arange(T) < torch.randint(0, T + 1, (B, 1), generator=g)).float()
    group_size = (ids[:, None] == ids[None, :]).sum(-1).float()  # (B,) G of each sample's group
    scale = torch.where(group_size > 1, group_size / (group_size - 1).clamp(min=1), torch.zeros_like(group_size))
    got = ADVANTAGES["rloo"](scores=scores, group_ids=ids, mask=mask)
    torch.testing.assert_close(got, scale[:, None] * ADVANTAGES["drgrpo"](scores=scores, group_ids=ids, mask=mask),
                               **TOL)
    torch.testing.assert_close(got, _rloo_reference_loop(scores, ids, mask), **TOL)


def test_rloo_constant_fractional_group_is_exactly_zero():
    adv = rloo_advantages(torch.tensor([0.1, 0.1, 0.1, 0.3, 0.9]), torch.tensor([0, 0, 0, 1, 1]), torch.ones(5, 2))
    assert torch.equal(adv[:3], torch.zeros(3, 2))
    torch.testing.assert_close(adv[3:, 0], torch.tensor([-0.6, 0.6]), **TOL)  # 0.3 − 0.9, 0.9 − 0.3
