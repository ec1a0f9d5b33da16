"""MoE: routing record and replay, router weights per family, expert-load metrics and the aux loss."""

import copy
import math

import pytest
import torch

from rlcore.logprobs import response_logprobs
from rlcore.models import MOE_FAMILIES, tiny_model
from rlcore.moe import LoadStats, MoEForward, _switch_loss, topk_weights
from rollout import SamplingParams
from rollout.hf import HFEngine
from rollout.routing import routers

SHAPE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, num_experts=4,
             expert_intermediate_size=16)


def moe_model(family, seed=0):
    return tiny_model(40, family=family, seed=seed, **SHAPE).eval()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_topk_weights_match_the_routers_own(family):
    model = moe_model(family)
    hidden = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    for router in routers(model):
        logits, weights, idx = router(hidden)
        torch.testing.assert_close(topk_weights(router, logits, idx, weights.dtype), weights, rtol=0, atol=0)


def rollout(model, n=3, max_new_tokens=5):
    torch.manual_seed(0)
    engine = HFEngine(copy.deepcopy(model), eos_token_ids=[1], pad_token_id=0, mode="generate", record_routing=True)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    groups = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new_tokens))
    samples = [s for g in groups for s in g]
    prompt_ids = [p for p in prompts for _ in range(n)]
    T = max(len(s.token_ids) for s in samples)
    ids, mask = torch.zeros(len(samples), T, dtype=torch.long), torch.zeros(len(samples), T)
    for i, s in enumerate(samples):
        ids[i, : len(s.token_ids)], mask[i, : len(s.token_ids)] = torch.tensor(s.token_ids), 1.0
    return prompt_ids, ids, mask, samples


def packed_starts(prompt_ids, mask) -> list[int]:
    """Where each sequence starts in a packed training forward (rlcore.packing, the default)."""
    seq_lens = [len(p) + int(n) for p, n in zip(prompt_ids, mask.sum(-1).tolist())]
    return [sum(seq_lens[:b]) for b in range(len(seq_lens))]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_recorded_routing_is_what_a_full_forward_routes(family):
    """The engine's record (prefill + one token per decode step) lines up with the training forward:
    shape (prompt + response - 1, layers, k), and the full forward routes those tokens the same way."""
    model = moe_model(family)
    prompt_ids, ids, mask, samples = rollout(model)
    layers = len(routers(model))
    for p, s in zip(prompt_ids, samples):
        assert s.routing.shape == (len(p) + len(s.token_ids) - 1, layers, 2)
    stats = LoadStats()
    with torch.no_grad():
        response_logprobs(model, prompt_ids, ids, mask, temperature=1.0, pad_id=0,
                          moe=MoEForward(routing=[s.routing for s in samples], replay=False, aux=False, stats=stats))
    assert stats.compared == sum(s.routing.shape[0] * layers for s in samples)
    assert stats.differing / stats.compared < 0.01  # fp32, same weights: at most a rare near-tie flips


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_replay_forces_the_recorded_experts_and_keeps_router_gradients(family):
    model = moe_model(family)
    prompt_ids, ids, mask, samples = rollout(model)
    g = torch.Generator().manual_seed(1)
    # A record that differs from the model's own choice: random distinct experts per (token, layer).
    fake = [torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(s.routing.shape[0] * s.routing.shape[1])])
            .view(s.routing.shape).to(s.routing.dtype) for s in samples]
    seen = {}

    def grab(layer):
        def hook(module, args):
            seen[layer] = args[1].clone()  # experts(hidden, top_k_index, top_k_weights)
        return hook

    experts = [m.experts for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
    handles = [e.register_forward_pre_hook(grab(i)) for i, e in enumerate(experts)]
    stats = LoadStats()
    logp, _ = response_logprobs(model, prompt_ids, ids, mask, temperature=1.0, pad_id=0,
                                moe=MoEForward(routing=fake, replay=True, aux=False, stats=stats))
    for h in handles:
        h.remove()
    starts = packed_starts(prompt_ids, mask)
    for layer, used in seen.items():  # (tokens, 2): the sequences packed back to back
        for b, rec in enumerate(fake):
            m = rec.shape[0]
            assert torch.equal(used[starts[b] : starts[b] + m], rec[:, layer].long()), (layer, b)  # replayed
    assert stats.differing > 0  # the model's own routing differed from the fake record
    (logp * mask).sum().backward()
    for router in routers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_replaying_the_models_own_routing_changes_nothing(family):
    """Replay of the routing a full forward chooses itself gives bitwise the same log-probs: the forced
    layout lines up with the forward's tokens and topk_weights recomputes the router's weights."""
    model = moe_model(family)
    prompt_ids, ids, mask, samples = rollout(model)
    lengths = mask.sum(-1).long().tolist()
    own = {}
    handles = [r.register_forward_hook(lambda m, a, out, i=i: own.__setitem__(i, out[2].clone()))
               for i, r in enumerate(routers(model))]
    with torch.no_grad():
        plain, _ = response_logprobs(model, prompt_ids, ids, mask, temperature=1.0, pad_id=0)
    for h in handles:
        h.remove()
    starts = packed_starts(prompt_ids, mask)
    per_layer = [own[i] for i in sorted(own)]  # (tokens, 2) each, the sequences packed back to back
    record = [torch.stack([idx[s : s + len(p) + n - 1] for idx in per_layer], 1)
              for s, p, n in zip(starts, prompt_ids, lengths)]
    stats = LoadStats()
    with torch.no_grad():
        replayed, _ = response_logprobs(model, prompt_ids, ids, mask, temperature=1.0, pad_id=0,
                                        moe=MoEForward(routing=record, replay=True, aux=False, stats=stats))
    assert stats.differing == 0 and stats.compared > 0
    torch.testing.assert_close(replayed, plain, rtol=0, atol=0)


def test_switch_loss_hand_values():
    router = torch.nn.Linear(2, 4)  # a softmax router (no e_score_correction_bias)
    idx = torch.tensor([[0, 1], [0, 2]])
    assert _switch_loss(router, torch.zeros(2, 4), idx, 4).item() == pytest.approx(1.0)  # 4 * sum(f * 1/4)
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])).expand(2, 4)
    # f = [2/4, 1/4, 1/4, 0]: 4 * (0.5 * 0.4 + 0.25 * 0.3 + 0.25 * 0.2) = 1.3
    assert _switch_loss(router, logits, idx, 4).item() == pytest.approx(1.3, rel=1e-6)


def test_load_metrics_hand_values():
    stats = LoadStats()
    stats.counts = {0: torch.tensor([3.0, 1.0, 0.0, 0.0]), 1: torch.tensor([1.0, 1.0, 1.0, 1.0])}
    stats.differing, stats.compared = 3.0, 12.0
    m = stats.metrics()
    assert m["moe/layer_0/max_load_ratio"] == pytest.approx(3.0)  # 3 / mean 1
    assert m["moe/layer_1/max_load_ratio"] == pytest.approx(1.0)
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    assert m["moe/layer_0/usage_entropy"] == pytest.approx(h0)
    assert m["moe/layer_1/usage_entropy"] == pytest.approx(1.0)
    assert m["moe/max_load_ratio"] == pytest.approx(3.0)
    assert m["moe/usage_entropy"] == pytest.approx((h0 + 1) / 2)
    assert m["moe/routing_mismatch"] == pytest.approx(0.25)


def test_aux_loss_reaches_the_router():
    model = moe_model("qwen3_moe").train()
    prompt_ids, ids, mask, samples = rollout(model)
    moe = MoEForward(routing=None, replay=False, aux=True, stats=LoadStats())
    response_logprobs(model, prompt_ids, ids, mask, temperature=1.0, pad_id=0, moe=moe)
    assert 0 < moe.aux_loss.item() < 4  # E * sum_e f_e p_e, at most E
    moe.aux_loss.backward()
    assert all(r.weight.grad.abs().sum() > 0 for r in routers(model))
