"""Packed (padding-free) training forwards equal the padded ones: log-probs, entropies, values, losses and
every gradient, for dense and MoE models, with gradient checkpointing and LoRA; and the pieces they use
(bucketed attention, the layout, token-balanced micro-batches)."""

import copy

import pytest
import torch

from rlcore import packing
from rlcore.actor import Actor
from rlcore.batch import TrainBatch, balance_by_tokens, response_lengths
from rlcore.config import LoraConfig, RLConfig
from rlcore.critic import build_value_model, response_values
from rlcore.logprobs import response_logprobs
from rlcore.lora import apply_lora
from rlcore.models import tiny_model
from rlcore.moe import LoadStats, MoEForward
from rollout.routing import routers

V = 40
SHAPE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def rollout():
    """4 rows of different prompt and response lengths; row 1 has an untrained (mask 0) token inside its
    response, as a tool output would, and row 3 ends in two untrained tokens."""
    g = torch.Generator().manual_seed(0)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
    lengths = torch.tensor([6, 4, 2, 5])
    mask = (torch.arange(6)[None] < lengths[:, None]).float()
    mask[1, 1] = 0.0
    mask[3, 3:] = 0.0
    return prompts, torch.randint(2, V, (4, 6), generator=g) * (mask > 0).long(), mask, lengths


def scored(model, packed, *, moe=None, params=None):
    """log-probs, entropies and the gradient of a loss that weights every scored token differently."""
    prompts, ids, mask, lengths = rollout()
    model.zero_grad()
    logp, ent = response_logprobs(model, prompts, ids, mask, temperature=0.7, pad_id=0, with_entropy=True, moe=moe,
                                  lengths=lengths, packed=packed)
    weights = torch.linspace(0.5, 1.5, mask.numel()).view(mask.shape)
    ((logp * weights).sum() + 0.1 * (ent * weights).sum()).backward()
    named = params if params is not None else dict(model.named_parameters())
    grads = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


def assert_same(a, b, atol=1e-5):
    (logp_a, ent_a, g_a), (logp_b, ent_b, g_b) = a, b
    torch.testing.assert_close(logp_a, logp_b, rtol=1e-5, atol=atol)
    torch.testing.assert_close(ent_a, ent_b, rtol=1e-5, atol=atol)
    assert g_a.keys() == g_b.keys() and g_a
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_packed_equals_padded_dense(family):
    model = tiny_model(V, family=family, seed=0, **SHAPE)
    padded, packed = scored(model, False), scored(model, True)
    assert_same(padded, packed)
    assert (packed[0][1, 1] == 0) and (packed[0][1, 2] != 0)  # the untrained token is skipped, the next scored


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_packed_equals_padded_moe_with_routing_replay(family):
    """Replayed routes land on the right tokens in the packed layout: recorded routes (here a random
    record, so that forcing them matters) give the same log-probs, gradients and expert counts."""
    model = tiny_model(V, family=family, seed=0, num_experts=4, expert_intermediate_size=16,
                       **(SHAPE | {"intermediate_size": 48}))
    prompts, _, _, lengths = rollout()
    g = torch.Generator().manual_seed(2)
    layers = len(routers(model))
    record = [torch.stack([torch.randperm(4, generator=g)[:2] for _ in range((len(p) + n - 1) * layers)])
              .view(len(p) + n - 1, layers, 2).to(torch.int16) for p, n in zip(prompts, lengths.tolist())]
    results, stats = [], []
    for packed in (False, True):
        s = LoadStats()
        results.append(scored(model, packed, moe=MoEForward(routing=record, replay=True, aux=False, stats=s)))
        stats.append(s)
    assert_same(*results)
    assert stats[0].compared == stats[1].compared > 0 and stats[0].differing == stats[1].differing
    for layer, counts in stats[0].counts.items():
        assert torch.equal(counts, stats[1].counts[layer]), layer


def test_packed_with_gradient_checkpointing_equals_padded():
    """The recompute in backward sees the packing metadata again (it travels as a forward kwarg)."""
    model = tiny_model(V, seed=0, **SHAPE)
    padded = scored(model, False)
    model.gradient_checkpointing_enable()
    model.train()
    packed = scored(model, True)
    assert model.model.layers[0].gradient_checkpointing
    assert_same(padded, packed)


def test_packed_with_lora_equals_padded():
    base = tiny_model(V, seed=0, **SHAPE)
    model = apply_lora(base, LoraConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert_same(scored(model, False, params=adapters), scored(model, True, params=adapters))


def test_packed_values_equal_padded():
    vm = build_value_model(tiny_model(V, seed=0, **SHAPE))
    with torch.no_grad():
        vm.score.weight.normal_(generator=torch.Generator().manual_seed(3))
    prompts, ids, mask, lengths = rollout()
    out = []
    for packed in (False, True):
        vm.zero_grad()
        values = response_values(vm, prompts, ids, mask, pad_id=0, lengths=lengths, packed=packed)
        (values * torch.linspace(-1, 1, mask.numel()).view(mask.shape)).sum().backward()
        out.append((values.detach(), {n: p.grad.clone() for n, p in vm.named_parameters()}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    assert (out[1][0] * (1 - mask) == 0).all() and (out[1][0][mask > 0] != 0).all()
    for name, grad in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_actor_update_packed_equals_padded(agg):
    """The whole update (micro-batches, every loss term, the accumulated gradient) packed and padded."""
    prompts, ids, mask, lengths = rollout()
    model = tiny_model(V, seed=0, **SHAPE)
    with torch.no_grad():
        old, _ = response_logprobs(model, prompts, ids, mask, temperature=1.0, pad_id=0, lengths=lengths)
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0])[:, None] * mask
    batch = TrainBatch(prompts, ids, mask, old - 0.1 * mask, None, advantages, lengths=lengths)
    results = []
    for packing_on in (False, True):
        cfg = RLConfig()
        cfg.algo.aggregation, cfg.algo.entropy_coef = agg, 0.01
        # lr 0: the step leaves weights and .grad as they are (Adam's first step would turn a near-zero
        # gradient element's last-bit difference into a visible one)
        cfg.train.packing, cfg.train.max_tokens_per_microbatch, cfg.train.lr = packing_on, 12, 0.0
        cfg.rollout.max_new_tokens = 6
        m = copy.deepcopy(model)
        actor = Actor(m, cfg, pad_id=0, seqs_per_minibatch=len(batch))
        assert actor.packed == packing_on
        metrics, _ = actor.update(batch)
        results.append((torch.cat([p.grad.flatten() for p in m.parameters()]), metrics))
    (grads_a, metrics_a), (grads_b, metrics_b) = results
    scale = grads_a.abs().max()  # fp32 sums in another order: compare relative to the gradient's scale
    torch.testing.assert_close(grads_b / scale, grads_a / scale, rtol=1e-5, atol=1e-6)
    for key in ("pg_loss", "grad_norm", "entropy", "clipfrac"):
        assert metrics_b[f"actor/{key}"] == pytest.approx(metrics_a[f"actor/{key}"], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])  # one bucket, some, one per distinct length
def test_bucketed_attention_equals_attention_per_sequence(monkeypatch, ratio):
    """The CPU packed attention (the varlen kernel's stand-in) against causal sdpa on each sequence alone,
    with grouped-query heads, forward and backward."""
    monkeypatch.setattr(packing, "BUCKET_MIN_RATIO", ratio)
    lengths = [7, 1, 4, 7, 3, 5]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lengths), 4, 8, generator=g, requires_grad=True)
    k = torch.randn(sum(lengths), 2, 8, generator=g, requires_grad=True)
    v = torch.randn(sum(lengths), 2, 8, generator=g, requires_grad=True)
    seqs = packing.PackedSeqs(lengths, torch.device("cpu"))
    out = packing.bucketed_attention(q, k, v, seqs, scaling=0.3, dropout=0.0)
    expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[s : s + n].transpose(0, 1), k[s : s + n].transpose(0, 1).repeat_interleave(2, 0),
        v[s : s + n].transpose(0, 1).repeat_interleave(2, 0), is_causal=True, scale=0.3).transpose(0, 1)
        for s, n in zip(seqs.starts, lengths)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * w).sum(), (q, k, v))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plans, _ = seqs.buckets
    assert sum(n for _, n, _ in plans) == len(lengths)
    # longest first 7 7 5 4 3 1: one bucket; (7 7 5 4) (3) (1) down to half the longest; (7 7) (5) (4) (3) (1)
    assert len(plans) == {0.0: 1, 0.5: 3, 1.0: 5}[ratio]


def test_layout_for_the_varlen_kernels():
    """What the GPU kernels get (checked here on CPU): cumulative lengths, positions restarting at 0 per
    sequence, no padding, and for flash_attention_* models transformers' own varlen kwargs."""
    prompts, ids, mask, lengths = rollout()
    seq_lens = [len(p) + n for p, n in zip(prompts, lengths.tolist())]  # 9, 6, 6, 6
    layout = packing.build_layout(prompts, ids, lengths.tolist(), pad_id=0, packed=True,
                                  attn_impl="flash_attention_2")
    cu = torch.tensor([0, 9, 15, 21, 27], dtype=torch.int32)
    kw = layout.forward_kwargs
    assert kw["attention_mask"] is None and torch.equal(kw["cu_seq_lens_q"], cu) and kw["max_length_q"] == 9
    assert torch.equal(kw["position_ids"][0], torch.cat([torch.arange(n) for n in seq_lens]))
    assert layout.input_ids.shape == (1, 27) and layout.starts == [0, 9, 15, 21]
    assert layout.input_ids[0, 15:21].tolist() == prompts[2] + ids[2, :2].tolist()
    sdpa = packing.build_layout(prompts, ids, lengths.tolist(), pad_id=0, packed=True)
    assert torch.equal(sdpa.forward_kwargs[packing.PACKED_KWARG].cu_seqlens, cu)
    # row 1 starts at 9 with a prompt of 2 and 4 response tokens: token t scored at 9 + 1 + t, clamped after
    assert sdpa.pos[1].tolist() == [10, 11, 12, 13, 13, 13]


def test_response_lengths_and_select_keep_untrained_tokens_inside():
    mask = torch.tensor([[1.0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    assert response_lengths(mask).tolist() == [3, 2, 0]
    batch = TrainBatch([[1], [2], [3]], torch.ones(3, 4, dtype=torch.long), mask, None, None, mask)
    assert batch.select([0, 2]).mask.shape == (2, 3)  # mask.sum would have cut row 0 to 2 tokens
    given = TrainBatch([[1], [2], [3]], torch.ones(3, 4, dtype=torch.long), mask, None, None, mask,
                       lengths=torch.tensor([4, 2, 1]))
    assert given.select([0, 1]).mask.shape == (2, 4) and given.select([1, 2]).lengths.tolist() == [2, 1]


def test_balance_by_tokens():
    lengths = [30, 3, 17, 9, 22, 5, 12, 28, 8, 14]  # 148 tokens
    parts = balance_by_tokens(lengths, 50)
    assert sorted(i for p in parts for i in p) == list(range(10))
    sums = sorted(sum(lengths[i] for i in p) for p in parts)
    assert len(parts) == 3 and sums[-1] <= 50 and sums[-1] - sums[0] <= 3  # 148 / 3 = 49.3
    assert len(balance_by_tokens(lengths, 50, num_parts=5)) == 5
    assert balance_by_tokens([40, 40, 40], 50) == [[0], [1], [2]]  # never two rows over the budget
    assert balance_by_tokens([60, 5], 50) == [[0], [1]]  # an over-long row alone


def test_rows_spread_over_ranks_by_tokens():
    """rlcore.balance: every rank keeps its row count, the tokens per rank even out, every row goes once."""
    from rlcore.balance import assign_rows

    lengths = [[40, 35, 30, 28], [5, 4, 3, 2], [20, 18, 9, 1]]  # 133, 14 and 48 tokens as generated
    assignment = assign_rows(lengths)
    assert [len(a) for a in assignment] == [4, 4, 4]
    assert sorted(p for a in assignment for p in a) == [(r, i) for r in range(3) for i in range(4)]
    tokens = [sum(lengths[r][i] for r, i in a) for a in assignment]
    assert max(tokens) - min(tokens) <= 6 and sum(tokens) == 195  # 65 each at best
