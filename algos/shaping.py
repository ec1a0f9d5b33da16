"""Reward shaping terms added to the per-sequence score before advantages are computed."""

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, *, max_len: int, cache_len: int) -> Tensor:
    """DAPO soft overlong punishment (arXiv 2503.14476 §3.4, spec §3.4), added to the correctness reward:

        R_len(L) = 0                            if L ≤ max_len − cache_len
                 = ((max_len − cache_len) − L) / cache_len   in between (linear from 0 down to −1)
                 = −1                           if L > max_len

    lengths (B,) int or float (response lengths L_b in tokens) -> penalty (B,) float32 (float64 if
    lengths are), in [−1, 0]. Differs from plain length truncation by grading the penalty over the
    last `cache_len` tokens instead of punishing every truncated sample alike.

    Differs from verl's DAPO reward manager `min(−(L − (max_len − cache_len))/cache_len · factor, 0)`:
    no penalty factor (scale the result yourself) and an explicit floor at −1 for L > max_len, as in
    the paper (verl never sees such lengths, since its responses are truncated at max_len).
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    out_dtype = lengths.dtype if lengths.dtype == torch.float64 else torch.float32
    soft_start = max_len - cache_len
    return ((soft_start - lengths.to(out_dtype)) / cache_len).clamp(min=-1.0, max=0.0)
