"""Tiny random-init causal LMs built from a config, and a plain-forward logprob reference."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 64
# initializer_range 0.2 (not the default 0.02) makes the next-token distribution peaked enough that greedy
# argmaxes are far from ties, so padding-level float noise cannot flip them.
_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=256, initializer_range=0.2)


def _tiny_model(arch: str = "qwen2", seed: int = 0, tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=tie, **_SHAPE)).eval()
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=tie, **_SHAPE)).eval()
    raise ValueError(arch)


@torch.no_grad()
def _reference_logprobs(model, prompt: list[int], response: list[int], temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """log-prob of each response token under log_softmax(logits / T) of one unpadded forward pass,
    renormalised over the top-k / top-p set when those are on (vLLM order: T, then top-k, then top-p)."""
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].double() / temperature  # (len(response), V)
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs  # keep a token while the more likely ones hold < top_p
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.log_softmax(-1).gather(1, torch.tensor(response)[:, None]).squeeze(1).float()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two OpenMP threads
    per op make padded generate ~30x slower (spin-waiting on a descheduled thread). Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    """Builder: tiny_model(arch="qwen2"|"llama", seed=0, tie=True) -> random-init causal LM, vocab 64."""
    return _tiny_model


@pytest.fixture
def reference_logprobs():
    """reference_logprobs(model, prompt, response, temperature=1, top_k=0, top_p=1) -> (len(response),)."""
    return _reference_logprobs


@pytest.fixture(params=["generate", pytest.param("paged", marks=pytest.mark.slow)])
def mode(request) -> str:
    """Both HFEngine modes; paged (continuous batching) is slower per call, hence marked slow."""
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower tests (paged continuous batching); kept in the default run")
