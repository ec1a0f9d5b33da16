"""VLLMEngine with MoE models (vLLM's CPU build in CI's vLLM environment, CUDA vLLM on a GPU).

A module of its own: vLLM keeps its parallel state per process, so an MoE engine cannot be built while
the dense engine of test_vllm_engine.py is alive (no expert-parallel group); each test here builds
and closes its own.
"""

import pytest
import torch
from vllm_helpers import DTYPE, MLA_TOLERANCE, ON_GPU, PROMPTS, as_engine_holds, make_engine, policy

from rlcore.models import char_tokenizer
from rlcore.sync import sync_weights
from rollout import SamplingParams

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_moe_families_sample_like_hf(tok, reference_logprobs, family):
    """The sampled log-probs match transformers on the synced weights (fused experts sent per expert,
    Mixtral under its block_sparse_moe names, DeepSeek-V3's router bias); on a GPU the routed experts come
    back per sample, aligned with the fed tokens (replay's input)."""
    src = policy(tok, 9, family)
    engine = make_engine(tok, family, record_routing=ON_GPU)
    try:
        engine.wake()
        metrics = sync_weights(src, engine, bucket_mb=1, verify=True, dtype=DTYPE)
        out = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, temperature=1.0))
    finally:
        engine.close()
    assert metrics["sync/checksummed_tensors"] > 0
    ref, config = as_engine_holds(src), src.config
    for prompt, group in zip(PROMPTS, out):
        for s in group:
            expected = reference_logprobs(ref, prompt, s.token_ids)
            tol = 0.5 if ON_GPU else MLA_TOLERANCE if family == "deepseek_v3" else 1e-3
            assert (torch.tensor(s.logprobs) - expected).abs().max() < tol, family
            if ON_GPU:
                assert s.routing.shape == (len(prompt) + len(s.token_ids) - 1, len(engine._router_layers),
                                           config.num_experts_per_tok)


@pytest.mark.skipif(ON_GPU, reason="CPU-only refusal")
def test_routing_on_cpu_is_refused_with_the_reason(tok):
    with pytest.raises(ValueError, match="CPU build cannot return routed experts"):
        make_engine(tok, "qwen3_moe", record_routing=True)


