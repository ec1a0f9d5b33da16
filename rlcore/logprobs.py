"""Log-probs (and entropies) of response tokens under a causal LM, at the sampling temperature.

Only the hidden states that score a response token go through the LM head, in chunks, so the
[B, P, vocab] logits of prompts and padding are never materialised (spec §0: the logits at position
prompt_len + t - 1 score response token t). With grad and several chunks, a chunk's logits are
recomputed in backward rather than kept, so one chunk's (HEAD_CHUNK_TOKENS x vocab) fp32 tensors exist
at a time.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from algos import entropy_from_logits
from rlcore.batch import row_lengths

if TYPE_CHECKING:
    from rlcore.moe import MoEForward

HEAD_CHUNK_TOKENS = 1024
"""Response tokens per LM-head chunk. Each chunk's fp32 logits and their few temporaries are the update's
largest tensors at real vocabularies (1024 x 152,064 x 4 B = 594 MiB per copy, about five at the head's
backward); with recomputation in backward, only one chunk's exist at a time, whatever the micro-batch."""


def pack_inputs(prompt_ids: list[list[int]], response_ids: Tensor, lengths: Tensor, pad_id: int):
    """Right-padded prompt+response rows -> (input_ids (B, P), attention_mask (B, P), pos (B, T)).

    lengths (B,): real response tokens per row (rlcore.batch: trained or not, all are fed).
    pos[b, t] is the position whose logits score response token t of row b.
    """
    lengths = lengths.long().tolist()
    B, T = response_ids.shape
    P = max(len(p) + n for p, n in zip(prompt_ids, lengths))
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P, dtype=torch.long)
    starts = torch.tensor([len(p) for p in prompt_ids])
    for b, (p, n) in enumerate(zip(prompt_ids, lengths)):
        input_ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        input_ids[b, len(p) : len(p) + n] = response_ids[b, :n]
        attention_mask[b, : len(p) + n] = 1
    pos = (starts[:, None] - 1 + torch.arange(T)[None, :]).clamp(max=P - 1)  # (B, T)
    return input_ids, attention_mask, pos


class ResponseScorer(torch.nn.Module):
    """A causal LM behind one forward call that scores response tokens.

    Under FSDP this wrapper is the root module: the trunk, the final norm and the (possibly tied) LM
    head are then all used inside one root forward, where FSDP has them gathered, while only the
    selected hidden states go through the head.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pos: Tensor, keep: Tensor, targets: Tensor, *,
                temperature: float, with_entropy: bool, entropy_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Flat (N,) log-probs (and entropies) of the kept response tokens."""
        decoder, head = _split(self.model)
        if decoder is None:  # models without a separable head: full logits (fine for small vocabularies)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            hidden_sel = torch.gather(logits, 1, pos[..., None].expand(-1, -1, logits.shape[-1]))[keep]
            head = torch.nn.Identity()
        else:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, P, H)
            hidden_sel = torch.gather(hidden, 1, pos[..., None].expand(-1, -1, hidden.shape[-1]))[keep]  # (N, H)
        target_sel = targets[keep]  # (N,)
        score = partial(_score_chunk, head, temperature=temperature, with_entropy=with_entropy,
                        entropy_grad=entropy_grad)
        # With grad and several chunks, each chunk's (n, vocab) fp32 logits are recomputed in backward
        # instead of kept: all of them would be the update's largest tensors at real vocabularies. One
        # chunk is kept (recomputing it would cost a head forward and lower no peak).
        recompute = torch.is_grad_enabled() and target_sel.shape[0] > HEAD_CHUNK_TOKENS
        logp_parts, ent_parts = [], []
        for start in range(0, target_sel.shape[0], HEAD_CHUNK_TOKENS):
            h, t = hidden_sel[start : start + HEAD_CHUNK_TOKENS], target_sel[start : start + HEAD_CHUNK_TOKENS]
            logp, ent = checkpoint(score, h, t, use_reentrant=False) if recompute else score(h, t)
            logp_parts.append(logp)
            ent_parts += [ent] if with_entropy else []
        device = input_ids.device
        return _cat(logp_parts, device), (_cat(ent_parts, device) if with_entropy else None)


def response_logprobs(
    model,
    prompt_ids: list[list[int]],
    response_ids: Tensor,
    mask: Tensor,
    *,
    temperature: float,
    pad_id: int,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    moe: MoEForward | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log π(y_t | x, y_<t) of each trained response token, (B, T), 0 where mask is 0; entropy likewise.

    One forward over each row's whole sequence (its `lengths` real tokens: with tools, the template's
    and the tools' too), scoring only the mask's tokens: the others never reach the LM head, so no
    gradient can come from them. lengths None: rlcore.batch.row_lengths(mask).
    model: a causal LM, or the ResponseScorer around it (which FSDP shards as the root).
    Gradients flow when called under grad mode (the update); wrap in no_grad for old/ref log-probs.
    entropy_grad=False computes the entropy outside the autograd graph (a metric only), so backward
    does not keep a (tokens x vocab) fp32 tensor alive for it. moe: routing replay, expert-load
    statistics and the router aux loss of MoE models (rlcore.moe.MoEForward).
    """
    scorer = model if isinstance(model, ResponseScorer) else ResponseScorer(model)
    device = next(scorer.parameters()).device
    lengths = row_lengths(mask, lengths)
    input_ids, attention_mask, pos = pack_inputs(prompt_ids, response_ids, lengths, pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    pos, targets, keep = pos.to(device), response_ids.to(device), mask.to(device).bool()
    routed = nullcontext() if moe is None else moe.router_pass(scorer.model, prompt_ids, lengths.tolist(),
                                                                attention_mask)
    with routed:
        logp_sel, ent_sel = scorer(input_ids, attention_mask, pos, keep, targets, temperature=temperature,
                                   with_entropy=with_entropy, entropy_grad=entropy_grad)
    logprobs = torch.zeros(mask.shape, device=device, dtype=torch.float32).masked_scatter(keep, logp_sel)
    entropy = None
    if with_entropy:
        entropy = torch.zeros(mask.shape, device=device, dtype=torch.float32).masked_scatter(keep, ent_sel)
    return logprobs, entropy


def _score_chunk(head, h: Tensor, targets: Tensor, *, temperature: float, with_entropy: bool, entropy_grad: bool
                 ) -> tuple[Tensor, Tensor | None]:
    """(n,) log-probs of targets (and entropies) from (n, H) hidden states."""
    z = head(h).float() / temperature  # (n, V)
    logp = z.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(z, dim=-1)
    if not with_entropy:
        return logp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logp, entropy_from_logits(z)


def _cat(parts: list[Tensor], device) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, device=device)


def _split(model):
    """(decoder trunk, lm head), or (None, None) when the model cannot be split safely."""
    if getattr(model.config, "final_logit_softcapping", None):
        return None, None
    get_decoder, head = getattr(model, "get_decoder", None), model.get_output_embeddings()
    decoder = get_decoder() if get_decoder else None
    if decoder is None or head is None or decoder is model:
        return None, None
    return decoder, head
