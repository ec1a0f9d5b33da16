"""Registry gate (STYLE.md §22): every registered key has a numeric check, called the way the
trainer calls it (uniform keyword signature per axis). Plus register/lookup behaviour."""

import pytest
import torch

from algos import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, lookup, register

TABLES = {"advantages": ADVANTAGES, "policy_losses": POLICY_LOSSES, "kl_estimators": KL_ESTIMATORS,
          "aggregations": AGGREGATIONS}
REGISTERED = [(axis, name) for axis, table in TABLES.items() for name in sorted(table)]


def _approx(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


# ---- one numeric check per registered key --------------------------------------------------------
# Shared inputs: one group of four, r = [1,0,0,0] (spec §10), T = 2 with the last row half-masked.
SCORES, IDS = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([8, 8, 8, 8])
ADV_MASK = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])


def check_grpo(fn):
    # mean 0.25, unbiased std 0.5: A = 0.75/0.500001 = 1.499997, −0.25/0.500001 = −0.499999.
    adv = fn(scores=SCORES, group_ids=IDS, mask=ADV_MASK, eps=1e-6)
    _approx(adv, [[1.499997] * 2, [-0.499999] * 2, [-0.499999] * 2, [-0.499999, 0.0]])


def check_drgrpo(fn):
    # A = r − 0.25, no std division.
    adv = fn(scores=SCORES, group_ids=IDS, mask=ADV_MASK)
    _approx(adv, [[0.75] * 2, [-0.25] * 2, [-0.25] * 2, [-0.25, 0.0]])


def check_rloo(fn):
    # Leave-one-out: 1 − mean(0,0,0) = 1; 0 − mean(1,0,0) = −1/3 (= 4/3 · (r − 0.25)).
    adv = fn(scores=SCORES, group_ids=IDS, mask=ADV_MASK)
    _approx(adv, [[1.0] * 2, [-1 / 3] * 2, [-1 / 3] * 2, [-1 / 3, 0.0]])


def check_reinforce_pp(fn):
    # scores [1, 0], lengths [2, 1] -> return-to-go [1, 1] and [0]; masked values {1, 1, 0}: mean 2/3,
    # unbiased var ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3 -> whitened 1/3 / sqrt(1/3) = 0.57735, -2/3 / sqrt(1/3) = -1.154701.
    adv = fn(scores=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]), mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.577350, 0.577350], [-1.154701, 0.0]]), rtol=1e-5, atol=1e-6)


def check_vanilla(fn):
    # ρ = [e, 1/e], A = [1, −1], ε = 0.2: losses max(−e, −1.2) = −1.2 and max(1/e, 0.8) = 0.8;
    # token-mean = −0.2, both tokens clipped.
    logp = torch.tensor([[1.0, -1.0]])
    loss, metrics = fn(logprobs=logp, old_logprobs=torch.zeros(1, 2), advantages=torch.tensor([[1.0, -1.0]]),
                       mask=torch.ones(1, 2), clip_low=0.2, clip_high=0.2)
    _approx(loss, -0.2)
    assert metrics["clipfrac"] == pytest.approx(1.0)


def check_gspo(fn):
    # One sequence, d = [1, −0.6]: s = e^0.2 = 1.221403 > 1.2. A = 1: max(−1.221403, −1.2) = −1.2 (clipped);
    # A = −1: max(1.221403, 1.2) = 1.221403. seq-mean-token-mean = (−1.2 + 1.221403)/2 = 0.010701; clipfrac 1/2.
    loss, metrics = fn(logprobs=torch.tensor([[1.0, -0.6]]), old_logprobs=torch.zeros(1, 2),
                       advantages=torch.tensor([[1.0, -1.0]]), mask=torch.ones(1, 2), clip_low=0.2, clip_high=0.2)
    _approx(loss, 0.0107014)
    assert metrics["clipfrac"] == pytest.approx(0.5)


# KL at p = 0.5, p_ref = 0.4 (spec §10).
KL_LOGP, KL_REF = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.4]]))


def check_k1(fn):
    _approx(fn(KL_LOGP, KL_REF), [[0.223144]])  # ln 1.25


def check_k2(fn):
    _approx(fn(KL_LOGP, KL_REF), [[0.024897]])  # 0.5 · ln²1.25


def check_k3(fn):
    _approx(fn(KL_LOGP, KL_REF), [[0.023144]])  # 0.8 + ln 1.25 − 1


# loss [[1,2,3],[4,5,6]], mask [[1,1,0],[1,0,0]]: Σ l·m = 7 over 3 tokens, per-seq sums [3, 4], L = [2, 1].
AGG_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def check_token_mean(fn):
    _approx(fn(AGG_LOSS, AGG_MASK), 7 / 3)


def check_seq_mean_token_sum(fn):
    _approx(fn(AGG_LOSS, AGG_MASK), (3 + 4) / 2)


def check_seq_mean_token_mean(fn):
    _approx(fn(AGG_LOSS, AGG_MASK), (3 / 2 + 4 / 1) / 2)


def check_seq_mean_token_sum_norm(fn):
    _approx(fn(AGG_LOSS, AGG_MASK), 7 / (2 * 3))  # 2 sequences x K = T = 3
    _approx(fn(AGG_LOSS, AGG_MASK, norm_len=7), 0.5)  # 7 / (2 x 7)
    _approx(fn(AGG_LOSS, AGG_MASK, num_seqs=7, norm_len=7), 1 / 7)  # global sequence count


CHECKS = {
    ("advantages", "grpo"): check_grpo,
    ("advantages", "drgrpo"): check_drgrpo,
    ("advantages", "rloo"): check_rloo,
    ("advantages", "reinforce_pp"): check_reinforce_pp,
    ("policy_losses", "vanilla"): check_vanilla,
    ("policy_losses", "gspo"): check_gspo,
    ("kl_estimators", "k1"): check_k1,
    ("kl_estimators", "k2"): check_k2,
    ("kl_estimators", "k3"): check_k3,
    ("aggregations", "token-mean"): check_token_mean,
    ("aggregations", "seq-mean-token-sum"): check_seq_mean_token_sum,
    ("aggregations", "seq-mean-token-mean"): check_seq_mean_token_mean,
    ("aggregations", "seq-mean-token-sum-norm"): check_seq_mean_token_sum_norm,
}


@pytest.mark.parametrize("axis, name", REGISTERED, ids=[f"{a}:{n}" for a, n in REGISTERED])
def test_every_registered_key_has_a_numeric_check(axis, name):
    assert (axis, name) in CHECKS, f"{axis} entry {name!r} is registered but has no numeric test in CHECKS"
    CHECKS[(axis, name)](TABLES[axis][name])


def test_no_check_for_an_unregistered_key():
    assert set(CHECKS) == set(REGISTERED)


# ---- register / lookup ---------------------------------------------------------------------------

def test_register_adds_and_returns_function():
    table = {}

    @register(table, "x")
    def f():
        return 1

    assert table == {"x": f} and f() == 1


def test_duplicate_registration_raises():
    table = {}
    register(table, "x")(lambda: 1)
    with pytest.raises(ValueError, match="'x' is already registered"):
        register(table, "x")(lambda: 2)
    assert table["x"]() == 1
    # Also for the real tables: the existing entry survives.
    before = ADVANTAGES["grpo"]
    with pytest.raises(ValueError):
        register(ADVANTAGES, "grpo")(lambda **kw: None)
    assert ADVANTAGES["grpo"] is before


def test_lookup_unknown_key_lists_valid_keys():
    assert lookup(KL_ESTIMATORS, "k3", "kl estimator") is KL_ESTIMATORS["k3"]
    with pytest.raises(KeyError, match=r"unknown advantage estimator 'gae'; valid: \['drgrpo', 'grpo'\]"):
        lookup({"grpo": 0, "drgrpo": 1}, "gae", "advantage estimator")
    with pytest.raises(KeyError) as err:
        lookup(POLICY_LOSSES, "nope", "policy loss")
    assert all(repr(name) in str(err.value) for name in POLICY_LOSSES)
