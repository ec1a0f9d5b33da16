"""Response log-probs against a plain forward pass, and micro-batching invariance of the update."""

import copy

import pytest
import torch

from rlcore.actor import Actor
from rlcore.batch import RolloutBatch, TrainBatch, split_by_tokens
from rlcore.config import RLConfig
from rlcore.logprobs import response_logprobs
from rlcore.models import tiny_model
from rollout import Sample


@pytest.fixture()
def model():
    return tiny_model(40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, seed=0)


def make_batch():
    g = torch.Generator().manual_seed(0)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    samples = []
    for n in ([4, 2], [1, 5], [3, 3]):
        samples.append([Sample(torch.randint(2, 40, (k,), generator=g).tolist(), [-1.0] * k, "length") for k in n])
    return RolloutBatch.from_samples(prompts, samples)


def test_rollout_batch_layout():
    b = make_batch()
    assert b.response_ids.shape == (6, 5) and b.mask.sum(-1).tolist() == [4, 2, 1, 5, 3, 3]
    assert b.group_ids.tolist() == [0, 0, 1, 1, 2, 2] and b.prompt_ids[2] == [6, 7]


def test_response_logprobs_match_full_forward(model):
    b, temperature = make_batch(), 0.7
    logp, ent = response_logprobs(model, b.prompt_ids, b.response_ids, b.mask, temperature=temperature, pad_id=0,
                                  with_entropy=True)
    for i in range(len(b)):
        n = int(b.mask[i].sum())
        seq = torch.tensor(b.prompt_ids[i] + b.response_ids[i, :n].tolist())[None]
        logits = model(input_ids=seq).logits[0].float() / temperature
        p = len(b.prompt_ids[i])
        ref = torch.log_softmax(logits[p - 1 : p - 1 + n], -1)  # logits at p+t-1 score response token t
        expected = ref.gather(-1, b.response_ids[i, :n, None])[:, 0]
        torch.testing.assert_close(logp[i, :n], expected, rtol=1e-5, atol=1e-5)
        expected_ent = -(ref.exp() * ref).sum(-1)
        torch.testing.assert_close(ent[i, :n], expected_ent, rtol=1e-4, atol=1e-5)
        assert (logp[i, n:] == 0).all()


def test_split_by_tokens_respects_budget():
    lengths = [9, 3, 7, 2, 8, 1]
    batches = split_by_tokens(lengths, 16)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(max(lengths[i] for i in b) * len(b) <= 16 for b in batches)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_update_gradient_invariant_to_microbatch_size(model, agg):
    b = make_batch()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])[:, None] * b.mask
    with torch.no_grad():
        old, _ = response_logprobs(model, b.prompt_ids, b.response_ids, b.mask, temperature=1.0, pad_id=0)
    batch = TrainBatch(b.prompt_ids, b.response_ids, b.mask, old - 0.1 * b.mask, None, advantages)
    grads = []
    for max_tokens in (1000, 9):  # one micro-batch vs several
        cfg = RLConfig()
        cfg.algo.aggregation, cfg.train.max_tokens_per_microbatch, cfg.train.max_grad_norm = agg, max_tokens, 0.0
        cfg.rollout.max_new_tokens = 5
        m = copy.deepcopy(model)
        actor = Actor(m, cfg, pad_id=0, seqs_per_minibatch=len(batch))
        actor.optimizer.param_groups[0]["lr"] = 0.0  # the step leaves weights (and .grad) as they are
        metrics = actor._minibatch_step(batch)
        grads.append((torch.cat([p.grad.flatten() for p in m.parameters()]), metrics))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for key in ("pg_loss", "clipfrac", "entropy", "grad_norm"):
        assert grads[0][1][key] == pytest.approx(grads[1][1][key], rel=1e-5, abs=1e-6)


def test_update_raises_logprob_of_advantaged_tokens(model):
    b = make_batch()
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])[:, None] * b.mask
    with torch.no_grad():
        old, _ = response_logprobs(model, b.prompt_ids, b.response_ids, b.mask, temperature=1.0, pad_id=0)
    cfg = RLConfig()
    cfg.train.lr = 1e-2
    actor = Actor(model, cfg, pad_id=0, seqs_per_minibatch=6)
    _, record = actor.update(TrainBatch(b.prompt_ids, b.response_ids, b.mask, old, None, advantages))
    assert record is None  # old log-probs given: nothing recorded
    with torch.no_grad():
        new, _ = response_logprobs(model, b.prompt_ids, b.response_ids, b.mask, temperature=1.0, pad_id=0)
    delta = ((new - old) * b.mask).sum(-1)
    assert (delta[0::2] > 0).all() and (delta[1::2] < 0).all()


@pytest.mark.parametrize("loss", ["vanilla", "gspo"])
def test_on_policy_update_without_old_logprobs_equals_explicit_old(model, loss):
    """Skipping the old-log-prob forward (exactly on-policy) changes nothing: same gradient, same step,
    and the recorded log-probs are those a separate no-grad forward gives, in rollout order."""
    b = make_batch()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])[:, None] * b.mask
    cfg = RLConfig()
    cfg.algo.policy_loss.name = loss
    cfg.train.max_tokens_per_microbatch = 9  # several micro-batches, reordered longest first
    with torch.no_grad():
        old, _ = response_logprobs(model, b.prompt_ids, b.response_ids, b.mask, temperature=1.0, pad_id=0)
    results = []
    for given in (old, None):
        m = copy.deepcopy(model)
        actor = Actor(m, cfg, pad_id=0, seqs_per_minibatch=len(b))
        metrics, record = actor.update(TrainBatch(b.prompt_ids, b.response_ids, b.mask, given, None, advantages))
        results.append((torch.cat([p.detach().flatten() for p in m.parameters()]), metrics, record))
    (params_a, metrics_a, rec_a), (params_b, metrics_b, rec_b) = results
    assert rec_a is None
    torch.testing.assert_close(rec_b, old, rtol=0, atol=1e-6)
    assert (rec_b * (1 - b.mask) == 0).all()
    torch.testing.assert_close(params_b, params_a, rtol=1e-6, atol=1e-7)
    for key in ("pg_loss", "grad_norm", "entropy"):
        assert metrics_b[f"actor/{key}"] == pytest.approx(metrics_a[f"actor/{key}"], rel=1e-5, abs=1e-7)


def test_old_logprobs_required_when_not_on_policy(model):
    b = make_batch()
    cfg = RLConfig()
    actor = Actor(model, cfg, pad_id=0, seqs_per_minibatch=3)  # two mini-batches
    with pytest.raises(ValueError, match="on-policy"):
        actor.update(TrainBatch(b.prompt_ids, b.response_ids, b.mask, None, None, torch.zeros_like(b.mask)))


def test_entropy_outside_graph_has_same_value_and_no_grad(model):
    b = make_batch()
    _, ent_graph = response_logprobs(model, b.prompt_ids, b.response_ids, b.mask, temperature=1.0, pad_id=0,
                                     with_entropy=True)
    logp, ent_free = response_logprobs(model, b.prompt_ids, b.response_ids, b.mask, temperature=1.0, pad_id=0,
                                       with_entropy=True, entropy_grad=False)
    assert ent_graph.requires_grad and not ent_free.requires_grad and logp.requires_grad
    torch.testing.assert_close(ent_free, ent_graph.detach(), rtol=0, atol=0)


def test_nonfinite_update_is_skipped_counted_and_stops_after_a_few_in_a_row(model):
    """A NaN advantage makes the loss and gradient NaN: the step is skipped (weights, AdamW state and the
    schedule untouched) and counted; train.max_nonfinite_updates in a row stop the run, naming the RL
    step and the last finite update. A finite update in between resets the count."""
    from rlcore.guard import NonFiniteError

    b = make_batch()
    good_adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])[:, None] * b.mask
    bad_adv = good_adv.clone()
    bad_adv[0, 0] = float("nan")

    def batch(adv):
        return TrainBatch(b.prompt_ids, b.response_ids, b.mask, None, None, adv)

    cfg = RLConfig()
    cfg.train.max_nonfinite_updates, cfg.train.lr = 2, 1e-2
    actor = Actor(model, cfg, pad_id=0, seqs_per_minibatch=len(b))
    actor.guard.rl_step = 1
    metrics, _ = actor.update(batch(good_adv))
    assert metrics["actor/skipped_steps"] == 0.0
    before = copy.deepcopy(model.state_dict())
    adam_before = copy.deepcopy(actor.optimizer.state_dict())
    actor.guard.rl_step = 2
    metrics, _ = actor.update(batch(bad_adv))
    assert metrics["actor/skipped_steps"] == 1.0 and metrics["actor/grad_norm"] != metrics["actor/grad_norm"]  # NaN
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    state = actor.optimizer.state_dict()["state"]
    assert all(float(s["step"]) == float(adam_before["state"][k]["step"]) for k, s in state.items())
    assert actor.scheduler.last_epoch == 1 and all(p.grad is None for p in model.parameters())
    actor.guard.rl_step = 3
    actor.update(batch(good_adv))  # a finite update resets the count
    actor.guard.rl_step = 4
    actor.update(batch(bad_adv))
    actor.guard.rl_step = 5
    with pytest.raises(NonFiniteError) as e:
        actor.update(batch(bad_adv))
    msg = str(e.value)
    assert "RL step 5" in msg and "2 actor updates in a row" in msg and "last finite one was at RL step 3" in msg
    assert "train.lr" in msg
