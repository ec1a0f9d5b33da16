"""HFEngine "generate" mode: left-padded prompts x n samples, prefilled at once, then decoded step by step,
each row leaving the batch (and its KV cache) as soon as it ends.

Notation: P = prompts, R = P * n rows (the n samples of a prompt are adjacent), A = rows still running,
L = longest prompt, T = generated steps (<= max_new_tokens; decoding stops once every row has ended),
V = vocab.

transformers' `generate` computes every row until the longest one ends; in RL the lengths spread 10-100x,
so most decode row-steps were spent on rows that had already ended. Here a row that emits a stop token
is dropped from the batch and from the KV cache before the next step (`DynamicCache.batch_select_indices`).
Sampling keeps `generate`'s RNG stream on CPU (see `_sample`), so a seed gives the same samples as
`generate` gave; elsewhere the same distribution.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .base import Sample, SamplingParams
from .routing import RoutingRecorder


def _warpers(sampling: SamplingParams) -> list[LogitsProcessor]:
    """Temperature, top-k, top-p in vLLM's order (the order transformers' generate applies them)."""
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


def _left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """prompts -> input_ids (P, L), attention_mask (P, L), left padded so every row ends at column L-1."""
    max_len = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), max_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), max_len), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, max_len - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, max_len - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _sample(probs: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """One token per running row from probs (A, V); rows (A,): each one's row in the full (R = num_rows) batch.

    On CPU this is torch.multinomial's own draw for the full batch (float64 Exp(1) noise q over (R, V),
    then argmax p / q: the Gumbel-max trick as torch implements it), noise drawn for every row, running
    or not: the RNG stream, and so every sample, is the one `generate` drew while it still computed the
    rows that had ended. Elsewhere: torch.multinomial over the running rows (same distribution).
    """
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1).squeeze(1)
    noise = torch.empty(num_rows, probs.shape[1], dtype=torch.float64).exponential_(1)
    return (probs.double() / noise[rows.cpu()]).argmax(-1)


@torch.no_grad()
def decode(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, sampling: SamplingParams, *,
           stop_ids: list[int], pad_token_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """Prefill (R, L) left-padded rows, then decode until every row has ended.

    Returns tokens (R, T) (pad after a row's end), logprobs (R, T) (log_softmax of the processed scores at
    the sampled token), lengths (R,), stopped (R,) bool, and the rows fed by each decode forward ([(A_s,)],
    for the routing record).
    """
    R, device = input_ids.shape[0], input_ids.device
    warpers, T = _warpers(sampling), sampling.max_new_tokens
    tokens = torch.full((R, T), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(R, T, device=device)
    lengths = torch.full((R,), T, dtype=torch.long, device=device)
    stopped = torch.zeros(R, dtype=torch.bool, device=device)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    rows = torch.arange(R, device=device)  # (A,) the full-batch row of each running row
    fed: list[Tensor] = []
    cache = DynamicCache(config=model.config)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate: real tokens count from 0
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    num_steps = 0
    for step in range(T):
        num_steps = step + 1
        scores = logits.float()
        for warp in warpers:
            scores = warp(None, scores)  # (A, V); the warpers read only the scores
        nxt = scores.argmax(-1) if sampling.is_greedy else _sample(torch.softmax(scores, -1), rows, R)
        tokens[rows, step] = nxt
        logprobs[rows, step] = scores.gather(1, nxt[:, None])[:, 0] - torch.logsumexp(scores, -1)
        ended = torch.isin(nxt, stops)  # (A,)
        lengths[rows[ended]] = step + 1
        stopped[rows[ended]] = True
        if step + 1 == T or bool(ended.all()):
            break
        if bool(ended.any()):  # drop the ended rows from the batch and the cache
            keep = (~ended).nonzero().squeeze(1)
            rows, nxt, attention_mask = rows[keep], nxt[keep], attention_mask[keep]
            cache.batch_select_indices(keep)
        position_ids = attention_mask.sum(-1, keepdim=True)  # (A, 1) the new token's position
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        fed.append(rows)
        logits = model(input_ids=nxt[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, use_cache=True).logits[:, -1]
    return tokens[:, :num_steps], logprobs[:, :num_steps], lengths.clamp(max=num_steps), stopped, fed


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
    """See HFEngine.generate. Uses (and advances) torch's global RNG as `model.generate` did.
    record_routing: fill Sample.routing with the MoE experts each fed token was routed to."""
    n = sampling.n
    input_ids, attention_mask = _left_pad(prompts, pad_token_id, model.device)
    # Repeat on the device, n adjacent copies per prompt: (P, L) -> (R, L).
    input_ids = input_ids.repeat_interleave(n, dim=0)
    attention_mask = attention_mask.repeat_interleave(n, dim=0)
    routing = RoutingRecorder(model) if record_routing else nullcontext()
    with routing:
        tokens, logprobs, lengths, stopped, fed = decode(model, input_ids, attention_mask, sampling,
                                                         stop_ids=stop_ids, pad_token_id=pad_token_id)
    # One device->host transfer per tensor, then plain Python slicing.
    tokens_rows, logprob_rows = tokens.tolist(), logprobs.tolist()
    lengths_list, stopped_list = lengths.tolist(), stopped.tolist()
    routes = [None] * len(lengths_list)
    if record_routing:
        prompt_lengths = [len(p) for p in prompts for _ in range(n)]
        routes = routing.samples(prompt_lengths, lengths_list, width=input_ids.shape[1], fed=fed)
    samples = [
        Sample(tokens_rows[r][:length], logprob_rows[r][:length], "stop" if stop else "length", routes[r])
        for r, (length, stop) in enumerate(zip(lengths_list, stopped_list))
    ]
    return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]
