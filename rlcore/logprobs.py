"""Log-probs (and entropies) of response tokens under a causal LM, at the sampling temperature.

The micro-batch goes through the trunk packed without padding where the model allows it (rlcore.packing:
one row, attention kept within each sequence), else as right-padded rows. Only the hidden states that
score a response token go through the LM head, in chunks, so the logits of prompts and padding are never
materialised (spec §0: the logits at position prompt_len + t - 1 score response token t). With grad and
several chunks, a chunk's logits are recomputed in backward rather than kept, so one chunk's
(HEAD_CHUNK_TOKENS x vocab) fp32 tensors exist at a time."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from algos import entropy_from_logits
from rlcore.batch import response_lengths
from rlcore.packing import Layout, build_layout, supports_packing

if TYPE_CHECKING:
    from rlcore.moe import MoEForward

HEAD_CHUNK_TOKENS = 1024
"""Response tokens per LM-head chunk. Each chunk's fp32 logits and their few temporaries are the update's
largest tensors at real vocabularies (1024 x 152,064 x 4 B = 594 MiB per copy, about five at the head's
backward); with recomputation in backward, only one chunk's exist at a time, whatever the micro-batch."""


class ResponseScorer(torch.nn.Module):
    """A causal LM behind one forward call that scores response tokens.

    Under FSDP this wrapper is the root module: the trunk, the final norm and the (possibly tied) LM
    head are then all used inside one root forward, where FSDP has them gathered, while only the
    selected hidden states go through the head.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, pos: Tensor, keep: Tensor, targets: Tensor, *, model_kwargs: dict,
                temperature: float, with_entropy: bool, entropy_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Flat (N,) log-probs (and entropies) of the kept response tokens.

        input_ids (R, W) and model_kwargs: a rlcore.packing.Layout; pos, keep, targets: (B, T).
        """
        decoder, head = _split(self.model)
        flat_pos = pos[keep]  # (N,) rows of the flattened (R * W) grid that score the kept tokens
        if decoder is None:  # models without a separable head: full logits (fine for small vocabularies)
            logits = self.model(input_ids=input_ids, **model_kwargs).logits
            hidden_sel = logits.flatten(0, 1)[flat_pos]
            head = torch.nn.Identity()
        else:
            hidden = decoder(input_ids=input_ids, **model_kwargs).last_hidden_state  # (R, W, H)
            hidden_sel = hidden.flatten(0, 1)[flat_pos]  # (N, H)
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
    packed: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log π(y_t | x, y_<t) of each trained response token, (B, T), 0 where mask is 0; entropy likewise.

    One forward over each row's whole sequence (its `lengths` real tokens: with tools, the template's
    and the tools' too), scoring only the mask's tokens: the others never reach the LM head, so no
    gradient can come from them.
    model: a causal LM, or the ResponseScorer around it (which FSDP shards as the root).
    Gradients flow when called under grad mode (the update); wrap in no_grad for old/ref log-probs.
    entropy_grad=False computes the entropy outside the autograd graph (a metric only), so backward
    does not keep a (tokens x vocab) fp32 tensor alive for it. moe: routing replay, expert-load
    statistics and the router aux loss of MoE models (rlcore.moe.MoEForward).
    lengths: (B,) real response tokens per row (trained or not; rlcore.batch.response_lengths when None).
    packed: run the forward without padding (rlcore.packing) where the model supports it; False: padded.
    """
    scorer = model if isinstance(model, ResponseScorer) else ResponseScorer(model)
    layout, keep = _layout(scorer.model, prompt_ids, response_ids, mask, lengths, pad_id=pad_id, packed=packed)
    device = layout.input_ids.device
    targets = response_ids.to(device)
    routed = nullcontext() if moe is None else moe.router_pass(scorer.model, layout)
    with routed:
        logp_sel, ent_sel = scorer(layout.input_ids, layout.pos, keep, targets, model_kwargs=layout.forward_kwargs,
                                   temperature=temperature, with_entropy=with_entropy, entropy_grad=entropy_grad)
    logprobs = torch.zeros(mask.shape, device=device, dtype=torch.float32).masked_scatter(keep, logp_sel)
    entropy = None
    if with_entropy:
        entropy = torch.zeros(mask.shape, device=device, dtype=torch.float32).masked_scatter(keep, ent_sel)
    return logprobs, entropy


def _layout(model, prompt_ids, response_ids: Tensor, mask: Tensor, lengths: Tensor | None, *, pad_id: int,
            packed: bool | None) -> tuple[Layout, Tensor]:
    """The forward's Layout and keep (B, T) bool: the tokens to score (mask 1, within the real length)."""
    lengths = response_lengths(mask) if lengths is None else lengths.long()
    device = next(model.parameters()).device
    packed = packed is not False and supports_packing(model)  # checked per call: attention can be switched
    layout = build_layout(prompt_ids, response_ids, lengths.tolist(), pad_id=pad_id, packed=packed,
                          attn_impl=model.config._attn_implementation or "sdpa", device=device)
    keep = mask.bool() & (torch.arange(mask.shape[1])[None, :] < lengths[:, None])
    return layout, keep.to(device)


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
