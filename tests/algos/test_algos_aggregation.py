"""Loss aggregation (spec §1.7): each mode by hand, empty masks, and micro-batch invariance."""

import pytest
import torch

from algos import AGGREGATIONS, aggregate, masked_mean

TOL = dict(rtol=1e-5, atol=1e-6)
MODES = sorted(AGGREGATIONS)

# Three sequences, T = 4. Row 2 is empty (L = 0) and full of garbage that must not leak in.
LOSS = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 6.0, 9.0], [100.0, 100.0, 100.0, 100.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
# Σ l·m = 1 + 2 + 4 = 7 over 3 tokens; per-sequence sums [3, 4, 0], lengths [2, 1, 0].


@pytest.mark.parametrize("mode, kwargs, expected", [
    ("token-mean", {}, 7 / 3),                             # 7 / 3 tokens = 2.333333
    ("token-mean", {"num_tokens": 14}, 0.5),               # 7 / global 14
    ("seq-mean-token-sum", {}, (3 + 4) / 2),               # empty row excluded: 3.5
    ("seq-mean-token-sum", {"num_seqs": 7}, 1.0),          # 7 / global 7
    ("seq-mean-token-mean", {}, (3 / 2 + 4 / 1) / 2),      # (1.5 + 4) / 2 = 2.75
    ("seq-mean-token-mean", {"num_seqs": 11}, 0.5),        # 5.5 / 11
    ("seq-mean-token-sum-norm", {}, 7 / (2 * 4)),          # 2 non-empty seqs x K = T = 4: 0.875
    ("seq-mean-token-sum-norm", {"norm_len": 10}, 0.35),   # 7 / (2 x K = 10)
    ("seq-mean-token-sum-norm", {"num_seqs": 7, "norm_len": 10}, 0.1),  # 7 / (global 7 x 10)
])
def test_modes_by_hand(mode, kwargs, expected):
    got = aggregate(LOSS, MASK, mode, **kwargs)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_bool_mask_equals_float_mask(mode):
    assert aggregate(LOSS, MASK.bool(), mode).item() == aggregate(LOSS, MASK, mode).item()


@pytest.mark.parametrize("mode", MODES)
def test_counts_not_used_by_a_mode_are_ignored(mode):
    # The trainer may pass every global count whatever the mode; only the mode's own count acts.
    own = {"token-mean": {"num_tokens"}, "seq-mean-token-sum": {"num_seqs"}, "seq-mean-token-mean": {"num_seqs"},
           "seq-mean-token-sum-norm": {"num_seqs", "norm_len"}}[mode]
    others = {k: 1000 for k in ("num_tokens", "num_seqs", "norm_len") if k not in own}
    assert aggregate(LOSS, MASK, mode, **others).item() == aggregate(LOSS, MASK, mode).item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("counts", [{}, {"num_tokens": 0, "num_seqs": 0}])
def test_empty_mask_gives_zero_with_grad(mode, counts):
    loss_mat = torch.randn(2, 3, requires_grad=True)
    loss = aggregate(loss_mat, torch.zeros(2, 3), mode, **counts)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(loss_mat.grad, torch.zeros(2, 3))


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(KeyError, match=r"unknown aggregation 'seq-mean'.*'token-mean'"):
        aggregate(LOSS, MASK, "seq-mean")


def test_masked_mean():
    # (1 + 2 + 4) / (3 + 1e-8) = 2.333333; all-masked input -> 0, not NaN; dim=-1 -> [1.5, 4, 0].
    assert masked_mean(LOSS, MASK).item() == pytest.approx(7 / 3, rel=1e-6)
    assert masked_mean(LOSS, torch.zeros_like(MASK)).item() == 0.0
    torch.testing.assert_close(masked_mean(LOSS, MASK, dim=-1), torch.tensor([1.5, 4.0, 0.0]), **TOL)


# ---- micro-batch / data-parallel invariance ------------------------------------------------------

def _batch(seed, B=7, T=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[3] = 0  # always one empty sequence
    mask = (torch.arange(T) < lengths[:, None]).float()  # (B, T) right-padded
    return torch.randn(B, T, generator=g, dtype=torch.float64), mask


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", MODES)
def test_sum_of_microbatch_losses_with_global_counts_equals_whole_batch(mode, seed):
    base, mask = _batch(seed)
    B, T = mask.shape
    # Global counts of the whole mini-batch, computed once (across ranks: all-reduce SUM them).
    num_tokens = mask.sum()
    num_seqs = (mask.sum(-1) > 0).sum()

    whole_param = base.clone().requires_grad_()
    whole = aggregate(whole_param * 1.0, mask, mode, norm_len=T)
    whole.backward()

    # Uneven micro-batches, each re-padded to its own longest sequence (dynamic padding): only the
    # global counts and a fixed norm_len keep the sum equal to the whole-batch loss.
    micro_param = base.clone().requires_grad_()
    total = 0.0
    for idx in (torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([3, 4, 5, 6])):
        t_micro = max(int(mask[idx].sum(-1).max()), 1)
        loss = aggregate(micro_param[idx, :t_micro], mask[idx, :t_micro], mode,
                         num_tokens=num_tokens, num_seqs=num_seqs, norm_len=T)
        loss.backward()  # gradient accumulation, as the trainer does
        total = total + loss.detach()

    torch.testing.assert_close(total, whole.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(micro_param.grad, whole_param.grad, rtol=1e-10, atol=1e-12)


def test_local_means_alone_are_not_invariant():
    # Sanity check that the test above is not vacuous: averaging local token-means of micro-batches
    # of unequal token counts differs from the whole-batch token-mean.
    loss, mask = LOSS[:2], MASK[:2]  # micro-batches of 2 and 1 tokens: local means 1.5 and 4
    avg_local = (aggregate(loss[:1], mask[:1], "token-mean") + aggregate(loss[1:], mask[1:], "token-mean")) / 2
    assert avg_local.item() == pytest.approx(2.75)
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(7 / 3)
