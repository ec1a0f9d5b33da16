"""Shared by the vLLM engine tests (test_vllm_*.py): tiny policies and reference checks."""

import copy

import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config

from rlcore.models import tiny_model

PROMPTS = [[20, 35, 41, 3, 22, 7], [40, 2, 11], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
ON_GPU = torch.cuda.is_available()
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # what each platform's engine runs in these tests
MLA_TOLERANCE = 1e-2
"""Largest |log-prob| gap allowed for DeepSeek-V3 on vLLM's CPU build in fp32: its latent attention
kernel is not fp32-exact (measured on this init: 2e-3 nats, 6.5e-5 with weights x0.3, 0.25 with x5)."""


def policy(tok, seed: int, family: str = "qwen2") -> torch.nn.Module:
    """A tiny random model with matrices x5: next-token distributions peaked enough to sample far from
    vLLM's near-uniform dummy weights, while bf16 log-prob noise stays ~5x under the sync tolerance."""
    if family == "deepseek_v3":  # unscaled: vLLM's CPU latent attention is not fp32-exact (see MLA_TOLERANCE)
        return mla_model(len(tok), seed)
    model = tiny_model(len(tok), seed=seed, family=family, hidden_size=128, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, expert_intermediate_size=32)  # head_dim 32: vLLM's CPU minimum
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5)
    return model


def mla_model(vocab_size: int, seed: int) -> torch.nn.Module:
    """A tiny DeepSeek-V3 whose latent attention vLLM can run: every vLLM MLA kernel (CPU and CUDA)
    needs kv_lora_rank + qk_rope_head_dim = 576, DeepSeek-V3's own sizes. MoE as rlcore's tiny one."""
    config = DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
        norm_topk_prob=True, q_lora_rank=64, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32,
        v_head_dim=32, rope_interleave=True, tie_word_embeddings=True, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def as_engine_holds(model) -> torch.nn.Module:
    """fp32 model with the weights the engine holds after a sync (bf16-rounded on a GPU)."""
    return copy.deepcopy(model).to(DTYPE).float().eval()


@torch.no_grad()
def check_greedy(model, prompt: list[int], tokens: list[int], tol: float) -> int:
    """tokens are greedy under model up to dtype noise: each token's logit is within tol of the largest,
    and is the argmax wherever the top two logits are more than 2 * tol apart (returns how many)."""
    exact = 0
    for i, token in enumerate(tokens):
        logits = model(torch.tensor([prompt + tokens[:i]])).logits[0, -1]
        top = logits.topk(2).values
        assert logits[token] >= top[0] - tol, (prompt, tokens, i)
        if top[0] - top[1] > 2 * tol:
            assert token == int(logits.argmax()), (prompt, tokens, i)
            exact += 1
    return exact


def make_engine(tok, family="qwen2", **kwargs):
    """A VLLMEngine on a tiny policy of the family, as the trainer builds it (its own copy, platform dtype)."""
    from rollout.vllm_engine import VLLMEngine

    return VLLMEngine(policy(tok, 0, family).to(DTYPE), eos_token_ids=[tok.eos_token_id],
                      pad_token_id=tok.pad_token_id, gpu_memory_utilization=0.2, sleep_level=2, max_model_len=64,
                      enforce_eager=True, **kwargs)


