"""VLLMEngine against a real vLLM 0.26 on a GPU (skipped elsewhere), and its import path on any machine.

vLLM's sleep-mode allocator allows one engine per process, so the GPU tests share one module-scoped
engine; each test loads the weights it checks against.
"""

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlcore.models import char_tokenizer, tiny_model
from rlcore.sync import MEAN_ABS_TOLERANCE, sync_weights
from rollout.base import checksum
from rollout import ENGINES, SamplingParams
from rollout.weight_names import checkpoint_state

HAS_VLLM = importlib.util.find_spec("vllm") is not None
GPU_SKIP_REASON = "needs an NVIDIA GPU and vLLM 0.26 (pip install rlcore[vllm])"
on_gpu = pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason=GPU_SKIP_REASON)

PROMPTS = [[20, 35, 41, 3, 22, 7], [40, 2, 11], [60, 61, 62, 63, 64, 65, 66, 67, 68]]


def policy(tok, seed: int) -> torch.nn.Module:
    """A tiny random Qwen2 with matrices x5: next-token distributions peaked enough to sample far from
    vLLM's near-uniform dummy weights, while bf16 log-prob noise stays ~5x under the sync tolerance."""
    model = tiny_model(len(tok), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5)
    return model


def as_engine_holds(model) -> torch.nn.Module:
    """fp32 model with the bf16-rounded weights the engine holds after a sync."""
    return copy.deepcopy(model).to(torch.bfloat16).float().eval()


@torch.no_grad()
def check_greedy(model, prompt: list[int], tokens: list[int], tol: float = 0.15) -> int:
    """tokens are greedy under model up to bf16 noise: each token's logit is within tol of the largest, and
    is the argmax wherever the top two logits are more than 2 * tol apart (returns how many such places)."""
    exact = 0
    for i, token in enumerate(tokens):
        logits = model(torch.tensor([prompt + tokens[:i]])).logits[0, -1]
        top = logits.topk(2).values
        assert logits[token] >= top[0] - tol, (prompt, tokens, i)
        if top[0] - top[1] > 2 * tol:
            assert token == int(logits.argmax()), (prompt, tokens, i)
            exact += 1
    return exact


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    pytest.importorskip("vllm")
    from rollout.vllm_engine import VLLMEngine

    return VLLMEngine(policy(tok, 0).to(torch.bfloat16), eos_token_ids=[tok.eos_token_id],
                      pad_token_id=tok.pad_token_id, gpu_memory_utilization=0.2, sleep_level=2, enforce_eager=True)


def greedy(engine, n=1, steps=6):
    return [[s.token_ids for s in g] for g in engine.generate(PROMPTS, SamplingParams(n=n, max_new_tokens=steps,
                                                                                      temperature=0))]


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 20)])
def test_samples_and_logprobs_match_hf_after_load(engine, tok, reference_logprobs, temperature, top_k):
    src = policy(tok, 1)
    engine.wake()
    engine.load_weights(checkpoint_state(src))
    out = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12, temperature=temperature, top_k=top_k))
    ref, eos, diffs = as_engine_holds(src), tok.eos_token_id, []
    assert [len(g) for g in out] == [4] * len(PROMPTS)
    for prompt, group in zip(PROMPTS, out):
        for s in group:
            assert 1 <= len(s.token_ids) <= 12 and len(s.logprobs) == len(s.token_ids)
            assert eos not in s.token_ids[:-1] and s.routing is None
            assert s.finish_reason == ("stop" if s.token_ids[-1] == eos else "length")
            assert s.finish_reason == "stop" or len(s.token_ids) == 12
            expected = reference_logprobs(ref, prompt, s.token_ids, temperature=temperature, top_k=top_k)
            diffs.append((torch.tensor(s.logprobs) - expected).abs())
    diff = torch.cat(diffs)
    assert diff.mean() < MEAN_ABS_TOLERANCE[torch.bfloat16] and diff.max() < 0.5, (diff.mean(), diff.max())


@pytest.mark.gpu
@on_gpu
def test_greedy_matches_hf_greedy(engine, tok):
    src = policy(tok, 2)
    engine.wake()
    engine.load_weights(checkpoint_state(src))
    ref, exact = as_engine_holds(src), 0
    for prompt, group in zip(PROMPTS, greedy(engine, n=2)):
        assert group[0] == group[1]  # n greedy samples are copies
        assert len(group[0]) == 6 or group[0][-1] == tok.eos_token_id
        exact += check_greedy(ref, prompt, group[0])
    assert exact >= 3  # about half of the places have a clear argmax


@pytest.mark.gpu
@on_gpu
def test_sleep_wake_then_load_restores_generation(engine, tok):
    engine.wake()
    engine.load_weights(checkpoint_state(policy(tok, 3)))
    before = greedy(engine)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    engine.wake()  # sleep level 2: the weights are garbage until the sync
    engine.load_weights(checkpoint_state(policy(tok, 4)))
    assert greedy(engine) != before  # really the new weights
    engine.sleep()
    engine.load_weights(checkpoint_state(policy(tok, 3)))  # as Trainer.evaluate: sync, then wake
    engine.wake()
    assert greedy(engine) == before
    engine.sleep()


@pytest.mark.gpu
@on_gpu
def test_weight_checksums_of_synced_tensors_equal_the_sources(engine, tok):
    src = policy(tok, 5)
    engine.wake()
    metrics = sync_weights(src, engine, bucket_mb=1, verify=True, dtype=torch.bfloat16)  # the trainer's path
    assert metrics["sync/buckets"] > 1 and metrics["sync/max_checksum_error"] > 0  # fp32 sent, bf16 held
    names = [name for name, _ in checkpoint_state(src)]
    got = engine.weight_checksums(names)
    # dense Qwen2, one GPU: every tensor maps, q/k/v and gate/up as slices, the vocab without padding
    assert set(got) == set(names)
    for name, tensor in checkpoint_state(src):
        expected = checksum(tensor.to(torch.bfloat16))
        assert got[name] == pytest.approx(expected, rel=1e-6, abs=1e-6), name


@pytest.mark.skipif(HAS_VLLM and torch.cuda.is_available(), reason="vLLM and a GPU are here: the GPU tests run")
def test_without_vllm_or_gpu_construction_says_what_is_needed():
    code = "import sys, rollout.vllm_engine; assert 'vllm' not in sys.modules"  # vllm is imported lazily
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
    from rollout.vllm_engine import VLLMEngine

    assert ENGINES["vllm"] is VLLMEngine
    tok = char_tokenizer()
    model = tiny_model(len(tok))
    with pytest.raises(ValueError, match="unknown rollout mode"):
        VLLMEngine(model, eos_token_ids=[1], pad_token_id=0, mode="bogus")
    with pytest.raises((ImportError, RuntimeError), match=r"pip install rlcore\[vllm\]") as info:
        VLLMEngine(model, eos_token_ids=[1], pad_token_id=0)
    assert "GPU" in str(info.value)
    assert next(model.parameters()).device.type == "cpu"  # left untouched when the engine cannot start
