"""Where a micro-batch's tokens sit in one training forward: padded rows, or packed without padding.

Notation: B = sequences (prompt + response), T = response columns of the batch, N = real tokens of the
micro-batch (sum of the sequences' lengths), H = heads, D = head dim, R x W = the forward's input grid.

- padded: one row per sequence, right-padded to the longest (R = B, W = longest), an attention mask.
- packed: every sequence back to back in one row (R = 1, W = N), positions restarting at 0 for each
  sequence, attention kept within each sequence. Only real tokens go through the trunk: the
  projections and MLPs (most of a small model's work) run on N tokens, not on B x longest.

A sequence's real length is its prompt plus its response up to its real end (`lengths`): a token inside
the response with mask 0 (a tool's output, issue 15) is kept; only padding after the end is dropped.

Packed attention, by backend (the model's own `config._attn_implementation`):
- flash_attention_*: transformers' own varlen path, given `cu_seq_lens_*` / `max_length_*`.
- sdpa on CUDA in bf16 / fp16: torch's varlen flash kernel (`torch.nn.attention.varlen.varlen_attn`).
- sdpa otherwise (CPU, fp32): sequences grouped into buckets of similar length, each bucket gathered
  into a small right-padded batch, causal sdpa, scattered back (`bucketed_attention`). Right padding
  needs no key mask under a causal mask: a real query never sees a later (padded) key.
The sdpa entry of transformers' attention registry is wrapped (`_packed_or_sdpa`): a call that carries
`rlcore_packed` takes the packed path, every other call is transformers' sdpa unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_KWARG = "rlcore_packed"
"""Model-forward keyword that carries PackedSeqs down to the attention function (transformers passes
unknown forward kwargs through the decoder layers to attention)."""

BUCKET_MIN_RATIO = 0.5
"""CPU packed attention: a bucket takes sequences down to this fraction of its longest one. 1.0 = one
bucket per distinct length (least attention FLOPs, most calls), 0.0 = one bucket (fewest calls).
bench/packing.py, 2-core CPU, fwd+bwd of 128 rows: one bucket loses on long-tailed lengths (5.26 s vs 4.34 s
padded: attention padded to the longest), 0.5 / 0.75 / 1.0 all 3.25-3.28 s; bench/README.md."""

_MASK_SENTINEL = torch.ones(1, 1, 1, 1, dtype=torch.bool)
"""Passed as the 4-D attention mask of a packed sdpa forward: transformers returns a 4-D mask as is, so
no (N x N) block-diagonal mask is ever built; the packed attention ignores it."""


class PackedSeqs:
    """Sequence boundaries of a packed row, for the attention function; its plans are built on first use."""

    def __init__(self, lengths: list[int], device: torch.device):
        self.lengths, self.device = lengths, device
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        self.starts = starts[:-1]
        self.num_tokens = starts[-1]
        self.max_len = max(lengths)
        self._cu = starts

    @cached_property
    def cu_seqlens(self) -> Tensor:
        """(B + 1,) int32 cumulative lengths on the device (the varlen kernels' cu_seqlens)."""
        return torch.tensor(self._cu, dtype=torch.int32, device=self.device)

    @cached_property
    def buckets(self) -> tuple[list[tuple[Tensor, int, int]], Tensor]:
        """([(gather (n * L,), n, L) per bucket], back (N,)): bucket b gathers n sequences right-padded to
        L (a padded slot repeats its row's last token, never seen by a real query under the causal
        mask); `back` maps each token to its row in the concatenated bucket outputs."""
        order = sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i])
        groups: list[list[int]] = []
        for i in order:
            if groups and self.lengths[i] >= BUCKET_MIN_RATIO * self.lengths[groups[-1][0]]:
                groups[-1].append(i)
            else:
                groups.append([i])
        plans, back = [], torch.empty(self.num_tokens, dtype=torch.long)
        offset = 0
        for group in groups:
            width = self.lengths[group[0]]
            cols = torch.arange(width)
            gather = []
            for row, i in enumerate(group):
                n, s = self.lengths[i], self.starts[i]
                gather.append(s + cols.clamp(max=n - 1))
                back[s : s + n] = offset + row * width + cols[:n]
            plans.append((torch.cat(gather).to(self.device), len(group), width))
            offset += len(group) * width
        return plans, back.to(self.device)


def bucketed_attention(query: Tensor, key: Tensor, value: Tensor, seqs: PackedSeqs, *, scaling: float | None,
                       dropout: float) -> Tensor:
    """Causal attention within each packed sequence: (N, Hq, D), (N, Hkv, D) x2 -> (N, Hq, D)."""
    plans, back = seqs.buckets
    outs = []
    for gather, n, width in plans:
        q, k, v = (x.index_select(0, gather).view(n, width, *x.shape[1:]).transpose(1, 2) for x in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                           enable_gqa=q.shape[1] != k.shape[1])  # (n, Hq, L, D)
        outs.append(o.transpose(1, 2).reshape(n * width, o.shape[1], o.shape[-1]))
    return torch.cat(outs).index_select(0, back)


def uses_varlen_kernel(query: Tensor) -> bool:
    """torch's varlen flash kernel: CUDA, half precision, torch >= 2.10."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False
    return True


def packed_attention(query: Tensor, key: Tensor, value: Tensor, seqs: PackedSeqs, *, scaling: float | None,
                     dropout: float) -> Tensor:
    """transformers' layout in and out: (1, Hq, N, D), (1, Hkv, N, D) x2 -> (1, N, Hq, D)."""
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (N, H, D) views
    if uses_varlen_kernel(query) and dropout == 0.0 and k.shape[-1] == v.shape[-1]:  # MLA's v differs: buckets
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), seqs.cu_seqlens, seqs.cu_seqlens,
                          seqs.max_len, seqs.max_len, scale=scaling, window_size=(-1, 0),
                          enable_gqa=q.shape[1] != k.shape[1])
    else:
        out = bucketed_attention(q, k, v, seqs, scaling=scaling, dropout=dropout)
    return out.unsqueeze(0)


def _packed_or_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs):
    """transformers' sdpa, unless the forward carries PackedSeqs (rlcore's packed training forward)."""
    seqs = kwargs.pop(PACKED_KWARG, None)
    if seqs is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ValueError("packed attention supports neither sliding windows nor softcapping; train.packing=false")
    return packed_attention(query, key, value, seqs, scaling=scaling, dropout=dropout), None


AttentionInterface.register("sdpa", _packed_or_sdpa)


def supports_packing(model) -> bool:
    """Whether `model`'s attention can run packed: sdpa or flash attention, no sliding-window layers, no
    attention softcapping (those would need their own masks)."""
    config = getattr(model, "config", None) or model.model.config  # a model, or the ResponseScorer around one
    impl = config._attn_implementation or ""
    if impl != "sdpa" and not impl.startswith("flash_attention"):
        return False
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return False
    return not getattr(config, "attn_logit_softcapping", None)


@dataclass(frozen=True)
class Layout:
    """A micro-batch laid out for one forward: the (R, W) input grid and where each sequence sits in it."""

    input_ids: Tensor
    """(R, W) long."""
    forward_kwargs: dict
    """attention_mask, position_ids and packing metadata for the model's forward."""
    valid: Tensor
    """(R * W,) bool, the real tokens of the flattened grid."""
    starts: list[int]
    """Flat index of each sequence's first (prompt) token."""
    pos: Tensor
    """(B, T) long, flat index of the hidden state that scores response token t (spec §0: prompt_len + t - 1
    of the sequence); clamped into the sequence past its end (those are never kept)."""
    seq_lens: list[int] = field(default_factory=list)
    """B, prompt + real response tokens."""

    @property
    def num_grid_tokens(self) -> int:
        return self.input_ids.numel()


def build_layout(prompt_ids: list[list[int]], response_ids: Tensor, lengths: list[int], *, pad_id: int,
                 packed: bool, attn_impl: str = "sdpa", device: torch.device | str = "cpu") -> Layout:
    """Lay out B prompt + response sequences; response b has lengths[b] real tokens.

    response_ids: (B, T). packed=False: right-padded rows. packed=True: one row without padding.
    """
    B, T = response_ids.shape
    seq_lens = [len(p) + n for p, n in zip(prompt_ids, lengths)]
    pieces = [torch.cat([torch.tensor(p, dtype=torch.long), response_ids[b, :n].long()])
              for b, (p, n) in enumerate(zip(prompt_ids, lengths))]
    if packed:
        seqs = PackedSeqs(seq_lens, torch.device(device))
        starts = seqs.starts
        input_ids = torch.cat(pieces)[None]  # (1, N)
        position_ids = torch.cat([torch.arange(n) for n in seq_lens])[None]
        valid = torch.ones(seqs.num_tokens, dtype=torch.bool)
        kwargs = _packed_kwargs(seqs, position_ids.to(device), attn_impl)
    else:
        width = max(seq_lens)
        starts = [b * width for b in range(B)]
        input_ids = torch.full((B, width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(B, width, dtype=torch.long)
        for b, piece in enumerate(pieces):
            input_ids[b, : len(piece)] = piece
            attention_mask[b, : len(piece)] = 1
        valid = attention_mask.reshape(-1).bool()
        kwargs = {"attention_mask": attention_mask.to(device)}
    first = torch.tensor([s + len(p) - 1 for s, p in zip(starts, prompt_ids)])  # (B,) scores response token 0
    last = (torch.tensor(lengths) - 1).clamp(min=0)  # (B,)
    pos = first[:, None] + torch.minimum(torch.arange(T)[None, :], last[:, None])  # (B, T)
    return Layout(input_ids.to(device), kwargs, valid.to(device), starts, pos.to(device), seq_lens)


def _packed_kwargs(seqs: PackedSeqs, position_ids: Tensor, attn_impl: str) -> dict:
    if attn_impl.startswith("flash_attention"):  # transformers' own varlen path
        cu = seqs.cu_seqlens
        return {"attention_mask": None, "position_ids": position_ids, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": seqs.max_len, "max_length_k": seqs.max_len}
    return {"attention_mask": _MASK_SENTINEL.to(position_ids.device), "position_ids": position_ids,
            PACKED_KWARG: seqs}
