"""HFEngine.generate in both modes: lengths, finish reasons, padding invariance, logprob definition, RNG."""

from dataclasses import replace

import pytest
import torch

from rollout import HFEngine, SamplingParams

PROMPTS = [[5, 9, 14, 3, 22, 7], [40, 2, 11]]


def engine_for(model, mode, eos=(), pad=0):
    return HFEngine(model, eos_token_ids=list(eos), pad_token_id=pad, mode=mode)


def greedy_first_token(model, prompt):
    with torch.no_grad():
        return int(model(torch.tensor([prompt])).logits[0, -1].argmax())


def assert_stop_invariants(groups, stop_id, max_new_tokens, n):
    """Every sample: equal lengths; "stop" iff it ends on stop_id (and only there); "length" iff max length."""
    assert [len(g) for g in groups] == [n] * len(PROMPTS)
    reasons = set()
    for s in (s for g in groups for s in g):
        assert len(s.token_ids) == len(s.logprobs) and 1 <= len(s.token_ids) <= max_new_tokens
        assert stop_id not in s.token_ids[:-1]
        if s.finish_reason == "stop":
            assert s.token_ids[-1] == stop_id
        else:
            assert s.finish_reason == "length" and len(s.token_ids) == max_new_tokens and s.token_ids[-1] != stop_id
        reasons.add(s.finish_reason)
    assert reasons == {"stop", "length"}  # the fixed seed makes both happen


@pytest.mark.parametrize("as_stop_token", [False, True], ids=["eos", "stop_token_ids"])
def test_shapes_and_finish_reasons(tiny_model, mode, as_stop_token):
    model = tiny_model()
    stop_id = greedy_first_token(model, PROMPTS[0])  # a likely token, so some samples stop early
    sp = SamplingParams(n=6, max_new_tokens=10, temperature=1.0,
                        stop_token_ids=(stop_id,) if as_stop_token else ())
    engine = engine_for(model, mode, eos=() if as_stop_token else (stop_id,))
    torch.manual_seed(0)
    assert_stop_invariants(engine.generate(PROMPTS, sp), stop_id, sp.max_new_tokens, sp.n)


def test_no_eos_runs_to_max_new_tokens(tiny_model, mode):
    groups = engine_for(tiny_model(), mode).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=7))
    assert all(len(s.token_ids) == 7 and s.finish_reason == "length" for g in groups for s in g)


def test_greedy_ignores_left_padding_and_matches_across_modes(tiny_model):
    """Greedy output of the short prompt alone == its output next to a longer (so left-padded) prompt,
    and both modes agree token for token."""
    model = tiny_model()
    sp = SamplingParams(n=1, max_new_tokens=12, temperature=0)
    outputs = {}
    for mode in ("generate", "paged"):
        engine = engine_for(model, mode)
        alone = engine.generate([PROMPTS[1]], sp)[0][0]
        batched = engine.generate(PROMPTS, sp)[1][0]
        assert alone.token_ids == batched.token_ids
        torch.testing.assert_close(alone.logprobs, batched.logprobs, atol=1e-4, rtol=0)
        outputs[mode] = alone.token_ids
    assert outputs["generate"] == outputs["paged"]


def test_greedy_is_deterministic_and_logprob_is_raw_argmax(tiny_model, mode, reference_logprobs):
    model = tiny_model()
    engine = engine_for(model, mode)
    sp = SamplingParams(n=2, max_new_tokens=8, temperature=0, top_k=3)  # top-k cannot change an argmax
    torch.manual_seed(1)
    first = engine.generate(PROMPTS, sp)
    torch.manual_seed(2)
    assert engine.generate(PROMPTS, sp) == first
    for prompt, (a, b) in zip(PROMPTS, first):
        assert a == b
        with torch.no_grad():
            logits = model(torch.tensor([prompt + a.token_ids])).logits[0, len(prompt) - 1 : -1]
        assert a.token_ids == logits.argmax(-1).tolist()
        # greedy logprobs are those of the unscaled (T=1), unfiltered distribution
        torch.testing.assert_close(torch.tensor(a.logprobs), reference_logprobs(model, prompt, a.token_ids),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (0.8, 0, 0.7), (1.0, 8, 0.9)])
def test_logprobs_are_processed_distribution(tiny_model, reference_logprobs, mode, arch, temperature, top_k, top_p):
    """Returned logprob == log_softmax(forward logits / T) at that position, renormalised over the
    top-k / top-p set: one plain forward pass on prompt + response recomputes it."""
    model = tiny_model(arch)
    sp = SamplingParams(n=3, max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p)
    torch.manual_seed(0)
    groups = engine_for(model, mode, eos=(1,)).generate(PROMPTS, sp)
    for prompt, group in zip(PROMPTS, groups):
        for s in group:
            ref = reference_logprobs(model, prompt, s.token_ids, temperature, top_k, top_p)
            assert torch.isfinite(ref).all()  # every sampled token lies inside the top-k / top-p set
            torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-4, rtol=0)


def test_checkpoint_generation_config_does_not_leak(tiny_model, reference_logprobs, mode):
    """A checkpoint's generation_config (top_k, temperature, repetition penalty) must not alter sampling."""
    model = tiny_model()
    model.generation_config.update(top_k=2, temperature=0.1, repetition_penalty=3.0, do_sample=True)
    torch.manual_seed(0)
    group = engine_for(model, mode).generate(PROMPTS[:1], SamplingParams(n=4, max_new_tokens=6))[0]
    for s in group:
        torch.testing.assert_close(torch.tensor(s.logprobs), reference_logprobs(model, PROMPTS[0], s.token_ids),
                                   atol=1e-4, rtol=0)
    assert len({tuple(s.token_ids) for s in group}) > 1  # really sampling at T=1, not near-greedy


def test_sampling_follows_torch_seed(tiny_model, mode):
    engine = engine_for(tiny_model(), mode)
    sp = SamplingParams(n=4, max_new_tokens=6)

    def run(seed):
        torch.manual_seed(seed)
        return [[s.token_ids for s in g] for g in engine.generate(PROMPTS, sp)]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_per_prompt_budgets_cut_each_prompts_samples_like_stopping_there(tiny_model, mode):
    """Multi-turn rollouts give each continuation its own budget: the samples are the same draws as
    with the largest budget, each cut to its prompt's ("length" when cut), routing never longer."""
    engine, sp = engine_for(tiny_model(), mode), SamplingParams(n=3, max_new_tokens=8)
    torch.manual_seed(0)
    whole = engine.generate(PROMPTS, sp)
    torch.manual_seed(0)
    cut = engine.generate(PROMPTS, sp, [8, 3])
    assert [[s.token_ids for s in g] for g in cut[:1]] == [[s.token_ids for s in g] for g in whole[:1]]
    for full, short in zip(whole[1], cut[1]):
        assert short.token_ids == full.token_ids[:3] and short.logprobs == full.logprobs[:3]
        assert short.finish_reason == ("length" if len(full.token_ids) > 3 else full.finish_reason)
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate(PROMPTS, sp, [8])
    with pytest.raises(ValueError, match=r"in \[1, sampling.max_new_tokens=8\]"):
        engine.generate(PROMPTS, sp, [9, 1])


def test_rejects_bad_prompts_and_empty_batch(tiny_model):
    engine = engine_for(tiny_model(), "generate")
    assert engine.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt 0 has a token id outside \[0, 64\)"):
        engine.generate([[64]], SamplingParams())


@pytest.mark.slow
def test_paged_runs_eager_models_and_restores_attention(tiny_model, reference_logprobs):
    """On CPU continuous batching needs sdpa or "paged|eager": an eager model is switched for the call only."""
    model = tiny_model()
    model.set_attn_implementation("eager")
    torch.manual_seed(0)
    group = engine_for(model, "paged").generate(PROMPTS[:1], SamplingParams(n=2, max_new_tokens=5, temperature=0.9))[0]
    assert model.config._attn_implementation == "eager"
    for s in group:
        torch.testing.assert_close(torch.tensor(s.logprobs), reference_logprobs(model, PROMPTS[0], s.token_ids, 0.9),
                                   atol=1e-4, rtol=0)


# --- the compacting decode ("generate" mode) ---------------------------------------------------------------


def generate_reference(model, prompts, sp, stop_ids, pad=0):
    """transformers' model.generate over all rows until the longest ends (what "generate" mode ran before
    rows left the batch): token ids per row, cut after the first stop token."""
    from transformers import GenerationConfig, LogitsProcessorList

    from rollout.hf_padded import _left_pad, _warpers

    ids, attn = _left_pad(prompts, pad, model.device)
    ids, attn = ids.repeat_interleave(sp.n, 0), attn.repeat_interleave(sp.n, 0)
    config = GenerationConfig(max_new_tokens=sp.max_new_tokens, do_sample=not sp.is_greedy, temperature=1.0,
                              top_k=None if sp.is_greedy else 0, top_p=1.0, eos_token_id=stop_ids or None,
                              pad_token_id=pad)
    out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config,
                         logits_processor=LogitsProcessorList(_warpers(sp)))[:, ids.shape[1]:].tolist()
    rows = []
    for row in out:
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:end])
    return rows


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.8, 10, 0.9), (0.0, 0, 1.0)])
def test_decode_gives_generates_samples_and_rng_stream(tiny_model, reference_logprobs, temperature, top_k, top_p):
    """Rows leave the batch when they end, yet a seed gives the samples model.generate gave (torch's
    multinomial noise is still drawn for every row) and leaves the global RNG where generate left it."""
    model = tiny_model()
    sp = SamplingParams(n=6, max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p)
    stops = [greedy_first_token(model, PROMPTS[0]), 1, 2, 3]
    torch.manual_seed(5)
    expected = generate_reference(model, PROMPTS, replace(sp, n=1) if sp.is_greedy else sp, stops)
    after_reference = torch.rand(3)
    torch.manual_seed(5)
    groups = engine_for(model, "generate", eos=stops).generate(PROMPTS, sp)
    samples = [s for g in groups for s in (g[:1] if sp.is_greedy else g)]
    assert [s.token_ids for s in samples] == expected
    assert torch.equal(torch.rand(3), after_reference)
    assert len({len(s.token_ids) for s in samples}) > 1 or sp.is_greedy  # rows really ended at different steps
    for prompt, group in zip(PROMPTS, groups):
        for s in group:
            ref = reference_logprobs(model, prompt, s.token_ids, temperature or 1.0, top_k if temperature else 0,
                                     top_p if temperature else 1.0)
            torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-4, rtol=0)


def test_cpu_sample_is_torch_multinomial():
    """_sample's CPU draw over all rows is torch.multinomial's, bit for bit, RNG state included; the
    running rows alone draw what they would draw inside the full batch."""
    from rollout.hf_padded import _sample

    probs = torch.softmax(torch.randn(12, 300, generator=torch.Generator().manual_seed(0)) * 3, -1)
    torch.manual_seed(1)
    expected = torch.multinomial(probs, 1).squeeze(1)
    state = torch.get_rng_state()
    torch.manual_seed(1)
    assert torch.equal(_sample(probs, torch.arange(12), 12), expected)
    assert torch.equal(torch.get_rng_state(), state)
    rows = torch.tensor([0, 3, 4, 11])
    torch.manual_seed(1)
    assert torch.equal(_sample(probs[rows], rows, 12), expected[rows])


def test_decode_stops_computing_ended_rows(tiny_model):
    """Each decode forward feeds only the rows still running: a row of n tokens is fed n - 1 times."""
    model = tiny_model()
    stop = greedy_first_token(model, PROMPTS[0])
    fed = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: fed.append(args[0].shape))
    torch.manual_seed(0)
    groups = engine_for(model, "generate", eos=(stop,)).generate(PROMPTS, SamplingParams(n=6, max_new_tokens=12))
    hook.remove()
    lengths = [len(s.token_ids) for g in groups for s in g]
    assert fed[0] == (12, len(PROMPTS[0]))  # the prefill: all rows, left-padded
    assert all(shape[1] == 1 for shape in fed[1:]) and sum(shape[0] for shape in fed[1:]) == sum(n - 1 for n in lengths)
    assert min(lengths) < max(lengths)
