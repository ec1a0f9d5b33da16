"""HFEngine "paged" mode: transformers' continuous batching (``model.generate_batch``) over a paged KV cache.

Facts this relies on (transformers 5.23, generation/continuous_batching/):
- ``ContinuousBatchingConfig(return_logprobs=True)`` makes the model runner return, per sampled token,
  ``log(softmax(processed scores)[token])`` where "processed" = after the generation config's logits
  processors (temperature, top-k, top-p): the processed-mode logprob we need, no recompute required.
  Greedy (do_sample=False) adds no warpers, so it is log_softmax(raw logits)[argmax], as in "generate" mode.
- n samples per prompt = ``num_return_sequences``: the prompt is prefilled once and its cache forked.
- Attention: "sdpa" and "paged|eager" work on CPU ("eager" is switched to "paged|eager" for the call and
  restored after); flash attention is used on GPU when installed. No flash on CPU.
- The manager reseeds torch's global RNG (``torch.manual_seed(config seed)``) in its worker thread, so we
  draw that seed from the global RNG and restore the caller's RNG state afterwards.
- Left to itself, the cache is sized to 60% of free RAM on CPU (90% of free memory on GPU), and on sdpa
  every forward builds a dense mask over the whole cache; so on CPU we size it to the workload.
- The logprob is computed as log(softmax(...)[token]) in fp32 (not log_softmax): equal to 1e-6 in the
  tests, but a token sampled with probability below ~1e-38 would get -inf.
"""

from __future__ import annotations

import math

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from .base import Sample, SamplingParams

# Tokens per page on CPU. Bench workload (hidden 256): 16, 32, 64 -> 2.49, 2.54, 2.51 s; 256 -> 3.03 s.
_CPU_PAGE_SIZE = 32
_MAX_BATCH_TOKENS = 8192  # transformers' default; tokens per forward


def _generation_config(sampling: SamplingParams, stop_ids: list[int], pad_token_id: int) -> GenerationConfig:
    # generate_batch hands this config to _get_logits_processor as is (no merge with global defaults),
    # so neutral values (top_k=0, top_p=1, temperature=1) mean "no processor".
    greedy = sampling.is_greedy
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        temperature=1.0 if greedy else float(sampling.temperature),
        top_k=0 if greedy else sampling.top_k,
        top_p=1.0 if greedy else float(sampling.top_p),
        num_return_sequences=sampling.n,
        eos_token_id=stop_ids or -1,  # -1 = no eos
        pad_token_id=pad_token_id,
    )


def _cache_config(
    model: torch.nn.Module, prompts: list[list[int]], sampling: SamplingParams
) -> ContinuousBatchingConfig:
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from the caller's global RNG: seeding it seeds us
    if model.device.type != "cpu":
        # On an accelerator, let transformers size the cache from free memory (freed again after the call).
        return ContinuousBatchingConfig(return_logprobs=True, seed=seed)
    page = _CPU_PAGE_SIZE
    # Worst case: every sample reaches max_new_tokens, +1 page each for the partial page a fork copies.
    pages_per_sample = [math.ceil((len(p) + sampling.max_new_tokens) / page) + 1 for p in prompts]
    num_blocks = sampling.n * sum(pages_per_sample)
    # Enough tokens per forward to prefill every prompt at once or decode every sample at once.
    max_batch_tokens = min(_MAX_BATCH_TOKENS, max(sum(map(len, prompts)), len(prompts) * sampling.n))
    return ContinuousBatchingConfig(
        return_logprobs=True,
        seed=seed,
        page_size=page,
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
    )


@torch.no_grad()
def generate_paged(
    model: torch.nn.Module,
    prompts: list[list[int]],
    sampling: SamplingParams,
    *,
    stop_ids: list[int],
    pad_token_id: int,
) -> list[list[Sample]]:
    """See HFEngine.generate."""
    n = sampling.n
    gen_config = _generation_config(sampling, stop_ids, pad_token_id)
    cache_config = _cache_config(model, prompts, sampling)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the manager calls torch.manual_seed; keep the caller's stream
        outputs = model.generate_batch(
            prompts,
            generation_config=gen_config,
            continuous_batching_config=cache_config,
            progress_bar=False,
        )

    # generate_batch logs (does not raise) on failed or missing requests: check here. Its dict is in prompt
    # order, the n samples of a prompt adjacent (forked children, then the parent).
    results = list(outputs.values())
    errors = [f"{r.request_id}: {r.error}" for r in results if r.error is not None]
    if errors or len(results) != len(prompts) * n:
        raise RuntimeError(
            f"continuous batching returned {len(results)} of {len(prompts) * n} samples; errors: {errors[:3]}"
        )
    stop_set = set(stop_ids)
    samples = []
    for r in results:
        tokens, logprobs = list(r.generated_tokens), list(r.logprobs)
        if len(tokens) != len(logprobs) or not tokens:
            raise RuntimeError(f"{r.request_id}: {len(tokens)} tokens but {len(logprobs)} logprobs")
        samples.append(Sample(tokens, logprobs, "stop" if tokens[-1] in stop_set else "length"))
    return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]
