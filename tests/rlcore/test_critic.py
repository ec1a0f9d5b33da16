"""The value model: trunk copied from the actor, values at the right positions, micro-batching invariance."""

import copy

import pytest
import torch

from rlcore.critic import Critic, build_value_model, response_values
from rlcore.models import tiny_model

PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
LENGTHS = [4, 2, 5, 1]


def policy(family="qwen2"):
    return tiny_model(40, family=family, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, seed=0)


def make_rollout():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (len(PROMPTS), max(LENGTHS)), generator=g)
    mask = (torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]).float()
    return PROMPTS, ids * mask.long(), mask


def make_critic(model, **overrides):
    kwargs = dict(lr=1e-2, warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, value_clip=10.0,
                  aggregation="token-mean", max_tokens_per_microbatch=1000, seqs_per_minibatch=4, pad_id=0)
    return Critic(model, **{**kwargs, **overrides})


@pytest.fixture()
def value_model():
    torch.manual_seed(0)
    vm = build_value_model(policy())
    with torch.no_grad():  # a non-zero head, so the position checks mean something
        vm.score.weight.normal_()
        vm.score.bias.fill_(0.3)
    return vm


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_build_value_model_copies_trunk_and_starts_at_zero(family):
    pol = policy(family)
    vm = build_value_model(pol)
    trunk = dict(vm.base_model.named_parameters())
    for name, p in pol.base_model.named_parameters():
        assert torch.equal(trunk[name], p) and trunk[name].data_ptr() != p.data_ptr()  # a copy, not shared
    assert vm.dtype == pol.dtype and vm.config is not pol.config and pol.config.num_labels != 1
    prompts, ids, mask = make_rollout()
    vm.train()  # no dropout in the head even in train mode
    assert (response_values(vm, prompts, ids, mask, pad_id=0) == 0).all()
    with torch.no_grad():
        hidden = vm(input_ids=torch.tensor([[3, 4, 5]])).logits
    assert hidden.shape == (1, 3, 1) and (hidden == 0).all()


def test_response_values_match_full_forward(value_model):
    prompts, ids, mask = make_rollout()
    with torch.no_grad():
        values = response_values(value_model, prompts, ids, mask, pad_id=0)
    assert values.shape == mask.shape
    for i, n in enumerate(LENGTHS):
        seq = torch.tensor(prompts[i] + ids[i, :n].tolist())[None]
        with torch.no_grad():
            out = value_model(input_ids=seq).logits[0, :, 0]
        p = len(prompts[i])
        torch.testing.assert_close(values[i, :n], out[p - 1 : p - 1 + n], rtol=1e-5, atol=1e-5)  # V before token t
        assert (values[i, n:] == 0).all()


def test_values_microbatched_equal_single_batch(value_model):
    prompts, ids, mask = make_rollout()
    critic = make_critic(value_model, max_tokens_per_microbatch=6)
    with torch.no_grad():
        full = response_values(value_model, prompts, ids, mask, pad_id=0)
    torch.testing.assert_close(critic.values(prompts, ids, mask), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_update_gradient_invariant_to_microbatch_size(value_model, agg):
    prompts, ids, mask = make_rollout()
    g = torch.Generator().manual_seed(1)
    returns = torch.randn(mask.shape, generator=g) * mask
    shift = 0.5 * torch.randn(mask.shape, generator=g) * mask  # |v - v_old| > clip: some tokens clipped
    grads = []
    for max_tokens in (1000, 7):  # one micro-batch vs several
        m = copy.deepcopy(value_model)
        critic = make_critic(m, aggregation=agg, max_tokens_per_microbatch=max_tokens, value_clip=0.2)
        old = critic.values(prompts, ids, mask) + shift
        critic.optimizer.param_groups[0]["lr"] = 0.0  # the step leaves weights (and .grad) as they are
        metrics = critic.update(prompts, ids, mask, returns, old)
        grads.append((torch.cat([p.grad.flatten() for p in m.parameters()]), metrics))
    scale = grads[0][0].abs().max()  # float32 accumulation order differs: compare relative to the gradient scale
    torch.testing.assert_close(grads[1][0] / scale, grads[0][0] / scale, rtol=1e-5, atol=1e-6)
    assert 0 < grads[0][1]["critic/vf_clipfrac"] < 1
    for key in ("value_loss", "vf_clipfrac", "value_mean", "grad_norm", "explained_variance"):
        assert grads[0][1][f"critic/{key}"] == pytest.approx(grads[1][1][f"critic/{key}"], rel=1e-5, abs=1e-6)


def test_update_moves_values_toward_returns():
    vm = build_value_model(policy())
    prompts, ids, mask = make_rollout()
    returns = torch.tensor([1.0, -1.0, 0.5, 2.0])[:, None] * mask
    critic = make_critic(vm, lr=1e-2, max_grad_norm=1.0, seqs_per_minibatch=2)
    losses = []
    for _ in range(3):
        old = critic.values(prompts, ids, mask)
        metrics = critic.update(prompts, ids, mask, returns, old, epochs=2, minibatches=2)
        losses.append(metrics["critic/value_loss"])
    assert losses[-1] < 0.5 * losses[0]
    assert metrics["critic/explained_variance"] > 0 and metrics["critic/lr"] == pytest.approx(1e-2)
    assert metrics["critic/vf_clipfrac"] == 0.0  # value_clip=10 never binds here


def test_value_clip_binds_when_old_values_are_far():
    vm = build_value_model(policy())  # V ≡ 0 at the start
    prompts, ids, mask = make_rollout()
    returns = 1.0 * mask
    old = -5.0 * mask  # clipped prediction stays near -5, far worse than v = 0: the clipped term wins
    metrics = make_critic(vm, value_clip=1e-3).update(prompts, ids, mask, returns, old)
    assert metrics["critic/vf_clipfrac"] == pytest.approx(1.0)
    # v = 0 is clamped to -5 + 1e-3: loss = 0.5 · (−4.999 − 1)² on every token
    assert metrics["critic/value_loss"] == pytest.approx(0.5 * (1 + 5 - 1e-3) ** 2, rel=1e-5)
    assert metrics["critic/grad_norm"] == 0.0  # every token clipped: no gradient


def test_critic_starts_from_a_saved_reward_model(tmp_path):
    """critic.path may point at an outcome reward model (sequence classification, one label): its
    trunk and score head load into the token-level value model under the same names."""
    from transformers import AutoModelForSequenceClassification

    from rlcore.critic import load_value_model

    policy = tiny_model(40, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    config = policy.config
    config.num_labels = 1
    torch.manual_seed(3)
    orm = AutoModelForSequenceClassification.from_config(config)
    orm.save_pretrained(tmp_path)
    value = load_value_model(str(tmp_path))
    torch.testing.assert_close(value.score.weight, orm.score.weight)
    torch.testing.assert_close(value.model.embed_tokens.weight, orm.model.embed_tokens.weight)


def test_nonfinite_critic_update_is_skipped_and_counted():
    from rlcore.guard import NonFiniteError

    vm = build_value_model(policy())
    critic = make_critic(vm, max_nonfinite_updates=2)
    prompts, ids, mask = make_rollout()
    returns = torch.ones(mask.shape) * mask
    returns[1, 0] = float("inf")
    before = copy.deepcopy(vm.state_dict())
    metrics = critic.update(prompts, ids, mask, returns, torch.zeros(mask.shape))
    assert metrics["critic/skipped_steps"] == 1.0
    for name, value in vm.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(NonFiniteError, match="2 critic updates in a row.*critic.lr"):
        critic.update(prompts, ids, mask, returns, torch.zeros(mask.shape))
