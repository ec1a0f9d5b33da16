"""Long-tailed response lengths: padded vs unpadded RL steps, tokens computed vs real, per phase.

    python bench/long_tail.py [--steps 4] [--warmup 1] [--threads N] [--max-new-tokens 384] [--eos-scale 1.0]

Workload: bench/workload.py's model, tokenizer and addition prompts, 8 prompts x 8 samples, up to
--max-new-tokens new tokens, two mini-batches (so the old log-probs get their own forward), micro-batches of
4096 tokens. The random-init model stops when it samples EOS, so lengths are roughly geometric; --eos-scale
multiplies the EOS row of the tied embedding (its logit; EOS is never fed back) to set the mean length.

Two real Trainers, same recipe and seed, their RL steps alternated (load hits both alike):
  padded    train.packing=false, and generation as transformers' `model.generate` ran it before issue 16:
            every row computed until the longest one ends (`decode_all_rows` below)
  unpadded  the defaults: packed training forwards, rows leave the decode batch when they end
On CPU both draw the same samples for a seed (rollout.hf_padded._sample), so they do the same RL work.

Prints one JSON line per variant (median seconds per phase; tokens computed and real per phase: decode
row-steps against generated tokens, training grid tokens against prompt + response tokens), then the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402  (puts the repo root on sys.path)

import rlcore.critic  # noqa: E402
import rlcore.logprobs  # noqa: E402
import rollout.hf_padded  # noqa: E402
from rollout.hf_padded import _warpers  # noqa: E402

PHASES = ("generate", "logprobs", "update")


def decode_all_rows(model, input_ids, attention_mask, sampling, *, stop_ids, pad_token_id):
    """rollout.hf_padded.decode's contract through transformers' `model.generate`: every row is computed
    until the longest ends (ended rows are fed padding), as the hf engine decoded before issue 16."""
    from transformers import GenerationConfig, LogitsProcessorList

    config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.is_greedy,
                              temperature=1.0, top_k=None if sampling.is_greedy else 0, top_p=1.0,
                              eos_token_id=stop_ids or None, pad_token_id=pad_token_id,
                              return_dict_in_generate=True, output_scores=True)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                         logits_processor=LogitsProcessorList(_warpers(sampling)))
    tokens = out.sequences[:, input_ids.shape[1]:]  # (R, T)
    scores = torch.stack(out.scores, 1).float()  # (R, T, V) processed scores (small vocabulary here)
    logprobs = scores.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, dtype=torch.long))
    stopped = is_stop.any(1)
    lengths = torch.where(stopped, is_stop.int().argmax(1) + 1, tokens.shape[1])
    rows = torch.arange(tokens.shape[0])
    return tokens, logprobs, lengths, stopped, [rows] * (tokens.shape[1] - 1)


class Counts:
    """Tokens computed and real per phase, for the variant whose step is running."""

    def __init__(self):
        self.variant = None
        self.per_step: dict[str, list[dict]] = defaultdict(list)

    def new_step(self, variant: str) -> None:
        self.variant = variant
        self.per_step[variant].append(defaultdict(int))

    def add(self, key: str, n: int) -> None:
        self.per_step[self.variant][-1][key] += n


def instrument(counts: Counts) -> None:
    """Count the training forwards' grid and real tokens (rlcore.packing.build_layout, wherever used)."""
    real_build = rlcore.logprobs.build_layout

    def counted(prompt_ids, response_ids, lengths, **kw):
        layout = real_build(prompt_ids, response_ids, lengths, **kw)
        phase = "update" if torch.is_grad_enabled() else "logprobs"
        counts.add(f"{phase}_grid_tokens", layout.num_grid_tokens)
        counts.add(f"{phase}_real_tokens", sum(layout.seq_lens))
        return layout

    rlcore.logprobs.build_layout = rlcore.critic.build_layout = counted


def count_decode(model, counts: Counts) -> None:
    """Decode row-steps: the rows of every one-token forward of the engine's model."""
    def hook(module, args, out):
        if args[0].shape[1] == 1:
            counts.add("generate_row_steps", args[0].shape[0])

    model.get_input_embeddings().register_forward_hook(hook)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--eos-scale", type=float, default=1.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = [f"rollout.max_new_tokens={args.max_new_tokens}", "train.prompts_per_step=8",
              "train.minibatches_per_step=2", "train.max_tokens_per_microbatch=4096", "data.max_prompt_tokens=16"]
    trainers = {"padded": workload.build_rlcore_trainer([*common, "train.packing=false"]),
                "unpadded": workload.build_rlcore_trainer(common)}
    counts = Counts()
    instrument(counts)
    real_decode = rollout.hf_padded.decode
    for trainer in trainers.values():
        eos = trainer.tokenizer.eos_token_id
        with torch.no_grad():
            trainer.actor.model.get_input_embeddings().weight[eos] *= args.eos_scale  # synced at each step
        count_decode(trainer.engine.model, counts)
    records = defaultdict(list)
    # One torch RNG stream per trainer (both start from the seed): they draw the same samples step by step.
    rng = {name: torch.get_rng_state() for name in trainers}
    try:
        for i in range(args.warmup + args.steps):
            for name in (["padded", "unpadded"] if i % 2 == 0 else ["unpadded", "padded"]):
                trainer = trainers[name]
                rollout.hf_padded.decode = decode_all_rows if name == "padded" else real_decode
                torch.set_rng_state(rng[name])
                counts.new_step(name)
                start = time.perf_counter()
                metrics = trainer.rl_step()
                seconds = time.perf_counter() - start
                rng[name] = torch.get_rng_state()
                trainer.step += 1
                timing = trainer.timer.pop()
                if i >= args.warmup:
                    records[name].append({"step": seconds, **{p: timing.get(f"timing/{p}", 0.0) for p in PHASES},
                                          "generated_tokens": metrics["perf/generated_tokens"],
                                          "length_max": metrics["response/length_max"],
                                          **counts.per_step[name][-1]})
    finally:
        rollout.hf_padded.decode = real_decode
        for trainer in trainers.values():
            trainer.close()
    summary = {}
    for name, rs in records.items():
        summary[name] = {k: round(statistics.median(r.get(k, 0) for r in rs), 4) for k in sorted(set().union(*rs))}
        print(json.dumps({"variant": name, "threads": torch.get_num_threads(),
                          "loadavg_1m": round(os.getloadavg()[0], 2), "steps": len(rs), **summary[name]}), flush=True)
    a, b = summary["padded"], summary["unpadded"]
    print(json.dumps({"ratio": "unpadded/padded", **{p: round(b[p] / a[p], 3) for p in ("step", *PHASES) if a[p]},
                      "same_generated_tokens": a["generated_tokens"] == b["generated_tokens"]}), flush=True)


if __name__ == "__main__":
    main()
