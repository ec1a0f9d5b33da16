"""The update's rows spread over the ranks by tokens, not by where they were generated.

Rollout keeps every sample on the rank that generated it (a prompt's samples together, for group
statistics). Once the advantages (and critic targets) exist, rows are independent, and an update costs a
rank its tokens: every FSDP collective waits for the rank holding the long samples. So with several ranks
the update first reassigns rows: each rank keeps as many rows as it had (mini-batches and micro-batches
stay in lockstep; the loss is normalised by global counts, so placement changes no gradient), and the
tokens per rank are balanced greedily (rows longest first, each to the rank with the fewest tokens among
those with room). Rows travel with every per-row field; per-row results (the on-policy old log-probs)
travel back.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from rlcore import dist


def assign_rows(lengths_per_rank: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Per rank, the (origin rank, origin row) pairs it trains on: as many rows as it gave, tokens balanced.

    lengths_per_rank: each rank's row lengths (prompt + response tokens). Deterministic: every rank
    computes the same assignment from the same gathered lengths.
    """
    capacity = [len(lengths) for lengths in lengths_per_rank]
    rows = sorted(((n, r, i) for r, lengths in enumerate(lengths_per_rank) for i, n in enumerate(lengths)),
                  key=lambda x: (-x[0], x[1], x[2]))
    tokens = [0] * len(capacity)
    out: list[list[tuple[int, int]]] = [[] for _ in capacity]
    for n, r, i in rows:
        target = min((k for k in range(len(capacity)) if len(out[k]) < capacity[k]), key=lambda k: (tokens[k], k))
        out[target].append((r, i))
        tokens[target] += n
    return [sorted(a) for a in out]


class RowExchange:
    """This rank's share of the rows after balancing, and the way back for per-row results."""

    def __init__(self, seq_lens: list[int]):
        self.assignment = assign_rows(dist.gather_objects(seq_lens))
        self.mine = self.assignment[dist.rank()]
        self.num_local = len(seq_lens)

    def take(self, rows: list[dict]) -> list[dict]:
        """rows: this rank's rows (one dict of per-row values each) -> the rows assigned to this rank."""
        everyone = dist.gather_objects(rows)
        return [everyone[r][i] for r, i in self.mine]

    def give_back(self, values: Tensor, width: int) -> Tensor:
        """values: (len(mine), T) results of this rank's assigned rows -> (num_local, width) of its own rows."""
        everyone = dist.gather_objects(list(values))
        out = torch.zeros(self.num_local, width, dtype=values.dtype)
        for k, pairs in enumerate(self.assignment):
            for (r, i), v in zip(pairs, everyone[k]):
                if r == dist.rank():
                    n = min(width, v.shape[0])
                    out[i, :n] = v[:n]
        return out


def exchange_rows(columns: dict, seq_lens: list[int]) -> tuple[dict, RowExchange | None]:
    """Per-row columns ((B, T) tensors, (B,) tensors, per-row lists, or None) -> the rows assigned to this
    rank, and the RowExchange; alone: (columns, None)."""
    if dist.world_size() == 1:
        return columns, None
    exchange = RowExchange(seq_lens)
    names = [name for name, value in columns.items() if value is not None]
    rows = [{name: _row(columns[name], i) for name in names} for i in range(len(seq_lens))]
    taken = exchange.take(rows)
    out = dict(columns)
    for name in names:
        values = [row[name] for row in taken]
        out[name] = _stack_padded(values) if isinstance(columns[name], Tensor) else values
    return out, exchange


def exchange_batch(batch, seq_lens: list[int]):
    """exchange_rows over the fields of a dataclass batch (rlcore.batch.TrainBatch)."""
    columns, exchange = exchange_rows({f.name: getattr(batch, f.name) for f in fields(batch)}, seq_lens)
    return (batch if exchange is None else replace(batch, **columns)), exchange


def _row(value, i: int):
    if isinstance(value, Tensor):
        return value[i].clone()  # a view would pickle its whole storage
    return value[i]


def _stack_padded(rows: list[Tensor]) -> Tensor:
    """Rows of shape (t_i,) or () -> (B, max t_i) right-padded with zeros, or (B,)."""
    if rows[0].dim() == 0:
        return torch.stack(rows)
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), width)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out
