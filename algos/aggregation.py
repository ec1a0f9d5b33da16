"""Loss aggregation: reduce a per-token loss (B, T) to the scalar that is back-propagated.

Spec §1.7 and verl `agg_loss`. Every mode is a sum of per-token (or per-sequence) terms divided
by a denominator, so a trainer that splits a mini-batch into micro-batches (and/or across ranks)
passes the GLOBAL denominator (`num_tokens` or `num_seqs` of the whole mini-batch) to every
micro-batch call; the micro-batch losses then SUM to the whole-batch loss, and so do their
gradients. With the defaults (None) the denominators are local, which is the single-process table.

Every mode accepts all three counts and ignores the ones it does not use, so the trainer can pass
the same counts whatever mode the recipe names (config validation, not this module, is the place
to reject a `norm_len` set for a mode that ignores it).

Also home of the masked statistics the other modules share: masked_mean, masked_whiten and
last_masked_index.
"""

import torch
from torch import Tensor

from algos.registry import AGGREGATIONS, lookup, register

Count = int | float | Tensor | None


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·m / (Σ m + 1e-8), over all elements or along `dim` (spec §0, verl `masked_mean`).

    x, mask: (B, T) (any matching shapes) -> scalar, or x's shape without `dim`.
    The 1e-8 keeps an all-masked input at 0 instead of NaN.
    """
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / (m.sum() + 1e-8)
    return (x * m).sum(dim) / (m.sum(dim) + 1e-8)


def last_masked_index(mask: Tensor) -> Tensor:
    """(B,) long index of each row's last masked-in token, where an outcome reward goes (spec §1.1);
    0 for an empty row. mask (B, T). Equals Σ_t mask − 1 when the mask has no gaps; with tool
    turns inside a response (mask 0 on the tools' tokens) it is the last token the policy sampled."""
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)  # (T,)
    return ((mask != 0) * positions).amax(-1).clamp(min=1).long() - 1 if mask.shape[-1] else \
        torch.zeros(mask.shape[:-1], dtype=torch.long, device=mask.device)


@torch.no_grad()
def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True) -> Tensor:
    """(x − μ) · rsqrt(σ² + 1e-8) over the masked elements (spec §1.3, verl/TRL `masked_whiten`).

    values, mask: (B, T) -> (B, T). μ = masked_mean, σ² = masked mean of (x − μ)² × N/(N − 1)
    (unbiased, N = Σ mask); shift_mean=False adds μ back (TRL reward whitening). Used on advantages
    over the whole training batch. Raises ValueError if N ≤ 1 (the unbiased variance is undefined).
    Differs from verl on purpose: masked positions come back as exactly 0 (verl leaves the non-zero
    whitened padding in place, spec §1 pitfalls), and masked inputs never enter the sums, so inf/NaN
    padding cannot leak in. No gradient: whitened advantages are constants of the loss.
    """
    is_valid = mask.bool()
    x = torch.where(is_valid, values, 0.0)  # padding may hold garbage; x·m would turn inf into NaN
    n = is_valid.sum()
    if n.item() <= 1:
        raise ValueError(f"masked_whiten needs at least 2 masked-in elements for an unbiased variance, got {n.item()}")
    mean = masked_mean(x, is_valid)
    var = masked_mean((x - mean).square(), is_valid) * n / (n - 1)  # Bessel correction, as verl masked_var
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(is_valid, out, 0.0)


def _denominator(count: Count, local: Tensor) -> Tensor:
    """The global count if the caller gave one, else the local one; never below 1.

    Counts are whole numbers, so the clamp changes nothing except an empty batch, where the
    numerator is 0 and the loss becomes an exact 0 that still carries a grad graph (not 0/0 = NaN).
    """
    denom = local if count is None else torch.as_tensor(count, dtype=local.dtype, device=local.device)
    return denom.clamp(min=1.0)


@register(AGGREGATIONS, "token-mean")
def token_mean(loss_mat: Tensor, mask: Tensor, *, num_tokens: Count = None, num_seqs: Count = None,
               norm_len: Count = None) -> Tensor:
    """Σ_{b,t} l·m / N_tok, N_tok = `num_tokens` or Σ m (spec §1.7, verl default).

    DAPO (arXiv 2503.14476, "token-level policy gradient loss"): 1/Σ_i|o_i| Σ_i Σ_t l_{i,t}.

    loss_mat, mask: (B, T) -> scalar. GRPO as published averages within each sequence first; this
    weighs every token equally, so tokens of long responses are not down-weighted. `num_seqs`, `norm_len` are ignored.
    """
    m = mask.to(loss_mat.dtype)
    return (loss_mat * m).sum() / _denominator(num_tokens, m.sum())


def _seq_mean(per_seq: Tensor, lengths: Tensor, num_seqs: Count) -> Tensor:
    """Mean of per-sequence values (B,) over non-empty sequences (L_b > 0); empty rows hold 0."""
    nonempty = (lengths > 0).to(per_seq.dtype)
    return (per_seq * nonempty).sum() / _denominator(num_seqs, nonempty.sum())


@register(AGGREGATIONS, "seq-mean-token-sum")
def seq_mean_token_sum(loss_mat: Tensor, mask: Tensor, *, num_tokens: Count = None, num_seqs: Count = None,
                       norm_len: Count = None) -> Tensor:
    """(1/N_seq) Σ_b Σ_t l·m, N_seq = `num_seqs` or #{b : L_b > 0} (spec §1.7, verl `seq-mean-token-sum`).

    loss_mat, mask: (B, T) -> scalar. A sequence's loss is its token SUM (REINFORCE-style), so
    longer responses weigh more. `num_tokens`, `norm_len` are ignored.
    """
    m = mask.to(loss_mat.dtype)
    return _seq_mean((loss_mat * m).sum(-1), m.sum(-1), num_seqs)  # (B,)


@register(AGGREGATIONS, "seq-mean-token-mean")
def seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, *, num_tokens: Count = None, num_seqs: Count = None,
                        norm_len: Count = None) -> Tensor:
    """(1/N_seq) Σ_b (Σ_t l·m) / (L_b + 1e-8), N_seq = `num_seqs` or #{b : L_b > 0}.

    GRPO as published (DeepSeekMath, arXiv 2402.03300 eq. 3: 1/G Σ_i 1/|o_i| Σ_t l_{i,t}); spec §1.7, verl
    ≥ v0.6.1 (empty rows excluded). loss_mat, mask: (B, T) -> scalar. Carries the length bias that
    Dr.GRPO removes. `num_tokens`, `norm_len` are ignored.
    """
    m = mask.to(loss_mat.dtype)
    lengths = m.sum(-1)  # (B,)
    return _seq_mean((loss_mat * m).sum(-1) / (lengths + 1e-8), lengths, num_seqs)


@register(AGGREGATIONS, "seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor, *, num_tokens: Count = None, num_seqs: Count = None,
                            norm_len: Count = None) -> Tensor:
    """Σ_{b,t} l·m / (N_seq · K), N_seq = `num_seqs` or #{b : L_b > 0}, K = `norm_len` or T = mask.shape[-1]
    (spec §1.7, §2.4).

    Dr.GRPO (arXiv 2503.20783): 1/G Σ_i Σ_t l_{i,t} / MAX_TOKENS instead of GRPO's 1/G Σ_i 1/|o_i| Σ_t.
    Agrees with verl's `agg_loss` and TRL's `dr_grpo` (B x max_completion_length).

    loss_mat, mask: (B, T) -> scalar. Dr.GRPO replaces 1/|o_i| by a constant (the max generation
    length) and keeps the mean over the sequences. Micro-batch and rank invariance need the global
    N_seq (`num_seqs`) and the same K in every micro-batch: pass `norm_len` when micro-batches are
    padded to different T. `num_tokens` is ignored.
    """
    m = mask.to(loss_mat.dtype)
    k = mask.shape[-1] if norm_len is None else norm_len
    nonempty = (m.sum(-1) > 0).to(loss_mat.dtype)  # (B,)
    return (loss_mat * m).sum() / (_denominator(num_seqs, nonempty.sum()) * k)


def aggregate(loss_mat: Tensor, mask: Tensor, mode: str, *, num_tokens: Count = None, num_seqs: Count = None,
              norm_len: Count = None) -> Tensor:
    """Reduce per-token losses (B, T) under `mask` (B, T) to a scalar with the named mode (spec §1.7).

    num_tokens: global Σ mask of the mini-batch (token-mean); num_seqs: global number of sequences
    with L_b > 0 (seq-mean-*); norm_len: constant K for seq-mean-token-sum-norm. Unknown mode ->
    KeyError listing the valid modes.
    """
    fn = lookup(AGGREGATIONS, mode, "aggregation")
    return fn(loss_mat, mask, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)
