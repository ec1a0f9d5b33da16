"""Process supervision (spec §2.2, §6): step rewards -> token rewards and GRPO process advantages."""

import pytest
import torch

from algos import grpo_advantages, grpo_process_advantages, step_token_rewards


def _close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


# One group of two: sample 0 has steps [0.2, 0.8] ending at tokens [1, 3] (length 4);
# sample 1 one step [0.2] ending at token 2 (length 3). A padded step slot in row 1.
REWARDS = torch.tensor([[0.2, 0.8], [0.2, 0.0]])
ENDS = torch.tensor([[1, 3], [2, 0]])
STEP_MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])


def test_step_token_rewards_puts_each_step_on_its_last_token():
    _close(step_token_rewards(REWARDS, ENDS, STEP_MASK, MASK), [[0, 0.2, 0, 0.8], [0, 0, 0.2, 0]])


def test_step_token_rewards_adds_steps_sharing_a_token():
    out = step_token_rewards(torch.tensor([[0.5, 0.25]]), torch.tensor([[1, 1]]), torch.ones(1, 2), torch.ones(1, 2))
    _close(out, [[0.0, 0.75]])


@pytest.mark.parametrize("end", [4, -1, 3])  # past T, negative, on a masked-out token of row 1
def test_step_token_rewards_refuses_a_step_outside_its_response(end):
    ends = torch.tensor([[1, 3], [end, 0]])
    with pytest.raises(ValueError, match="step 0 of sample 1"):
        step_token_rewards(REWARDS, ends, STEP_MASK, MASK)


def test_grpo_process_by_hand():
    # R = {0.2, 0.8, 0.2}: mean 0.4, unbiased var (0.04 + 0.16 + 0.04) / 2 = 0.12, std 0.346410.
    # r̃ = -0.2/0.346411 = -0.577349, 0.4/0.346411 = 1.154699 (eps 1e-6 in the denominator).
    # Sample 0: tokens 0-1 see both steps: -0.577349 + 1.154699 = 0.577350; tokens 2-3 the last: 1.154699.
    # Sample 1: tokens 0-2 see its one step: -0.577349; token 3 is padding: 0.
    adv = grpo_process_advantages(REWARDS, ENDS, STEP_MASK, torch.tensor([7, 7]), MASK)
    _close(adv, [[0.577350, 0.577350, 1.154699, 1.154699], [-0.577349, -0.577349, -0.577349, 0.0]])


def test_grpo_process_tokens_after_the_last_step_get_zero():
    # Sample 0's only step ends at token 1: tokens 2-3 follow it and get 0. R = {1, 0}: std 0.707107.
    adv = grpo_process_advantages(torch.tensor([[1.0], [0.0]]), torch.tensor([[1], [0]]), torch.ones(2, 1),
                                  torch.tensor([0, 0]), torch.ones(2, 4))
    _close(adv, [[0.707106, 0.707106, 0, 0], [-0.707106, 0, 0, 0]])


def test_grpo_process_constant_or_single_step_groups_get_exact_zero():
    # Group 0: every step reward 0.3 (a float32 mean is not exact: guarded). Group 1: a single step.
    rewards = torch.tensor([[0.3, 0.3], [0.3, 0.0], [0.9, 0.0]])
    ends = torch.tensor([[0, 1], [1, 0], [1, 0]])
    step_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    adv = grpo_process_advantages(rewards, ends, step_mask, torch.tensor([0, 0, 1]), torch.ones(3, 2))
    assert torch.equal(adv, torch.zeros(3, 2))


def test_grpo_process_with_one_step_at_the_end_is_outcome_grpo():
    torch.manual_seed(0)
    B, T = 12, 7
    lengths = torch.randint(1, T + 1, (B,))
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    scores, groups = torch.rand(B), torch.arange(B) // 4
    adv = grpo_process_advantages(scores[:, None], (lengths - 1)[:, None], torch.ones(B, 1), groups, mask)
    _close(adv, grpo_advantages(scores, groups, mask))


def test_grpo_process_matches_a_reference_loop():
    torch.manual_seed(1)
    B, S, T = 8, 4, 10
    groups = torch.tensor([3, 3, 3, 3, 5, 5, 5, 5])
    lengths = torch.randint(3, T + 1, (B,))
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    num_steps = torch.randint(0, S + 1, (B,))
    step_mask = (torch.arange(S)[None] < num_steps[:, None]).float()
    ends = torch.stack([torch.sort(torch.randint(0, int(n), (S,)))[0] for n in lengths])  # (B, S), in range
    rewards = torch.rand(B, S)
    adv = grpo_process_advantages(rewards, ends, step_mask, groups, mask)

    expected = torch.zeros(B, T)
    for g in groups.unique():
        rows = (groups == g).nonzero()[:, 0].tolist()
        R = torch.tensor([rewards[b, s].item() for b in rows for s in range(S) if step_mask[b, s]], dtype=torch.float64)
        mean, std = R.mean(), R.std()  # torch.std is unbiased
        for b in rows:
            for t in range(int(lengths[b])):
                expected[b, t] = sum(((rewards[b, s] - mean) / (std + 1e-6)).item()
                                     for s in range(S) if step_mask[b, s] and ends[b, s] >= t)
    _close(adv, expected)
