"""rlcore's Trainer and TRL's GRPOTrainer on the same GRPO workload, interleaved step by step.

    python bench/trl_side_by_side.py [--warmup 2] [--steps 8] [--threads N]

Workload (bench/workload.py): Qwen2-shaped random-init model (hidden 256, 4 layers, 8/2 heads,
intermediate 688, tied embeddings, seed 0), character tokenizer, 2-digit addition, 16 prompts x 8
samples, <= 32 new tokens, temperature 1, one optimizer step per RL step, no KL, exact-match reward.

rlcore: the real Trainer built from the quickstart recipe plus overrides; `rl_step` is timed.
TRL: GRPOTrainer with per_device_train_batch_size=128, gradient_accumulation_steps=1,
steps_per_generation=1, so each optimizer step generates and trains on 16 x 8 completions; an
optimizer step is timed from on_step_begin to on_step_end (generation happens inside it).

Interleaving: TRL's training loop drives the run, and its on_step_end callback runs one rlcore step
right after TRL's timer stops, so the steps alternate (TRL, rlcore, TRL, ...) and background load on
the shared CPU hits both alike. Both run in one process with one torch thread count.

Prints one JSON line per side (median step seconds and tokens/s over the measured steps, completions
and completion tokens per step for the fairness check, phase medians), then one ratio line.
tokens/s = generated completion tokens (EOS included, padding excluded) / step seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402  (bench/workload.py; puts the repo root on sys.path)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


class RLCoreSide:
    """The rlcore Trainer; `step()` runs and records one timed rl_step."""

    def __init__(self, overrides: list[str]):
        self.trainer = workload.build_rlcore_trainer(overrides)
        self.records: list[dict] = []

    def step(self) -> None:
        start = time.perf_counter()
        metrics = self.trainer.rl_step()
        seconds = time.perf_counter() - start
        self.trainer.step += 1
        self.records.append({"step_s": seconds, "completions": len(self.trainer._last.batch),
                             "tokens": int(metrics["perf/generated_tokens"]), **self.trainer.timer.pop()})

    def close(self) -> None:
        self.trainer.close()


def build_trl(num_steps: int, between_steps):
    """A GRPOTrainer on the workload whose on_step_end calls `between_steps()` after its own timing."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlcore.models import char_tokenizer

    tokenizer = char_tokenizer()
    records: list[dict] = []
    pending = {"completions": 0, "tokens": 0, "generate_s": 0.0}

    def exact_match(prompts, completions, completion_ids, answer, **kwargs):
        # Exact match of the whole stripped completion (rlcore's `exact` reward), and the fairness counts.
        pending["completions"] += len(completion_ids)
        pending["tokens"] += sum(len(ids) for ids in completion_ids)
        return [float(c.strip() == a.strip()) for c, a in zip(completions, answer)]

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *args, **kwargs):  # generation time, for the phase comparison
            start = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            pending["generate_s"] += time.perf_counter() - start
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            pending.update(completions=0, tokens=0, generate_s=0.0)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.start
            records.append({"step_s": seconds, **pending})
            between_steps()

    config = GRPOConfig(
        output_dir=str(workload.scratch_dir("trl-bench-")),
        use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False,  # TRL's default is True; rlcore's is off
        per_device_train_batch_size=workload.PROMPTS_PER_STEP * workload.SAMPLES_PER_PROMPT,  # 128 completions
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,  # one generation per optimizer step
        num_generations=workload.SAMPLES_PER_PROMPT,
        max_completion_length=workload.MAX_NEW_TOKENS,
        temperature=workload.TEMPERATURE, top_p=1.0, top_k=0,
        beta=0.0, epsilon=0.2,
        loss_type="dapo",  # token mean over the whole batch = rlcore's token-mean aggregation
        scale_rewards="group",
        learning_rate=workload.LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=num_steps, seed=workload.SEED,
        use_vllm=False, report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        log_completions=False, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = TimedGRPOTrainer(
        model=workload.build_model(tokenizer), reward_funcs=exact_match, args=config,
        train_dataset=Dataset.from_list(workload.addition_rows()), processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-train dict would break the one-JSON-line-per-side output
    return trainer, records


def summarize(side: str, records: list[dict], warmup: int, phases: dict[str, str]) -> dict:
    measured = records[warmup:]
    out = {
        "side": side, "steps": len(measured), "warmup": warmup, "threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "step_s": round(median([r["step_s"] for r in measured]), 4),
        "step_s_min": round(min(r["step_s"] for r in measured), 4),  # least disturbed by other load
        "tokens_per_s": round(median([r["tokens"] / r["step_s"] for r in measured]), 1),
        "completions_per_step": median([r["completions"] for r in measured]),
        "completion_tokens_per_step": median([r["tokens"] for r in measured]),
        "step_s_all": [round(r["step_s"], 3) for r in measured],
    }
    for name, key in phases.items():
        out[f"{name}_s"] = round(median([r.get(key, 0.0) for r in measured]), 4)
    if "generate_s" in out:
        out["generate_tokens_per_s"] = round(median([r["tokens"] / r[phases["generate"]] for r in measured]), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2, help="steps per side not measured")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per side")
    parser.add_argument("--rlcore", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra rlcore config overrides (e.g. train.max_tokens_per_microbatch=8192)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for both sides; 0 = torch default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    rlcore = RLCoreSide(args.rlcore)
    trl, trl_records = build_trl(args.warmup + args.steps, between_steps=rlcore.step)
    try:
        trl.train()
    finally:
        rlcore.close()

    a = summarize("rlcore", rlcore.records, args.warmup, {
        "generate": "timing/generate", "reward": "timing/reward", "logprobs": "timing/logprobs",
        "update": "timing/update", "sync": "timing/sync"})
    b = summarize("trl", trl_records, args.warmup, {"generate": "generate_s"})
    print(json.dumps(a), flush=True)
    print(json.dumps(b), flush=True)
    print(json.dumps({
        "ratio": "rlcore/trl", "step_s": round(a["step_s"] / b["step_s"], 3),
        "tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
        "trl_over_rlcore_step_s": round(b["step_s"] / a["step_s"], 3),
        "step_s_min": round(a["step_s_min"] / b["step_s_min"], 3),
        "completion_tokens_per_step": round(a["completion_tokens_per_step"] / b["completion_tokens_per_step"], 3),
    }), flush=True)


if __name__ == "__main__":
    main()
