"""HFEngine "generate" mode: one left-padded ``model.generate`` call over all prompts x n samples.

Notation: P = prompts, R = P * n rows (the n samples of a prompt are adjacent), L = longest prompt,
T = generated steps (<= max_new_tokens; generate stops early once every row has stopped), V = vocab.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .base import Sample, SamplingParams
from .routing import RoutingRecorder


class _SampledTokenLogprobs(LogitsProcessor):
    """Last logits processor: records log_softmax(processed scores)[sampled token], one step late.

    A processor sees the scores before the token is drawn, but at the next step the drawn token is
    input_ids[:, -1]; the final step is gathered by finish(). This keeps (R,) floats per step instead
    of output_scores' (R, V) fp32 tensor per step, which is GBs at real vocab sizes.
    """

    def __init__(self) -> None:
        self._prev_scores: Tensor | None = None  # (R, V) processed scores of the previous step
        self._logprobs: list[Tensor] = []  # T tensors of shape (R,)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._prev_scores is not None:
            self._gather(input_ids[:, -1])
        self._prev_scores = scores  # processors return new tensors, so nothing mutates this later
        return scores

    def _gather(self, tokens: Tensor) -> None:
        scores = self._prev_scores
        # log_softmax(s)[tok] = s[tok] - logsumexp(s): no second (R, V) tensor. Masked entries are -inf.
        picked = scores.gather(1, tokens[:, None]).squeeze(1)  # (R,)
        self._logprobs.append(picked - torch.logsumexp(scores, dim=-1))

    def finish(self, last_tokens: Tensor) -> Tensor:
        """last_tokens (R,) = the final generated column -> logprobs (R, T)."""
        self._gather(last_tokens)
        self._prev_scores = None
        return torch.stack(self._logprobs, dim=1)


def _warpers(sampling: SamplingParams) -> list[LogitsProcessor]:
    """Temperature, top-k, top-p in vLLM's order. Passed as our own processors (and neutralised in the
    GenerationConfig) because generate appends its own warpers *after* user processors, where the
    logprob recorder could not see them."""
    if sampling.is_greedy:
        return []  # argmax ignores them; logprobs are then those of the raw T=1 distribution
    warpers: list[LogitsProcessor] = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(sampling.temperature)))
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=float(sampling.top_p)))
    return warpers


def _generation_config(sampling: SamplingParams, stop_ids: list[int], pad_token_id: int) -> GenerationConfig:
    # Every sampling knob is set explicitly: generate fills None fields from model.generation_config and
    # then from global defaults, which include top_k=50.
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not sampling.is_greedy,
        temperature=1.0,
        top_k=None if sampling.is_greedy else 0,  # greedy: any top_k value draws a "flag ignored" warning
        top_p=1.0,
        min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0,
        num_beams=1,
        num_return_sequences=1,
        eos_token_id=stop_ids or None,
        pad_token_id=pad_token_id,
        use_cache=True,
        return_dict_in_generate=False,
        output_scores=False,
    )


def _left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """prompts -> input_ids (P, L), attention_mask (P, L), left padded so every row ends at column L-1."""
    max_len = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), max_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), max_len), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, max_len - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, max_len - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def generate_padded(
    model: torch.nn.Module,
    prompts: list[list[int]],
    sampling: SamplingParams,
    *,
    stop_ids: list[int],
    pad_token_id: int,
    record_routing: bool = False,
) -> list[list[Sample]]:
    """See HFEngine.generate. Uses (and advances) torch's global RNG through torch.multinomial.
    record_routing: fill Sample.routing with the MoE experts each fed token was routed to."""
    n = sampling.n
    input_ids, attention_mask = _left_pad(prompts, pad_token_id, model.device)
    # Repeat on the device, n adjacent copies per prompt: (P, L) -> (R, L).
    input_ids = input_ids.repeat_interleave(n, dim=0)
    attention_mask = attention_mask.repeat_interleave(n, dim=0)

    recorder = _SampledTokenLogprobs()
    routing = RoutingRecorder(model) if record_routing else nullcontext()
    with routing:
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=_generation_config(sampling, stop_ids, pad_token_id),
            logits_processor=LogitsProcessorList([*_warpers(sampling), recorder]),
        )
    new_tokens = sequences[:, input_ids.shape[1] :]  # (R, T)
    logprobs = recorder.finish(new_tokens[:, -1])  # (R, T)
    if logprobs.shape != new_tokens.shape:  # would mean generate called the processors an unexpected number of times
        raise RuntimeError(f"logprobs {tuple(logprobs.shape)} do not match generated tokens {tuple(new_tokens.shape)}")

    # Length of each row = up to and including its first stop token, else all T columns (then T = max_new_tokens).
    num_steps = new_tokens.shape[1]
    if stop_ids:
        is_stop = torch.isin(new_tokens, torch.tensor(stop_ids, device=new_tokens.device))  # (R, T)
        has_stop = is_stop.any(dim=1)
        lengths = torch.where(has_stop, is_stop.int().argmax(dim=1) + 1, num_steps)
    else:
        has_stop = torch.zeros(new_tokens.shape[0], dtype=torch.bool, device=new_tokens.device)
        lengths = torch.full_like(has_stop, num_steps, dtype=torch.long)

    # One device->host transfer per tensor, then plain Python slicing.
    tokens_rows, logprob_rows = new_tokens.tolist(), logprobs.tolist()
    lengths_list, stopped = lengths.tolist(), has_stop.tolist()
    routes = [None] * len(lengths_list)
    if record_routing:
        prompt_lengths = [len(p) for p in prompts for _ in range(n)]
        routes = routing.samples(prompt_lengths, lengths_list, width=input_ids.shape[1])
    samples = [
        Sample(tokens_rows[r][:length], logprob_rows[r][:length], "stop" if stop else "length", routes[r])
        for r, (length, stop) in enumerate(zip(lengths_list, stopped))
    ]
    return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]
