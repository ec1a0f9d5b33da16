"""rlcore.logprobs: the chunked, recomputed LM head gives the full-logits log-probs, entropies and
gradients, and keeps no (tokens x vocab) tensor for backward."""

import pytest
import torch

import rlcore.logprobs as lp
from rlcore.models import tiny_model

V = 509  # a vocabulary size no other dimension of the model shares


def batch():
    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    lengths = torch.tensor([6, 3, 5])
    mask = (torch.arange(6)[None] < lengths[:, None]).float()
    return prompts, torch.randint(2, V, (3, 6), generator=g) * mask.long(), mask


def reference(model, prompts, responses, mask, temperature):
    """Full logits of every position, log-softmax, then the response tokens (no chunking, no recompute)."""
    logp, ent = torch.zeros(mask.shape), torch.zeros(mask.shape)
    for b, p in enumerate(prompts):
        n = int(mask[b].sum())
        ids = torch.tensor([p + responses[b, :n].tolist()])
        z = model(input_ids=ids).logits[0, len(p) - 1 : len(p) - 1 + n].float() / temperature
        logp[b, :n] = torch.log_softmax(z, -1).gather(-1, responses[b, :n, None])[:, 0]
        ent[b, :n] = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    return logp, ent


@pytest.mark.parametrize("chunk", [4, 4096])  # several chunks, one chunk
def test_chunked_recomputed_head_equals_full_logits_with_gradients(monkeypatch, chunk):
    monkeypatch.setattr(lp, "HEAD_CHUNK_TOKENS", chunk)
    model = tiny_model(V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, seed=0)
    prompts, responses, mask = batch()
    grads = []
    for fn in (lambda: lp.response_logprobs(model, prompts, responses, mask, temperature=0.7, pad_id=0,
                                            with_entropy=True),
               lambda: reference(model, prompts, responses, mask, 0.7)):
        model.zero_grad()
        logp, ent = fn()
        ((logp * mask).sum() + 0.1 * (ent * mask).sum()).backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()}, logp.detach(), ent.detach()))
    (g, logp, ent), (g_ref, logp_ref, ent_ref) = grads
    torch.testing.assert_close(logp * mask, logp_ref * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent * mask, ent_ref * mask, atol=1e-5, rtol=1e-5)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk, kept", [(4, False), (4096, True)])
def test_several_chunks_keep_no_vocabulary_sized_tensor_for_backward(monkeypatch, chunk, kept):
    """Several chunks (14 tokens in chunks of 4): recomputed in backward, nothing of vocabulary size
    saved. One chunk: kept as is (recomputing it would lower no peak)."""
    monkeypatch.setattr(lp, "HEAD_CHUNK_TOKENS", chunk)
    model = tiny_model(V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, seed=0)
    prompts, responses, mask = batch()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, ent = lp.response_logprobs(model, prompts, responses, mask, temperature=1.0, pad_id=0,
                                         with_entropy=True)
    assert saved and bool([s for s in saved if V in s]) == kept
    (logp.sum() + ent.sum()).backward()  # the recompute runs
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
