"""Routing replay: the gap between rollout and training log-probs of a tiny MoE, replay off vs on.

The engine samples in bf16 (rollout.dtype=bfloat16) while the actor trains in fp32, as a bf16 inference
engine next to an fp32 trainer does; bf16 router logits then pick other experts for a few tokens.
For each family and setting, runs --steps RL steps of GRPO and prints one JSON line with the medians
over steps of: moe/routing_mismatch (fraction of (token, layer) pairs whose top-k set differs),
sync/mean_logprob_diff and sync/max_logprob_diff (|rollout - old log-prob| over response tokens).

    python bench/routing_replay.py [--steps 6] [--families qwen3_moe mixtral deepseek_v3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402  (puts the repo root on sys.path)

KEYS = ("moe/routing_mismatch", "sync/mean_logprob_diff", "sync/max_logprob_diff")


def run(family: str, replay: bool, steps: int) -> dict:
    from rlcore.config import freeze
    from rlcore.recipe import compose
    from rlcore.trainer import Trainer
    from rlcore.validate import validate

    cfg, _ = compose("quickstart", [
        "model.warmstart.steps=0", f"model.tiny.family={family}", "rollout.dtype=bfloat16",
        f"algo.routing_replay={str(replay).lower()}", "train.prompts_per_step=8", "rollout.samples_per_prompt=8",
        "rollout.max_new_tokens=16", "data.task.num_train=512", "data.task.num_eval=8", "trainer.eval_every=0",
        "train.minibatches_per_step=2"])  # old log-probs in their own pass, as with several mini-batches
    plan = validate(cfg)
    freeze(cfg)
    trainer = Trainer(cfg, plan, workload.scratch_dir("rlcore-replay-"))
    try:
        rows = []
        for _ in range(steps):
            rows.append(trainer.rl_step())
            trainer.step += 1
    finally:
        trainer.close()
    return {"family": family, "routing_replay": replay, "steps": steps,
            **{k.split("/")[1]: round(statistics.median(r[k] for r in rows), 6) for k in KEYS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--families", nargs="*", default=["qwen3_moe", "mixtral", "deepseek_v3"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for family in args.families:
        off, on = run(family, False, args.steps), run(family, True, args.steps)
        print(json.dumps(off), flush=True)
        print(json.dumps(on), flush=True)
        print(json.dumps({"family": family, "ratio": "replay on / off",
                          "mean_logprob_diff": round(on["mean_logprob_diff"] / off["mean_logprob_diff"], 3),
                          "max_logprob_diff": round(on["max_logprob_diff"] / off["max_logprob_diff"], 3)}), flush=True)


if __name__ == "__main__":
    main()
