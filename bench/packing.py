"""Training forward+backward padded vs packed, and the CPU packed attention's bucket size.

    python bench/packing.py [--reps 7] [--threads N] [--only workload long_tail]

No trainer: rlcore's scoring path (rlcore.logprobs.response_logprobs, entropy on, as in the update) on the
bench workload model (bench/workload.py), forward + backward of 128 rows cut into token-budget micro-batches
as the update cuts them (rlcore.actor.micro_batches, --max-tokens 2048 as the quickstart), variants
interleaved:

  padded         right-padded rows, micro-batches of rows x longest <= budget, rows sorted by length
  packed_r<X>    one packed row; on CPU the attention groups sequences into buckets that reach down to X
                 times their longest (rlcore.packing.BUCKET_MIN_RATIO): 0 = one bucket, 1 = one per length

Batches (prompt 6 tokens, 128 rows, response lengths seeded):
  workload   lengths of the side-by-side workload: uniform 1..32 (mean ~16 of the 32-token budget)
  long_tail  geometric lengths, mean 60, clipped to 1..384 (a few tokens to a few hundred)

Prints one JSON line per batch: median seconds per variant, padded grid tokens computed and real tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402  (puts the repo root on sys.path)

from rlcore import packing  # noqa: E402
from rlcore.actor import micro_batches, sequence_lengths  # noqa: E402
from rlcore.logprobs import response_logprobs  # noqa: E402
from rlcore.models import char_tokenizer  # noqa: E402

RATIOS = (0.0, 0.5, 0.75, 1.0)
PROMPT_TOKENS, ROWS = 6, 128


def batch(kind: str, vocab: int):
    g = torch.Generator().manual_seed(0)
    if kind == "workload":
        lengths = torch.randint(1, workload.MAX_NEW_TOKENS + 1, (ROWS,), generator=g)
    else:
        u = torch.rand(ROWS, generator=g)
        lengths = (torch.log1p(-u) / torch.log1p(torch.tensor(-1 / 60))).ceil().long().clamp(1, 384)
    T = int(lengths.max())
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    prompts = torch.randint(2, vocab, (ROWS, PROMPT_TOKENS), generator=g).tolist()
    return prompts, torch.randint(2, vocab, (ROWS, T), generator=g) * mask.long(), mask, lengths


def fwd_bwd(model, data, *, packed: bool, ratio: float, max_tokens: int) -> int:
    """One update's forwards and backwards over the batch; returns the grid tokens computed."""
    packing.BUCKET_MIN_RATIO = ratio
    prompts, ids, mask, lengths = data
    grid = 0
    for idx in micro_batches(sequence_lengths(prompts, lengths), max_tokens, packed=packed):
        T = int(lengths[idx].max())
        logp, _ = response_logprobs(model, [prompts[i] for i in idx], ids[idx, :T], mask[idx, :T], temperature=1.0,
                                    pad_id=0, with_entropy=True, entropy_grad=False, lengths=lengths[idx],
                                    packed=packed)
        (-(logp * mask[idx, :T]).sum() / mask.sum()).backward()
        seq = [PROMPT_TOKENS + int(lengths[i]) for i in idx]
        grid += sum(seq) if packed else len(idx) * max(seq)
    model.zero_grad(set_to_none=True)
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=["workload", "long_tail"])
    parser.add_argument("--max-tokens", type=int, default=2048, help="train.max_tokens_per_microbatch")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = char_tokenizer()
    model = workload.build_model(tok).train()
    for kind in args.only:
        data = batch(kind, len(tok))
        variants = {"padded": dict(packed=False, ratio=0.5, max_tokens=args.max_tokens),
                    **{f"packed_r{r}": dict(packed=True, ratio=r, max_tokens=args.max_tokens) for r in RATIOS}}
        times = {k: [] for k in variants}
        grids = {k: fwd_bwd(model, data, **v) for k, v in variants.items()}  # also the warm-up
        for rep in range(args.reps):
            names = list(variants)
            for k in names[rep % len(names):] + names[: rep % len(names)]:  # rotate the order
                start = time.perf_counter()
                fwd_bwd(model, data, **variants[k])
                times[k].append(time.perf_counter() - start)
        lengths = data[3]
        print(json.dumps({"batch": kind, "threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2),
                          "real_tokens": int((lengths + PROMPT_TOKENS).sum()), "grid_tokens": grids["padded"],
                          "mean_response": round(float(lengths.float().mean()), 1), "max_response": int(lengths.max()),
                          "seconds": {k: round(statistics.median(v), 4) for k, v in times.items()}}), flush=True)


if __name__ == "__main__":
    main()
